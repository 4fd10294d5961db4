"""Weight-space re-anchoring: start the next round from the global model plus this silo's residual.

The ``local`` strategy's mechanism (lambda = 1: each silo keeps training its own model) and FC-MoE's
opt-in ``retention_lambda``; FC-MoE's retention proper is the personal adapter (personal.py), because
silos that start from their own models hand the global updates taken elsewhere (docs/algorithm.md).

    residual_u     = local_u - global_u                 (what the new global did not absorb)
    start_u        = global_u + lambda * s_hat_u * residual_u
    s_hat_u        = share_u / max(shares of the same layer)   for expert units (1 for shared units)

With lambda = 0 a silo starts every round from the global model (FedAvg); with lambda = 1 and no
importance scaling it keeps training its own model (local-only). Pure functions on arrays.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fcmoe.model import UnitKey


def importance_scale(shares: Mapping[str, float]) -> dict[str, float]:
    """``s_hat`` per unit: the silo's routing share relative to its most used expert in that layer."""
    best: dict[int, float] = {}
    for unit, share in shares.items():
        key = UnitKey.parse(unit)
        if key.is_expert:
            best[key.layer] = max(best.get(key.layer, 0.0), share)
    out = {}
    for unit, share in shares.items():
        key = UnitKey.parse(unit)
        out[unit] = 1.0 if not key.is_expert else (share / best[key.layer] if best.get(key.layer) else 0.0)
    return out


def anchor(global_units: Mapping[str, np.ndarray], local_units: Mapping[str, np.ndarray], lam: float,
           scale: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """The silo's starting point for the next round."""
    out = {}
    for unit, g in global_units.items():
        s = 1.0 if scale is None else scale[unit]
        out[unit] = (g + lam * s * (local_units[unit] - g)).astype(np.float32)
    return out
