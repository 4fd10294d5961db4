"""Aggregation strategies, one per file, behind :class:`~aggregator.strategies.base.Strategy`."""

from aggregator.strategies.base import RoundPlan, SiloReport, Strategy
from aggregator.strategies.fcmoe import FcMoe
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedmoe import FedMoe
from aggregator.strategies.fedopt import FedAdam, FedAvgM
from aggregator.strategies.fedprox import FedProx
from aggregator.strategies.local import LocalOnly
from fcmoe.config import StrategyConfig


def build_strategy(config: StrategyConfig, min_group_size: int = 3) -> Strategy:
    if config.name == "fedavg":
        return FedAvg(config.server_lr)
    if config.name == "fedprox":
        return FedProx(config.prox_mu, config.server_lr)
    if config.name == "fedavgm":
        return FedAvgM(config.server_lr, config.momentum)
    if config.name == "local":
        return LocalOnly(config.server_lr)
    if config.name == "fcmoe":
        return FcMoe(config.fcmoe, min_group_size, config.server_lr)
    if config.name == "fedmoe":
        return FedMoe(config.server_lr)
    return FedAdam(config.server_lr, config.beta1, config.beta2, config.tau)


__all__ = ["FcMoe", "FedAdam", "FedAvg", "FedAvgM", "FedMoe", "FedProx", "LocalOnly", "RoundPlan", "SiloReport",
           "Strategy", "build_strategy"]
