"""Ghost clipping for full expert tensors (and routers): per-sample clipping without per-sample gradients.

With full experts trainable, per-sample gradients are one whole expert stack per sample, which is
what makes the vmap engine (per_sample.py) cost ~3x a plain step. For a linear map ``y = x W^T``
applied to the tokens of sample i, the per-sample gradient is ``G_i = sum_t g_t x_t^T`` (``g_t`` the
loss gradient at ``y_t``), whose squared norm needs only token Gram matrices:
``||G_i||^2 = sum_{t,s in i} (g_t . g_s)(x_t . x_s)`` (Li et al. 2022, "Large language models can be
strong differentially private learners"). The experts run densely (every expert on every token,
routing weight zero where not picked, so ``g`` is zero there), which makes each expert's gate-up and
down projections such linear maps over all tokens; routers are one more. So a step is: forward;
gradients at those outputs only; per-sample norms from Grams; clip factors ``c_i``; one backward of
``sum_i c_i L_i``, whose parameter gradient is exactly the sum of clipped per-sample gradients that
Opacus' ``DPOptimizerFastGradientClipping`` noises and scales.

Used when every trainable tensor is an expert stack or a router weight (``trainable.mode: full``);
anything else (LoRA, attention) goes through the vmap engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from fcmoe.model.discovery import discover
from silo_agent.dp.per_sample import (
    DENSE_EXPERTS,
    dense_supported,
    make_vmap_friendly,
    lora_layers,
    register_factorised_lora,
    sample_loss_rows,
)


def _experts(model: nn.Module) -> list[nn.Module]:
    return [c for c in discover(model).containers if hasattr(c, "gate_up_proj")]


def _routers(model: nn.Module) -> list[nn.Module]:
    """Trainable routers that hold their matrix themselves (``F.linear(x, weight[, bias])``, logits
    first in their output; PhiMoE's is an ``nn.Linear`` subclass returning a tuple); plain
    ``nn.Linear`` routers, and routers that wrap one, are among :func:`_linears`."""
    return [r for r in discover(model).routers
            if type(r) is not nn.Linear and isinstance(getattr(r, "weight", None), nn.Parameter)
            and r.weight.requires_grad]


def _stack_params(experts: nn.Module) -> list[nn.Parameter]:
    """The expert stacks and, where the family has them (GPT-OSS), their per-expert biases."""
    names = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")
    return [p for p in (getattr(experts, n, None) for n in names) if isinstance(p, nn.Parameter)]


def _router_bias(router: nn.Module) -> bool:
    return isinstance(getattr(router, "bias", None), nn.Parameter) and router.bias.requires_grad


def _linears(model: nn.Module) -> list[nn.Linear]:
    """Trainable ``nn.Linear`` layers called as such (e.g. Qwen2-MoE's shared expert and its gate in
    full mode) — not LoRA factor holders, whose weights are reshaped, never called, nor routers."""
    factor_holders = {id(m) for layer in lora_layers(model) for m in (layer.module.lora_A[layer.adapter],
                                                                      layer.module.lora_B[layer.adapter])}
    factor_holders |= {id(r) for r in _routers(model)}
    return [m for m in model.modules()
            if isinstance(m, nn.Linear) and m.weight.requires_grad and id(m) not in factor_holders]


def supports(model: nn.Module) -> bool:
    """Every trainable tensor is an expert stack, a router weight, LoRA on an expert stack or a plain
    Linear's weight/bias (LoRA on other layers, e.g. attention, goes through the vmap engine)."""
    return (any(p.requires_grad for p in model.parameters()) and all(dense_supported(c) for c in discover(model).containers)
            and not uncovered(model))


def uncovered(model: nn.Module) -> list[str]:
    """The trainable tensors ghost clipping cannot take, by name."""
    lora = lora_layers(model)
    plain_lora = [layer for layer in lora if not layer.num_experts]
    if plain_lora:
        return [f"LoRA on {plain_lora[0].base}"]
    covered = {id(p) for m in _experts(model) for p in _stack_params(m)}
    covered |= {id(p) for r in _routers(model) for p in (r.weight, r.bias if _router_bias(r) else None) if p is not None}
    covered |= {id(p) for m in _linears(model) for p in (m.weight, m.bias) if p is not None}
    covered |= {id(getattr(layer.module, f)[layer.adapter].weight) for layer in lora for f in ("lora_A", "lora_B")}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]


def _pair(inputs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Per-sample squared norm of the gradient of per-expert linear maps: ``[B]`` from inputs
    ``[B, T, d]`` (shared by all experts) or ``[B, T, E, d]``, and output gradients ``[B, T, E, k]``."""
    g = _gram(grads)  # [B, T, T, E]
    x = _gram(inputs)
    return ((x[..., None] if x.dim() == 3 else x) * g).sum((1, 2, 3))


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, T]`` (or ``[B, T, T, E]`` for ``[B, T, E, d]``) token inner products per sample."""
    return torch.einsum("bt...d,bs...d->bts...", x, x)


class GhostClipping:
    def __init__(self, model: nn.Module, max_grad_norm: float):
        if make_vmap_friendly(model) != DENSE_EXPERTS:
            kinds = sorted({type(c).__name__ for c in discover(model).containers})
            raise ValueError(f"ghost clipping runs experts densely; {', '.join(kinds)} cannot be (not a gated "
                             "[E, 2I, H] / [E, H, I] pair, transposed or not)")
        if not supports(model):
            raise ValueError("ghost clipping covers expert stacks, routers, Linear layers and LoRA on experts; "
                             f"{uncovered(model)[0]} is none of these")
        self.model, self.max_grad_norm = model, max_grad_norm
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._experts, self._routers, self._linears = _experts(model), _routers(model), _linears(model)
        self._lora = lora_layers(model)
        register_factorised_lora(self._lora)

    @contextmanager
    def _capture(self) -> Iterator[tuple[list, list]]:
        experts: list = []
        lora: list = []  # (input, low-rank output, LoRA output, scaling) per factorised adapter call
        linear: list = []  # (input, output, has_bias) of routers and trainable Linears
        hooks = [r.register_forward_hook(lambda m, args, out: linear.append((args[0], out[0], _router_bias(m))))
                 for r in self._routers]
        hooks += [m.register_forward_hook(lambda m, args, out: linear.append((args[0], out, m.bias is not None)))
                  for m in self._linears]
        for m in self._experts:
            m.__dict__["_fcmoe_capture"], m.__dict__["_fcmoe_lora_capture"] = experts, lora
        try:
            # LoRA on experts is applied factorised by the dense forward while PEFT's adapters are off
            with self.model.disable_adapter() if self._lora else nullcontext():
                for param in self.trainable.values():  # PEFT freezes adapters it disables; these train
                    param.requires_grad_(True)
                yield experts, lora, linear
        finally:
            for m in self._experts:
                m.__dict__.pop("_fcmoe_capture", None)
                m.__dict__.pop("_fcmoe_lora_capture", None)
            for h in hooks:
                h.remove()

    def norms(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses (graph kept) and per-sample gradient norms over every trainable tensor."""
        with self._capture() as (experts, lora, linear):
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if (len(experts) != len(self._experts) or len(lora) != len(self._lora)
                or len(linear) != len(self._routers) + len(self._linears)):
            raise RuntimeError("ghost clipping: a trainable layer was not called exactly once per forward")
        losses = sample_loss_rows(logits, batch["labels"])
        b, t = batch["input_ids"].shape
        stacks = any(m.gate_up_proj.requires_grad for m in self._experts)  # full mode: the stacks themselves
        outputs = (([o for rec in experts for o in (rec[1], rec[3])] if stacks else [])
                   + [o for rec in lora for o in (rec[1], rec[2])] + [rec[1] for rec in linear])
        grads = iter(torch.autograd.grad(losses.sum(), outputs, retain_graph=True))
        sq = torch.zeros(b, dtype=torch.float64, device=logits.device)
        tokens = lambda v: v.reshape(b, t, *v.shape[1:]) if v.shape[0] == b * t else v  # noqa: E731
        for (x, _, gated, _), module in zip(experts, self._experts) if stacks else ():
            g_up, g_down = next(grads), next(grads)
            sq += _pair(tokens(x), tokens(g_up)) + _pair(tokens(gated), tokens(g_down))
            for g, bias in ((g_up, "gate_up_proj_bias"), (g_down, "down_proj_bias")):
                if getattr(module, bias, None) is not None:  # expert e's bias gradient is sum_t g_te
                    sq += _gram(tokens(g)).sum((1, 2, 3))
        for x, low, _, scaling in lora:
            g_low, g_out = next(grads), next(grads)
            sq += _pair(tokens(x), tokens(g_low)) + scaling ** 2 * _pair(tokens(low), tokens(g_out))
        for x, _, has_bias in linear:
            g_gram = _gram(next(grads).reshape(b, t, -1))
            sq += (_gram(x.reshape(b, t, -1)) * g_gram).sum((1, 2))
            if has_bias:  # the bias' per-sample gradient is sum_t g_t
                sq += g_gram.sum((1, 2))
        return losses, sq.clamp_min(0).sqrt()

    def clip(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``p.grad`` = sum over samples of each sample's gradient clipped to ``max_grad_norm`` (what
        Opacus' ``DPOptimizerFastGradientClipping`` noises); returns the per-sample losses."""
        losses, norms = self.norms(batch)
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0).to(losses.dtype)
        (factors.detach() * losses).sum().backward()
        return losses.detach()

    def clip_nothing(self) -> None:
        """An empty Poisson draw: a zero clipped sum, so the step still adds noise."""
        for p in self.trainable.values():
            p.grad = torch.zeros_like(p)
