"""FC-MoE (arXiv 2606.15625): importance-aware weighting, consensus projection, local retention.

Per expert unit: importance weights from routing share, sample count and reliability; agreement of
each silo's keyed sketch with the leave-one-out consensus (cosine and sign; each silo scores itself
against the unmasked sum of the importance-weighted sketches and sends only that scalar); consensus and conflict
groups; coefficients alpha = w * phi(agreement). On the exact group sums, a conflict sum that opposes
the consensus sum is projected onto its normal plane before the two are combined. Silos keep a
personal adapter that learns their residual over the global model (retention, silo side,
silo_agent/personal.py). The paper's own variants are options (docs/algorithm.md): importance from
routing share x update norm, and projection on the silo side against the last global update, with the
removed part re-anchored. Each mechanism can be switched off for ablations; with all three off this is
FedAvg with keyed sketches computed and ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from aggregator.strategies.fcmoe import consensus
from aggregator.accumulate import Coefficients, GroupSum
from aggregator.strategies.fcmoe.projection import combine
from aggregator.strategies.base import SiloReport, Strategy
from fcmoe.config import FcMoeConfig, FcMoeStrategyConfig, LocalTrainingConfig
from fcmoe.plan import RoundPlan


class FcMoe(Strategy):
    name = "fcmoe"

    def __init__(self, settings: FcMoeConfig, min_group_size: int, server_lr: float = 1.0):
        super().__init__(server_lr)
        self.settings = settings
        self.min_group_size = min_group_size

    @classmethod
    def from_config(cls, config: FcMoeStrategyConfig, min_group_size: int) -> "FcMoe":
        return cls(config.fcmoe, min_group_size, config.server_lr)

    @property
    def silo_side(self) -> bool:
        """The paper's variant: silos project their own deltas (silo_agent/projection.py), so the aggregator
        neither groups nor projects, and needs no sketches for it."""
        return self.settings.projection and self.settings.projection_side == "silo"

    @property
    def activation_norm(self) -> bool:
        return self.settings.importance and self.settings.importance_measure == "activation_norm"

    def configure_round(self, round_: int, local: LocalTrainingConfig, seed: int) -> RoundPlan:
        s = self.settings
        return replace(super().configure_round(round_, local, seed),
                       retention_lambda=s.retention_lambda if s.retention else 0.0,
                       retention_by_importance=s.importance, personal_adapter=s.retention,
                       sketch_buckets=0 if self.silo_side else s.sketch_buckets, needs_signals=s.importance,
                       silo_projection=s.consensus_direction if self.silo_side else "",
                       reanchor_lambda=s.reanchor,
                       report_norms=self.activation_norm)

    def _weights(self, units: list[str], reports: Mapping[str, SiloReport]) -> tuple[list[str], np.ndarray]:
        s = self.settings
        silos = sorted(reports)
        if self.activation_norm:
            missing = [x for x in silos if reports[x].unit_norm is None]
            if missing:
                raise ValueError(f"importance_measure activation_norm: no unit norms from {missing}")
            share = np.array([[reports[x].routing_share[u] for u in units] for x in silos])
            norm = np.array([[reports[x].unit_norm[u] for u in units] for x in silos])
            return silos, consensus.normalise(consensus.activation_norm_importance(share, norm))
        n = np.array([reports[x].num_examples for x in silos])
        rel = consensus.reliability_weight([reports[x].reliability for x in silos], s.reliability_floor,
                                           s.reliability_saturation)
        share = np.array([[reports[x].routing_share[u] for u in units] for x in silos])
        return silos, consensus.normalise(consensus.importance(
            n, rel, share, use_routing=s.importance, use_reliability=s.importance, routing_power=s.routing_power))

    def sketch_weights(self, round_: int, units: list[str], reports: Mapping[str, SiloReport]) -> Coefficients:
        """The importance weights ``w_i,u``: the consensus sketch of a unit is ``sum_i w_i,u y_i,u``."""
        silos, weights = self._weights(units, reports)
        return Coefficients({x: {u: float(weights[i, j]) for j, u in enumerate(units)} for i, x in enumerate(silos)},
                            {x: {u: 0 for u in units} for x in silos})

    def coefficients(self, round_: int, units: list[str], reports: Mapping[str, SiloReport],
                     agreement: Mapping[str, Mapping[str, float]] | None = None) -> Coefficients:
        s = self.settings
        silos, weights = self._weights(units, reports)
        agreement = agreement or {}
        alpha: dict[str, dict[str, float]] = {x: {} for x in silos}
        group: dict[str, dict[str, int]] = {x: {} for x in silos}
        conflicts, agreement_sum = 0, 0.0
        for j, unit in enumerate(units):
            w = weights[:, j]
            # a silo that sent no sketch (none asked for, or it dropped out of the sketch stage) agrees
            score = np.array([agreement.get(x, {}).get(unit, 1.0) for x in silos])
            if s.projection and not self.silo_side:
                groups = consensus.partition(score, self.min_group_size, s.conflict_threshold)
                factors = consensus.phi(score, s.phi_floor)
            else:
                groups, factors = np.zeros(len(silos), dtype=int), np.ones(len(silos))
            a = consensus.coefficients(w, factors)
            for i, x in enumerate(silos):
                alpha[x][unit], group[x][unit] = float(a[i]), int(groups[i])
            conflicts += int((groups == consensus.CONFLICT).sum())
            agreement_sum += float(score.mean())
        self.diagnostics = {"conflict_assignments": conflicts, "mean_agreement": agreement_sum / max(1, len(units))}
        return Coefficients(alpha, group)

    def combine(self, unit: str, groups: Mapping[int, GroupSum]) -> np.ndarray:
        return combine(groups, project=self.settings.projection and not self.silo_side)
