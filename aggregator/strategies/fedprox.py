"""FedProx (Li et al. 2020): FedAvg aggregation; silos add (mu/2)||w - w_global||^2 to their loss."""

from __future__ import annotations

from dataclasses import replace

from aggregator.strategies.base import Strategy
from fcmoe.config import FedProxConfig, LocalTrainingConfig
from fcmoe.plan import RoundPlan


class FedProx(Strategy):
    name = "fedprox"

    def __init__(self, prox_mu: float, server_lr: float = 1.0):
        super().__init__(server_lr)
        self.prox_mu = prox_mu

    @classmethod
    def from_config(cls, config: FedProxConfig, min_group_size: int) -> "FedProx":
        return cls(config.prox_mu, config.server_lr)

    def configure_round(self, round_: int, local: LocalTrainingConfig, seed: int) -> RoundPlan:
        return replace(super().configure_round(round_, local, seed), prox_mu=self.prox_mu)
