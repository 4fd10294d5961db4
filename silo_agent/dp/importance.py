"""Importance under DP, from DP-protected quantities only (DESIGN §5): free post-processing.

A silo's routing share is measured on its held-out split, which DP-SGD does not protect, and under
DP importance must come from what the ledger covers. So under DP-SGD the silo instead releases, per
expert unit, the share of its layer's update norm that the unit's *privatised* delta carries — a
function of the DP-SGD output, so it costs nothing more.
Shared units count as fully used (1.0), as with routing shares.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fcmoe.model import UnitKey


def norm_shares(deltas: Mapping[str, np.ndarray]) -> dict[str, float]:
    norms = {u: float(np.linalg.norm(v.astype(np.float64))) for u, v in deltas.items()}
    totals: dict[int, float] = {}
    for unit, norm in norms.items():
        key = UnitKey.parse(unit)
        if key.is_expert:
            totals[key.layer] = totals.get(key.layer, 0.0) + norm
    out = {}
    for unit, norm in norms.items():
        key = UnitKey.parse(unit)
        total = totals.get(key.layer, 0.0)
        out[unit] = 1.0 if not key.is_expert else (norm / total if total > 0 else 0.0)
    return out
