"""Local-only training: the baseline where silos never benefit from each other.

The global model never moves, and each silo keeps training its own model (retention with lambda = 1
and no importance scaling re-anchors its whole residual every round), through the same round path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from aggregator.accumulate import UnitSums
from aggregator.strategies.base import Strategy
from fcmoe.config import LocalTrainingConfig
from fcmoe.plan import RoundPlan


class LocalOnly(Strategy):
    name = "local"

    def configure_round(self, round_: int, local: LocalTrainingConfig, seed: int) -> RoundPlan:
        return replace(super().configure_round(round_, local, seed), retention_lambda=1.0,
                       retention_by_importance=False)

    def aggregate(self, round_: int, global_units: Mapping[str, np.ndarray], sums: UnitSums) -> dict[str, np.ndarray]:
        return dict(global_units)
