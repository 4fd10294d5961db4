"""Aggregation strategies, one per file, behind :class:`~aggregator.strategies.base.Strategy`."""

from aggregator.strategies.base import RoundPlan, Strategy
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedopt import FedAdam, FedAvgM
from aggregator.strategies.fedprox import FedProx
from fcmoe.config import StrategyConfig


def build_strategy(config: StrategyConfig) -> Strategy:
    if config.name == "fedavg":
        return FedAvg(config.server_lr)
    if config.name == "fedprox":
        return FedProx(config.prox_mu, config.server_lr)
    if config.name == "fedavgm":
        return FedAvgM(config.server_lr, config.momentum)
    return FedAdam(config.server_lr, config.beta1, config.beta2, config.tau)


__all__ = ["FedAdam", "FedAvg", "FedAvgM", "FedProx", "RoundPlan", "Strategy", "build_strategy"]
