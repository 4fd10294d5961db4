"""A silo's DP-SGD across rounds: its ledger and budget, each round's parameters, its releases.

The agent asks :meth:`DpTrainer.plan` before training (a reason instead of parameters when the
round would pass the budget), trains with :meth:`DpTrainer.train`, and calls :meth:`DpTrainer.record` before anything
computed from the round leaves the silo.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fcmoe.config import DpConfig
from fcmoe.logs import log_event
from fcmoe.plan import RoundPlan
from silo_agent.data import ExampleBatches
from silo_agent.dp.accounting import PrivacyBudget, Release, noise_for_target
from silo_agent.dp.ledger import PrivacyLedger
from silo_agent.dp.training import DpStep, train_privately
from silo_agent.training import TrainResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundPrivacy:
    step: DpStep
    release: Release


class DpTrainer:
    def __init__(self, settings: DpConfig, pki_dir: Path, silo: str):
        self.settings = settings
        # read (and checked) at start: epsilon resumes where the ledger left it, never from zero
        self.ledger = PrivacyLedger(settings.ledger, pki_dir, silo)
        self.budget = PrivacyBudget(settings.accountant, settings.delta, settings.epsilon_budget,
                                    self.ledger.releases())
        self.noise_multiplier = settings.noise_multiplier

    def plan(self, batch_size: int, local_steps: int, num_train: int, total_rounds: int) -> RoundPrivacy | str:
        """This round's DP-SGD parameters, or why the round would pass the budget. Poisson rate from
        the batch size; sigma configured, or the smallest that spends ``target_epsilon`` over the run."""
        s = self.settings
        rate = min(1.0, batch_size / num_train)
        if self.noise_multiplier is None:
            assert s.target_epsilon is not None
            self.noise_multiplier = noise_for_target(s.target_epsilon, s.delta, rate,
                                                     max(1, total_rounds) * local_steps, s.accountant)
            log_event(log, "dp_noise_chosen", noise_multiplier=round(self.noise_multiplier, 4),
                      target_epsilon=s.target_epsilon, sample_rate=round(rate, 6))
        release = (self.noise_multiplier, rate, local_steps)
        after = self.budget.after(release)
        if after > s.epsilon_budget:
            return (f"privacy budget: this round would take epsilon from {self.budget.spent:.4g} to {after:.4g} "
                    f"> epsilon_budget {s.epsilon_budget:g} (delta {s.delta:g})")
        return RoundPrivacy(DpStep(self.noise_multiplier, s.max_grad_norm, rate), release)

    def train(self, model: nn.Module, data: ExampleBatches, plan: RoundPlan, privacy: RoundPrivacy,
              device: torch.device) -> TrainResult:
        return train_privately(model, data, plan, privacy.step, device)

    def record(self, run_id: str, round_: int, session: int, privacy: RoundPrivacy,
               released: Mapping[str, np.ndarray]) -> float:
        """Ledger first: on disk before anything computed from this training leaves the silo."""
        s = self.settings
        epsilon = self.budget.record(privacy.release)
        self.ledger.record_training(run_id=run_id, round_=round_, session=session, release=privacy.release,
                                    max_grad_norm=s.max_grad_norm, delta=s.delta, accountant=s.accountant,
                                    epsilon=epsilon, budget=s.epsilon_budget, units=released)
        sigma, rate, steps = privacy.release
        log_event(log, "privacy_spent", round=round_, epsilon=round(epsilon, 6), budget=s.epsilon_budget,
                  noise_multiplier=sigma, sample_rate=round(rate, 6), steps=steps)
        return epsilon
