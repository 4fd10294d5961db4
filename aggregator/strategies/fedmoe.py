"""FedMoE-style aggregation: each expert averaged only over the silos that activated it.

The baseline for FC-MoE's importance weighting without its graded routing weight, reliability or
consensus: ``alpha_i,u = n_i * 1[share_i,u > 0]`` (normalised by the group's total weight downstream),
so a silo whose data never routed a token to an expert does not dilute that expert's update with its
(zero or weight-decay-only) delta. Non-expert units (attention, router, shared experts) report share
1.0 and are therefore plain FedAvg; an expert no silo activated gets no weight and keeps its old value
(:meth:`Strategy.aggregate`). Silos meter routing shares every round, evaluated or not
(``needs_signals``); no sketches are asked for.

The coordinator floors every plan, in every mode, to ``secure_aggregation.min_weight_ratio`` (0.1 by
default) of the largest coefficient of its (unit, group) (``floor_coefficients``): masked sums must not
be one silo's vector. Under masking, and in mode none unless that ratio is set to 0, an inactive silo
therefore still weighs that small fraction wherever another silo activated the expert.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from aggregator.accumulate import Coefficients
from aggregator.strategies.base import SiloReport, Strategy
from fcmoe.config import LocalTrainingConfig
from fcmoe.plan import RoundPlan


class FedMoe(Strategy):
    name = "fedmoe"

    def configure_round(self, round_: int, local: LocalTrainingConfig, seed: int) -> RoundPlan:
        """Routing shares are what this strategy weighs by: metered on rounds without evaluation too."""
        return replace(super().configure_round(round_, local, seed), needs_signals=True)

    def coefficients(self, round_: int, units: list[str], reports: Mapping[str, SiloReport],
                     agreement: Mapping[str, Mapping[str, float]] | None = None) -> Coefficients:
        """``alpha_i,u = n_i`` where silo i routed any token to unit u, else 0; one group."""
        alpha = {x: {u: float(r.num_examples) if r.routing_share[u] > 0 else 0.0 for u in units}
                 for x, r in reports.items()}
        inactive = sum(1 for r in reports.values() for u in units if not r.routing_share[u] > 0)
        self.diagnostics = {"inactive_assignments": float(inactive)}
        return Coefficients(alpha, {x: {u: 0 for u in units} for x in reports})
