"""Summing silo payloads into group sums: the only code that touches an individual silo's payload.

Strategies receive :class:`GroupSum` values per (unit, group), never a single silo's update. The
coefficient ``alpha_i,u`` and group of every silo come from the aggregator's own plan, never from the
silo's message, and the payload is ``alpha_i,u * delta_i,u``. With secure aggregation this plaintext
adder is replaced by unmasking; everything downstream stays unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fcmoe.errors import ProtocolError


@dataclass(frozen=True)
class GroupSum:
    """``sum_i alpha_i,u delta_i,u`` over a group's contributors, ``sum_i alpha_i,u`` and their count.
    The vector is float64, the precision sums are taken in, until the strategy's result becomes the
    float32 global model: one cast, at the end."""

    vector: np.ndarray
    weight: float
    count: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", np.asarray(self.vector, dtype=np.float64))


@dataclass(frozen=True)
class Coefficients:
    """The upload plan of a round: alpha and group per silo and unit."""

    alpha: Mapping[str, Mapping[str, float]]
    group: Mapping[str, Mapping[str, int]]


UnitSums = Mapping[str, Mapping[int, GroupSum]]


def total_weight(groups: Mapping[int, GroupSum]) -> float:
    return float(sum(g.weight for g in groups.values()))


def weighted_mean(groups: Mapping[int, GroupSum]) -> np.ndarray:
    weight = total_weight(groups)
    if weight <= 0:
        raise ProtocolError("no weight in any group; nothing to average")
    return (sum(g.vector for g in groups.values()) / weight).astype(np.float32)


def merge_small_groups(sums: UnitSums, min_group_size: int) -> dict[str, dict[int, GroupSum]]:
    """One group per unit wherever a group ended up smaller than ``min_group_size`` (upload dropouts):
    the aggregator never uses a sum over fewer silos than that while another group exists."""
    out: dict[str, dict[int, GroupSum]] = {}
    for unit, groups in sums.items():
        if len(groups) > 1 and min(g.count for g in groups.values()) < min_group_size:
            merged = GroupSum(sum(g.vector for g in groups.values()),
                              total_weight(groups), sum(g.count for g in groups.values()))
            out[unit] = {0: merged}
        else:
            out[unit] = dict(groups)
    return out


def regroup(plan: Coefficients, silos: set[str] | frozenset[str], min_group_size: int) -> Coefficients:
    """The plan restricted to ``silos`` (those still in the round), with one group per unit wherever
    a group would otherwise be smaller than ``min_group_size``. Used before masked uploads, whose
    group sums cannot be merged after the fact without unmasking the small group on its own."""
    alpha = {s: dict(a) for s, a in plan.alpha.items() if s in silos}
    group = {s: dict(g) for s, g in plan.group.items() if s in silos}
    units = next(iter(group.values()), {}).keys()
    for unit in units:
        sizes: dict[int, int] = {}
        for g in group.values():
            sizes[g[unit]] = sizes.get(g[unit], 0) + 1
        if len(sizes) > 1 and min(sizes.values()) < min_group_size:
            for g in group.values():
                g[unit] = 0
    return Coefficients(alpha, group)


def floor_coefficients(plan: Coefficients, min_weight_ratio: float) -> Coefficients:
    """Every coefficient raised to at least ``min_weight_ratio`` of the largest in its (unit, group).

    A masked or encrypted sum reveals only the sum, but a sum in which the other members weigh
    (almost) nothing is one silo's vector; silos refuse such plans (crypto/secagg.py
    ``weight_policy_violation``), so the honest aggregator never makes one. Strategies normalise by
    the group's total weight, which travels with each sum, so a floored plan stays consistent."""
    alpha = {s: dict(a) for s, a in plan.alpha.items()}
    units = next(iter(plan.group.values()), {}).keys()
    for unit in units:
        largest: dict[int, float] = {}
        for s, g in plan.group.items():
            largest[g[unit]] = max(largest.get(g[unit], 0.0), alpha[s][unit])
        for s, g in plan.group.items():
            alpha[s][unit] = max(alpha[s][unit], min_weight_ratio * largest[g[unit]])
    return Coefficients(alpha, plan.group)


def clip_bound(alpha: float, clip_norm: float) -> float:
    """Largest norm ``alpha * delta`` may have when every delta was clipped to ``clip_norm``."""
    return abs(alpha) * clip_norm * (1 + 1e-3) + 1e-6


class PlaintextAccumulator:
    """Adds payloads as they arrive (mode: none): one running sum per (unit, group), none per silo."""

    def __init__(self, unit_sizes: Mapping[str, int], plan: Coefficients, clip_norm: float = 0.0):
        self._plan = plan
        self._clip = clip_norm
        self._sizes = dict(unit_sizes)
        self._sums: dict[tuple[str, int], np.ndarray] = {}
        self._weights: dict[tuple[str, int], float] = {}
        self._counts: dict[tuple[str, int], int] = {}
        self._members: set[str] = set()

    def add(self, silo: str, payload: Mapping[str, np.ndarray]) -> None:
        if silo in self._members:
            raise ProtocolError(f"silo {silo!r} already contributed to this round", "ALREADY_EXISTS")
        if silo not in self._plan.alpha:
            raise ProtocolError(f"silo {silo!r} has no coefficients this round", "PERMISSION_DENIED")
        if set(payload) != set(self._sizes):
            raise ProtocolError(f"silo {silo!r}: payload units do not match the layout", "INVALID_ARGUMENT")
        for unit, vec in payload.items():
            if not np.all(np.isfinite(vec)):
                raise ProtocolError(f"silo {silo!r}: unit {unit} contains NaN or infinity", "INVALID_ARGUMENT")
        alpha, group = self._plan.alpha[silo], self._plan.group[silo]
        if self._clip > 0:  # every delta was clipped to C, so ||alpha * delta|| <= alpha * C
            for unit, vec in payload.items():
                if float(np.linalg.norm(vec.astype(np.float64))) > clip_bound(alpha[unit], self._clip):
                    raise ProtocolError(f"silo {silo!r}: unit {unit} exceeds alpha * clip_norm", "INVALID_ARGUMENT")
        for unit, vec in payload.items():
            key = (unit, group[unit])
            if key not in self._sums:
                self._sums[key] = np.zeros(self._sizes[unit], dtype=np.float64)
            self._sums[key] += vec
            self._weights[key] = self._weights.get(key, 0.0) + alpha[unit]
            self._counts[key] = self._counts.get(key, 0) + 1
        self._members.add(silo)

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._members)

    def result(self) -> dict[str, dict[int, GroupSum]]:
        out: dict[str, dict[int, GroupSum]] = {u: {} for u in self._sizes}
        for (unit, group), vec in self._sums.items():
            out[unit][group] = GroupSum(vec, self._weights[(unit, group)],
                                        self._counts[(unit, group)])
        return out
