"""One round's plan, one type from the strategy to the silo's trainer.

The strategy makes it (:meth:`RoundPlan.for_round`, then its own settings), the coordinator adds
what the attempt decides (mode, session, whether to evaluate) and sends it as ``TrainInstructions``
(protos/plan.py converts by field name, so the two cannot drift: tests/unit/protos/test_plan.py), the silo
reads it back and trains with :meth:`RoundPlan.for_silo`. Both seed derivations live here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config only types an argument here
    from fcmoe.config import LocalTrainingConfig

_ROUND_SEED_FACTOR = 1_000_003  # a run's seed and the round number give the round's seed
_SILO_SEED_FACTOR, _RETRAIN_SEED_FACTOR = 7919, 104_729  # ... and each silo's, and each retraining's


@dataclass(frozen=True)
class RoundPlan:
    """What every silo is asked to do in one round (docs/protocol.md, TrainInstructions)."""

    round: int = 0
    local_steps: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    clip_norm: float = 1.0  # per-unit L2 clip of the delta; 0 disables it
    prox_mu: float = 0.0  # FedProx's proximal coefficient
    seed: int = 0
    retention_lambda: float = 0.0
    retention_by_importance: bool = False
    personal_adapter: bool = False
    sketch_buckets: int = 0
    needs_signals: bool = False  # weighs by routing share and reliability: measured on rounds without evaluation too
    silo_projection: str = ""  # FC-MoE projection_side silo: the consensus direction silos project against
    reanchor_lambda: float = 0.0  # ... and how much of what it removed each silo re-anchors next round
    report_norms: bool = False  # silos report each unit's clipped delta norm (importance_measure activation_norm)
    # set by the coordinator for the attempt
    secure_mode: str = "none"
    session: int = 0
    skip_evaluation: bool = False

    @classmethod
    def for_round(cls, round_: int, local: LocalTrainingConfig, run_seed: int) -> RoundPlan:
        """The plan every strategy starts from: the configured local training, the round's seed."""
        return cls(round=round_, local_steps=local.local_steps, batch_size=local.batch_size,
                   grad_accum=local.grad_accum, learning_rate=local.learning_rate, weight_decay=local.weight_decay,
                   clip_norm=local.clip_norm, seed=run_seed * _ROUND_SEED_FACTOR + round_)

    def for_silo(self, index: int, retrain: int = 0) -> RoundPlan:
        """What silo ``index`` trains with: its own seed (another one for each retraining of the round)."""
        return replace(self, grad_accum=max(1, self.grad_accum),
                       seed=self.seed * _SILO_SEED_FACTOR + index + _RETRAIN_SEED_FACTOR * retrain)


def start_version(round_: int) -> int:
    """The global model version round ``round_`` starts from (and evaluates): version 0 is the initial
    model, and round r's aggregate becomes version r."""
    return round_ - 1
