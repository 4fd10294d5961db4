"""DP-SGD local training: Poisson-sampled batches, exact per-sample gradients, Opacus' DPOptimizer.

The mechanism only; the budget and the ledger are decided and written by the agent around it.
Each sample's whole gradient is clipped to ``max_grad_norm``: with full expert tensors (and routers)
by ghost clipping (:mod:`silo_agent.dp.ghost`: per-sample norms from token Grams, one reweighted
backward, then Opacus' ``DPOptimizerFastGradientClipping``); otherwise from exact per-sample
gradients (:class:`~silo_agent.dp.per_sample.PerSampleGradients`) clipped by Opacus' ``DPOptimizer``.
Either way the clipped sum gets Gaussian noise of standard deviation ``noise_multiplier *
max_grad_norm`` and is divided by the expected batch size, then AdamW steps. A step whose Poisson draw is empty still adds noise (a zero gradient is clipped and
noised like any other), as the accounting assumes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from torch import nn

from fcmoe.errors import ConfigError
from fcmoe.plan import RoundPlan
from silo_agent.data import ExampleBatches
from silo_agent.dp import ghost
from silo_agent.dp.per_sample import PerSampleGradients
from silo_agent.training import TrainResult


@dataclass(frozen=True)
class DpStep:
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # expected batch size / training examples


def private_step_parts(model: nn.Module, step: DpStep, expected_batch_size: int, learning_rate: float,
                       weight_decay: float = 0.0) -> tuple[ghost.GhostClipping | PerSampleGradients, DPOptimizer]:
    """Ghost clipping where every trainable tensor allows it, per-sample gradients otherwise."""
    engine: ghost.GhostClipping | PerSampleGradients
    if ghost.supports(model):
        engine, kind = ghost.GhostClipping(model, step.max_grad_norm), DPOptimizerFastGradientClipping
    else:
        engine, kind = PerSampleGradients(model), DPOptimizer
    adamw = torch.optim.AdamW(list(engine.trainable.values()), lr=learning_rate, weight_decay=weight_decay)
    return engine, kind(adamw, noise_multiplier=step.noise_multiplier, max_grad_norm=step.max_grad_norm,
                        expected_batch_size=expected_batch_size)


def check_private_step(model: nn.Module, device: torch.device) -> None:
    """Refuse at start, in one line, a model no DP engine can take (some families' layers defeat both
    ghost clipping and ``vmap``: docs/models.md), rather than failing its first private round. One
    clipped step on a made-up batch of two rows; nothing is stepped and every gradient is dropped."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = (torch.arange(16, device=device) % min(vocab, 256)).reshape(2, 8)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    try:
        engine, _ = private_step_parts(model, DpStep(1.0, 1.0, 1.0), 2, 0.0)
        engine.clip(batch)
    except Exception as exc:  # whatever the family's forward raises under the engine: named, not a traceback
        detail = " ".join(str(exc).split())[:200]
        raise ConfigError(f"silo.dp.enabled: {type(model).__name__} cannot train privately here "
                          f"({type(exc).__name__}: {detail}); docs/models.md lists the families DP supports") from None
    finally:
        for p in model.parameters():
            p.grad = None
            if hasattr(p, "grad_sample"):
                del p.grad_sample


def train_privately(model: nn.Module, data: ExampleBatches, plan: RoundPlan, step: DpStep,
                    device: torch.device) -> TrainResult:
    if plan.prox_mu > 0:
        raise ConfigError("FedProx's proximal term is not supported with DP-SGD (use fedavg, fedadam or fcmoe)")
    engine, optimizer = private_step_parts(model, step, max(1, round(step.sample_rate * len(data))),
                                           plan.learning_rate, plan.weight_decay)
    generator = torch.Generator().manual_seed(plan.seed)
    model.train()
    tokens, first, last = 0, math.nan, math.nan
    start = time.perf_counter()
    for index in range(plan.local_steps):
        optimizer.zero_grad(set_to_none=True)
        batch = data.poisson(step.sample_rate, generator)
        if batch is None:
            engine.clip_nothing()
            loss = math.nan
        else:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = float(engine.clip(batch).mean())
            tokens += int((batch["labels"][:, 1:] >= 0).sum())
        optimizer.step()
        first = loss if index == 0 else first
        last = loss
    return TrainResult(plan.local_steps, tokens, time.perf_counter() - start, first, last)
