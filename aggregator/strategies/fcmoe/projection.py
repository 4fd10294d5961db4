"""Combining group sums: conflict projected off the consensus direction (PCGrad-style). Pure maths.

The projection runs on exact group sums (decrypted or unmasked), never on sketches: sketches only
decide weights and groups.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator.accumulate import GroupSum
from aggregator.strategies.fcmoe.consensus import CONFLICT, CONSENSUS


def project_off(vector: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """``vector`` minus its component along ``direction`` if they oppose; unchanged otherwise (float64)."""
    v = np.asarray(vector, dtype=np.float64)
    d = np.asarray(direction, dtype=np.float64)
    dot, norm2 = float(v @ d), float(d @ d)
    if dot >= 0 or norm2 == 0:
        return v
    return v - (dot / norm2) * d


def combine(groups: Mapping[int, GroupSum], project: bool) -> np.ndarray:
    """The unit's update: sum of (possibly projected) group sums over the sum of their weights."""
    weight = sum(g.weight for g in groups.values())
    if weight <= 0:
        raise ValueError("no weight in any group")
    consensus, conflict = groups.get(CONSENSUS), groups.get(CONFLICT)
    if consensus is None or conflict is None:
        return (sum(g.vector for g in groups.values()) / weight).astype(np.float32)
    conflict_vec = project_off(conflict.vector, consensus.vector) if project else conflict.vector
    return ((consensus.vector + conflict_vec) / weight).astype(np.float32)
