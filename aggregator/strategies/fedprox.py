"""FedProx (Li et al. 2020): FedAvg aggregation; silos add (mu/2)||w - w_global||^2 to their loss."""

from __future__ import annotations

from aggregator.strategies.base import RoundPlan
from aggregator.strategies.fedavg import FedAvg
from fcmoe.config import LocalTrainingConfig


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(self, prox_mu: float, server_lr: float = 1.0):
        super().__init__(server_lr)
        self.prox_mu = prox_mu

    def configure_round(self, round_: int, local: LocalTrainingConfig, seed: int) -> RoundPlan:
        plan = super().configure_round(round_, local, seed)
        return RoundPlan(round=plan.round, local=plan.local, prox_mu=self.prox_mu, seed=plan.seed)
