"""Local training and evaluation inside a silo (AdamW, gradient accumulation, optional FedProx term)."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from fcmoe.plan import RoundPlan
from silo_agent.data import IGNORE_INDEX, ExampleBatches
from silo_agent.personal import PersonalAdapter, attached
from silo_agent.routing import RoutingMeter


@dataclass(frozen=True)
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    loss_first: float
    loss_last: float


def token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token loss ``[B, T-1]`` and the mask of positions that count."""
    return logit_losses(forward_logits(model, batch), batch)


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def logit_losses(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    losses = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp_min(0), reduction="none"
    ).view_as(labels)
    mask = labels != IGNORE_INDEX
    return losses * mask, mask


def train_locally(model: nn.Module, data: ExampleBatches, plan: RoundPlan, device: torch.device,
                  progress: bool = False, adapter: PersonalAdapter | None = None) -> TrainResult:
    """AdamW on the model's loss; with ``adapter``, every step also trains the silo's personal adapter
    on the same batch (detached: the model's gradients are those it would have without it)."""
    with attached(adapter, model):
        return _train(model, data, plan, device, progress, adapter)


def _train(model: nn.Module, data: ExampleBatches, plan: RoundPlan, device: torch.device, progress: bool,
           adapter: PersonalAdapter | None) -> TrainResult:
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if plan.prox_mu > 0 else None
    optimizer = torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=plan.weight_decay)
    generator = torch.Generator().manual_seed(plan.seed)
    model.train()
    steps = range(plan.local_steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="local steps", unit="step", leave=False)
    tokens, first, last = 0, math.nan, math.nan
    start = time.perf_counter()
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        scored = torch.zeros(3, device=device)  # the step's summed token losses (model, personal) and tokens
        for _ in range(plan.grad_accum):
            batch = {k: v.to(device) for k, v in data.sample(plan.batch_size, generator).items()}
            logits = forward_logits(model, batch)
            losses, mask = logit_losses(logits, batch)
            loss = losses.sum() / mask.sum().clamp_min(1)
            if adapter is not None:  # a separate graph: its loss reaches the adapter only
                personal, _ = logit_losses(adapter.personalise(logits), batch)
                (personal.sum() / mask.sum().clamp_min(1) / plan.grad_accum).backward()
                scored += torch.stack([losses.sum(), personal.sum(), mask.sum()]).detach()
            if anchor is not None:
                loss = loss + 0.5 * plan.prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
            (loss / plan.grad_accum).backward()
            step_loss += loss.item() / plan.grad_accum
            tokens += int(mask.sum())
        optimizer.step()
        if adapter is not None:  # scored on the step's batches before either stepped on them
            model_sum, personal_sum, count = scored.tolist()
            adapter.score(model_sum / max(count, 1.0), personal_sum / max(count, 1.0))
            adapter.step()
        first = step_loss if step == 0 else first
        last = step_loss
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return TrainResult(plan.local_steps, tokens, time.perf_counter() - start, first, last)


@torch.no_grad()
def evaluate(model: nn.Module, data: ExampleBatches, device: torch.device, batch_size: int,
             adapter: PersonalAdapter | None = None, meter: RoutingMeter | None = None,
             max_examples: int | None = None) -> dict[str, tuple[float, int]]:
    """Summed token loss and token count per domain on the held-out split (of the personalised model
    when ``adapter`` is given); ``meter`` (if given) counts the routing of the split's tokens.
    ``max_examples`` caps the examples used to a fixed subset (:meth:`ExampleBatches.eval_subset`)."""
    with attached(adapter, model), meter.attached(model) if meter is not None else nullcontext():
        return _evaluate(model, data, device, batch_size, adapter, meter, max_examples)


def _evaluate(model: nn.Module, data: ExampleBatches, device: torch.device, batch_size: int,
              adapter: PersonalAdapter | None, meter: RoutingMeter | None,
              max_examples: int | None = None) -> dict[str, tuple[float, int]]:
    model.eval()
    out: dict[str, tuple[float, int]] = {}
    for batch, domains in data.iter_eval(batch_size, max_examples):
        batch = {k: v.to(device) for k, v in batch.items()}
        if meter is not None:
            meter.mask = batch["attention_mask"].reshape(-1).bool()
        logits = forward_logits(model, batch)
        losses, mask = logit_losses(adapter.personalise(logits) if adapter is not None else logits, batch)
        for row, domain in enumerate(domains):
            loss_sum, count = out.get(domain, (0.0, 0))
            out[domain] = (loss_sum + float(losses[row].sum()), count + int(mask[row].sum()))
    return out
