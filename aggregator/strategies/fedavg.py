"""FedAvg (McMahan et al. 2017): the sample-weighted mean of silo deltas, applied with a server lr."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator.accumulate import GroupSum
from aggregator.server_optim import sgd_step
from aggregator.strategies.base import Strategy


class FedAvg(Strategy):
    name = "fedavg"

    def __init__(self, server_lr: float = 1.0):
        self.server_lr = server_lr

    def aggregate(self, round_: int, global_units: Mapping[str, np.ndarray], total: GroupSum) -> dict[str, np.ndarray]:
        mean = total.mean()
        return {k: sgd_step(x, mean[k], self.server_lr) for k, x in global_units.items()}
