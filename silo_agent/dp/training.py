"""DP-SGD local training: Poisson-sampled batches, exact per-sample gradients, Opacus' DPOptimizer.

The mechanism only; the budget and the ledger are decided and written by the agent around it.
Per-sample gradients come from :class:`~silo_agent.dp.per_sample.PerSampleGradients`; Opacus'
``DPOptimizer`` clips each sample's whole gradient to ``max_grad_norm``, sums, adds Gaussian noise of
standard deviation ``noise_multiplier * max_grad_norm`` and divides by the expected batch size, then
AdamW steps. A step whose Poisson draw is empty still adds noise (a zero gradient is clipped and
noised like any other), as the accounting assumes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from fcmoe.errors import ConfigError
from silo_agent.data import ExampleBatches
from silo_agent.dp.per_sample import PerSampleGradients
from silo_agent.training import LocalPlan, TrainResult


@dataclass(frozen=True)
class DpStep:
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # expected batch size / training examples


def train_privately(model: nn.Module, data: ExampleBatches, plan: LocalPlan, step: DpStep,
                    device: torch.device) -> TrainResult:
    if plan.prox_mu > 0:
        raise ConfigError("FedProx's proximal term is not supported with DP-SGD (use fedavg, fedadam or fcmoe)")
    engine = PerSampleGradients(model)
    params = list(engine.trainable.values())
    expected = max(1, round(step.sample_rate * len(data)))
    optimizer = DPOptimizer(torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=plan.weight_decay),
                            noise_multiplier=step.noise_multiplier, max_grad_norm=step.max_grad_norm,
                            expected_batch_size=expected)
    generator = torch.Generator().manual_seed(plan.seed)
    model.train()
    tokens, first, last = 0, math.nan, math.nan
    start = time.perf_counter()
    for index in range(plan.local_steps):
        optimizer.zero_grad(set_to_none=True)
        batch = data.poisson(step.sample_rate, generator)
        if batch is None:
            for p in params:
                p.grad_sample = torch.zeros((1, *p.shape), dtype=p.dtype, device=p.device)
            loss = math.nan
        else:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = float(engine.attach(batch).mean())
            tokens += int((batch["labels"][:, 1:] >= 0).sum())
        optimizer.step()
        first = loss if index == 0 else first
        last = loss
    return TrainResult(plan.local_steps, tokens, time.perf_counter() - start, first, last)
