"""The strategy interface: configure a round, aggregate its group sums (in the spirit of Flower's).

A strategy never sees an individual silo's update, only :class:`GroupSum` values; it returns the next
global model as one float32 vector per unit. Its server-side state (momentum, Adam moments) is
exposed as arrays so checkpoints can save and restore it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from aggregator.accumulate import GroupSum
from fcmoe.config import LocalTrainingConfig


@dataclass(frozen=True)
class RoundPlan:
    """What every silo is asked to do in one round."""

    round: int
    local: LocalTrainingConfig
    prox_mu: float = 0.0
    seed: int = 0


class Strategy(ABC):
    name: str = "strategy"

    def configure_round(self, round_: int, local: LocalTrainingConfig, seed: int) -> RoundPlan:
        return RoundPlan(round=round_, local=local, seed=seed * 1_000_003 + round_)

    @abstractmethod
    def aggregate(
        self, round_: int, global_units: Mapping[str, np.ndarray], total: GroupSum
    ) -> dict[str, np.ndarray]:
        """Next global model from the current one and the round's sum of weighted deltas."""

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        if arrays:
            raise ValueError(f"strategy {self.name} keeps no state, got {sorted(arrays)[:3]}")
