"""The strategy interface, in the spirit of Flower's: configure a round, weigh it, aggregate it.

A round has two phases. Every silo first reports what is needed to weigh it (sample count,
reliability, routing shares: :class:`SiloReport`); a strategy that wants a consensus (FC-MoE) then
gets each silo's agreement score per unit, which silos compute themselves against the securely summed
sketches weighted by :meth:`Strategy.sketch_weights`; :meth:`Strategy.coefficients` turns reports and
agreement into each silo's coefficient and group per unit. Silos then upload
``alpha * delta``; :meth:`Strategy.aggregate` receives only group sums per unit and returns the next
global model. Baselines and FC-MoE go through the same path; the default coefficients are FedAvg's
(sample count, one group).
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.accumulate import Coefficients, UnitSums, total_weight, weighted_mean
from aggregator.server_optim import sgd_step
from fcmoe.config import LocalTrainingConfig
from fcmoe.plan import RoundPlan


@dataclass(frozen=True)
class SiloReport:
    """Phase-1 report of one silo, validated against the layout."""

    num_examples: float
    reliability: float
    routing_share: Mapping[str, float]
    unit_norm: Mapping[str, float] | None = None  # only when the round asked for it (RoundPlan.report_norms)


class Strategy(ABC):
    name: str = "strategy"  # the config's ``federation.strategy.name`` that picks this class

    def __init__(self, server_lr: float = 1.0):
        self.server_lr = server_lr
        self.diagnostics: dict[str, float] = {}

    @classmethod
    def from_config(cls, config: Any, min_group_size: int) -> "Strategy":
        """This strategy from its own settings class (fcmoe.config.STRATEGY_CONFIGS[name])."""
        return cls(config.server_lr)

    def configure_round(self, round_: int, local: LocalTrainingConfig, seed: int) -> RoundPlan:
        return RoundPlan.for_round(round_, local, seed)

    def sketch_weights(self, round_: int, units: list[str], reports: Mapping[str, SiloReport]) -> Coefficients:
        """Weights of the sketch sums (only asked for when :attr:`RoundPlan.sketch_buckets` > 0)."""
        return self.coefficients(round_, units, reports)

    def coefficients(self, round_: int, units: list[str], reports: Mapping[str, SiloReport],
                     agreement: Mapping[str, Mapping[str, float]] | None = None) -> Coefficients:
        """FedAvg's: alpha_i,u = n_i for every unit, one group (agreement scores are not used)."""
        alpha = {s: {u: float(r.num_examples) for u in units} for s, r in reports.items()}
        return Coefficients(alpha, {s: {u: 0 for u in units} for s in reports})

    def combine(self, unit: str, groups: Mapping) -> np.ndarray:
        """A unit's averaged update from its group sums."""
        return weighted_mean(groups)

    def apply(self, unit: str, x: np.ndarray, update: np.ndarray) -> np.ndarray:
        """Server optimizer step for one unit."""
        return sgd_step(x, update, self.server_lr)

    def aggregate(self, round_: int, global_units: Mapping[str, np.ndarray], sums: UnitSums) -> dict[str, np.ndarray]:
        """Next global model; a unit no silo contributed weight to stays as it is."""
        return {u: self.apply(u, x, self.combine(u, sums[u])) if sums.get(u) and total_weight(sums[u]) > 0 else x
                for u, x in global_units.items()}

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        if arrays:
            raise ValueError(f"strategy {self.name} keeps no state, got {sorted(arrays)[:3]}")
