"""Summing silo payloads into group sums: the only code that touches an individual silo's payload.

Strategies receive :class:`GroupSum` objects, never a single silo's update; with secure aggregation
the plaintext adder below is replaced by unmasking, and everything downstream stays unchanged.
A silo's payload is ``w_i * delta_i`` per unit plus its scalar weight ``w_i``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fcmoe.errors import ProtocolError


@dataclass(frozen=True)
class GroupSum:
    """Sum over the members of a group: ``sum_i w_i delta_i`` per unit, ``sum_i w_i`` and the count."""

    units: Mapping[str, np.ndarray]
    weight: float
    count: int

    def mean(self) -> dict[str, np.ndarray]:
        if self.weight <= 0:
            raise ProtocolError("group has no weight; nothing to average")
        return {k: (v / self.weight).astype(np.float32) for k, v in self.units.items()}


class PlaintextAccumulator:
    """Adds payloads as they arrive (mode: none). Keeps one running sum per unit, not per silo."""

    def __init__(self, unit_sizes: Mapping[str, int]):
        self._sums = {k: np.zeros(n, dtype=np.float64) for k, n in unit_sizes.items()}
        self._weight = 0.0
        self._members: set[str] = set()

    def add(self, silo: str, weight: float, payload: Mapping[str, np.ndarray]) -> None:
        if silo in self._members:
            raise ProtocolError(f"silo {silo!r} already contributed to this round")
        if not np.isfinite(weight) or weight <= 0:
            raise ProtocolError(f"silo {silo!r}: weight {weight} must be finite and positive")
        if set(payload) != set(self._sums):
            raise ProtocolError(f"silo {silo!r}: payload units do not match the layout")
        for key, vec in payload.items():
            if not np.all(np.isfinite(vec)):
                raise ProtocolError(f"silo {silo!r}: unit {key} contains NaN or infinity")
        for key, vec in payload.items():
            self._sums[key] += vec
        self._weight += weight
        self._members.add(silo)

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._members)

    def result(self) -> GroupSum:
        return GroupSum(
            units={k: v.astype(np.float32) for k, v in self._sums.items()},
            weight=self._weight,
            count=len(self._members),
        )
