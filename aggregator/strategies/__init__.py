"""Aggregation strategies, one per file (FC-MoE's pieces in one folder), behind
:class:`~aggregator.strategies.base.Strategy`, registered by the name the config picks them with."""

from aggregator.strategies.base import SiloReport, Strategy
from aggregator.strategies.fcmoe import FcMoe
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedmoe import FedMoe
from aggregator.strategies.fedopt import FedAdam, FedAvgM
from aggregator.strategies.fedprox import FedProx
from aggregator.strategies.local import LocalOnly
from fcmoe.config import StrategyConfig
from fcmoe.errors import ConfigError

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam, LocalOnly,
                                                                    FcMoe, FedMoe)}


def build_strategy(config: StrategyConfig, min_group_size: int = 3) -> Strategy:
    """The strategy ``config.name`` names, from its settings; a name without one is an error, never a default."""
    cls = STRATEGIES.get(config.name)
    if cls is None:
        raise ConfigError(f"federation.strategy.name = {config.name!r}: no such strategy "
                          f"(known: {', '.join(STRATEGIES)})")
    return cls.from_config(config, min_group_size)


__all__ = ["STRATEGIES", "FcMoe", "FedAdam", "FedAvg", "FedAvgM", "FedMoe", "FedProx", "LocalOnly", "SiloReport",
           "Strategy", "build_strategy"]
