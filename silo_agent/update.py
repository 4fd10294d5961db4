"""What a silo sends: per-unit deltas, clipped per unit, scaled by its aggregation weight. Pure maths."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def unit_deltas(trained: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (trained[k].astype(np.float32) - start[k].astype(np.float32)) for k in start}


def clip_units(deltas: Mapping[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Scale each unit's delta to L2 norm <= clip_norm (0 disables); returns clipped deltas and raw norms."""
    clipped, norms = {}, {}
    for key, d in deltas.items():
        norm = float(np.linalg.norm(d.astype(np.float64)))
        norms[key] = norm
        scale = clip_norm / norm if clip_norm > 0 and norm > clip_norm else 1.0
        clipped[key] = (d * scale).astype(np.float32)
    return clipped, norms


def scaled_payload(deltas: Mapping[str, np.ndarray], coefficients: Mapping[str, float]) -> dict[str, np.ndarray]:
    """``alpha_u * delta_u`` per unit: the aggregator divides group sums by the sum of the alphas."""
    return {k: (coefficients[k] * d).astype(np.float32) for k, d in deltas.items()}
