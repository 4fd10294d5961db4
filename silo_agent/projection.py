"""Silo-side consensus projection and residual re-anchoring (the FC-MoE paper's variant). Pure maths.

Per unit u, with the silo's clipped delta ``x`` and a consensus direction ``d`` every silo may know:

    if cos(x, d) < 0:   kept = x - (<x, d> / ||d||^2) d,   removed = x - kept     (projection onto d's normal plane)
    else:               kept = x,                          removed = 0
    next start         = global + lambda * removed                                 (residual re-anchoring)

The silo uploads ``kept`` (masked like any update: the projection ran before masking, so it is exact
under secure aggregation) and keeps ``removed`` to itself. The consensus direction here is the
previous round's global update, ``G_{r-1} - G_{r-2}``, which every silo downloads anyway
(:class:`GlobalHistory`); docs/algorithm.md says why the round's sketch sums cannot stand in for it.
The aggregator-side variant (projection of group sums) is aggregator/strategies/fcmoe/projection.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


CONSENSUS_DIRECTIONS = ("previous_global",)


def instruction_refusal(silo_projection: str, reanchor_lambda: float) -> str | None:
    """Why a silo declines the round's projection settings, or None. They come from the aggregator:
    an unknown direction, or a re-anchoring factor outside [0, 1] (which would push the silo's start
    away from the global model by more than it ever projected away), is refused, never trusted."""
    if silo_projection and silo_projection not in CONSENSUS_DIRECTIONS:
        return f"silo_projection {silo_projection!r} is unknown to this silo ({', '.join(CONSENSUS_DIRECTIONS)} is)"
    if not 0.0 <= reanchor_lambda <= 1.0:  # also refuses NaN
        return f"reanchor_lambda {reanchor_lambda!r} outside [0, 1]"
    return None


def project_against(delta: np.ndarray, direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, removed)`` of one unit's delta against a consensus direction; ``kept + removed = delta``.

    Projected onto the direction's normal plane only when the two oppose (cosine < 0); a zero
    direction or a zero delta has no cosine and is left as it is (``removed`` = 0)."""
    x = np.asarray(delta)
    x64, d64 = x.astype(np.float64).reshape(-1), np.asarray(direction, dtype=np.float64).reshape(-1)
    if x64.shape != d64.shape:
        raise ValueError(f"delta has {x64.size} numbers, direction {d64.size}")
    dot, norm2 = float(x64 @ d64), float(d64 @ d64)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
    if dot >= 0 or norm2 == 0:  # no conflict, zero direction; a zero delta has dot = 0
        return x.astype(dtype, copy=True), np.zeros_like(x, dtype=dtype)
    removed = ((dot / norm2) * d64).reshape(x.shape)
    kept = x.astype(np.float64) - removed
    return kept.astype(dtype), removed.astype(dtype)


def opposed_units(deltas: Mapping[str, np.ndarray], directions: Mapping[str, np.ndarray] | None,
                  units: Sequence[str] | None = None) -> tuple[int, int]:
    """``(opposed, compared)``: of ``units`` (default all) with a non-zero delta and direction, how many
    deltas have a negative cosine with their direction -- the updates silo-side projection would
    project. A diagnostic of how much a round's updates conflict, whatever the strategy."""
    if directions is None:
        return 0, 0
    opposed = compared = 0
    for unit in deltas if units is None else units:
        d = directions.get(unit)
        if d is None:
            continue
        x64, d64 = np.asarray(deltas[unit], dtype=np.float64).reshape(-1), np.asarray(d, dtype=np.float64).reshape(-1)
        if not x64.any() or not d64.any():
            continue
        compared += 1
        opposed += int(float(x64 @ d64) < 0)
    return opposed, compared


def project_units(deltas: Mapping[str, np.ndarray], directions: Mapping[str, np.ndarray] | None
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """:func:`project_against` per unit; a unit without a direction (none known yet) is kept whole."""
    kept, removed = {}, {}
    for unit, delta in deltas.items():
        direction = None if directions is None else directions.get(unit)
        if direction is None:
            kept[unit], removed[unit] = np.array(delta, copy=True), np.zeros_like(delta)
        else:
            kept[unit], removed[unit] = project_against(delta, direction)
    return kept, removed


def reanchor(start: Mapping[str, np.ndarray], residual: Mapping[str, np.ndarray] | None, lam: float
             ) -> dict[str, np.ndarray]:
    """``start + lam * residual`` per unit (units without a residual start where they are)."""
    out = {}
    for unit, s in start.items():
        r = None if residual is None else residual.get(unit)
        if r is None or lam == 0:
            out[unit] = np.array(s, copy=True)
        else:
            out[unit] = (s.astype(np.float64) + lam * r.astype(np.float64)).astype(s.dtype)
    return out


class GlobalHistory:
    """The last two global models a silo received, by version: the previous global update is the
    consensus direction of silo-side projection, known to every silo and to nobody's detriment."""

    def __init__(self) -> None:
        self.versions: dict[int, dict[str, np.ndarray]] = {}

    def keep(self, version: int, units: Mapping[str, np.ndarray]) -> None:
        self.versions[version] = {u: np.array(v, copy=True) for u, v in units.items()}
        for old in sorted(self.versions)[:-2]:
            del self.versions[old]

    def direction(self, version: int) -> tuple[dict[str, np.ndarray] | None, int | None]:
        """``G_version - G_v'`` with ``v'`` the latest earlier version held (``version - 1`` when the silo
        took part in the last round), and ``v'``; ``(None, None)`` when there is none (first round)."""
        current = self.versions.get(version)
        earlier = [v for v in self.versions if v < version]
        if current is None or not earlier:
            return None, None
        previous = self.versions[max(earlier)]
        return {u: (current[u].astype(np.float64) - previous[u].astype(np.float64)).astype(np.float32)
                for u in current}, max(earlier)


class ResidualBook:
    """What silo-side projection removed, per round: round r starts from ``G + lambda * removed`` of the
    latest earlier round. Kept per round so that a round trained afresh (a redo) re-anchors the same."""

    def __init__(self) -> None:
        self.rounds: dict[int, dict[str, np.ndarray]] = {}

    def keep(self, round_: int, removed: Mapping[str, np.ndarray]) -> None:
        self.rounds[round_] = dict(removed)
        for old in sorted(self.rounds)[:-2]:
            del self.rounds[old]

    def before(self, round_: int) -> dict[str, np.ndarray] | None:
        earlier = [r for r in self.rounds if r < round_]
        return self.rounds[max(earlier)] if earlier else None
