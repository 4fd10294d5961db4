"""Exact per-sample gradients of an HF MoE (fused experts, routers, LoRA on experts and attention).

Why not Opacus' own grad samplers: they work module by module, with dim 0 of a module's input as the
batch, while transformers 5 feeds experts a flattened ``[tokens, hidden]`` tensor with routing
tensors beside it, and calls them with keyword arguments; both its hooks and its functorch modes fail
there. Opacus' optimizer and accountants only need ``p.grad_sample``, so this module supplies it.

How: ``torch.func.vmap(torch.func.grad(loss))`` over the samples of a batch, each sample a batch of
one, through ``torch.func.functional_call``. Two things in the stock model stop ``vmap``:

* the eager experts loop over the experts a batch hits (``nonzero``: a data-dependent shape). Here
  the experts run densely (:func:`dense_experts_forward`, registered with transformers' experts
  interface): every expert on every token, weighted by zero where the router did not pick it — the
  same function, hence the same gradients (transformers' ``batched_mm``, which gathers each token's
  expert weights, is the fallback for layouts the dense form does not cover);
* PEFT applies LoRA to a fused expert tensor by registering a parametrization during the forward
  (an in-place ``set_`` that ``grad`` refuses). Here every LoRA layer's effective weight
  ``W + scaling * delta(A, B)`` is computed inside the transformed function, from the per-sample
  copies of ``A`` and ``B``, and substituted for the base weight while PEFT's adapters are disabled.

Memory is one gradient per sample and parameter (``B x trainable``): fine for LoRA and tiny models;
for full experts of large models use smaller physical batches (Opacus' BatchMemoryManager).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fcmoe.errors import ConfigError
from fcmoe.model.discovery import discover
from silo_agent.data import IGNORE_INDEX


@dataclass(frozen=True, eq=False)
class _LoraLayer:
    """Where one LoRA adapter's factors and its base weight live, and how they combine."""

    module: nn.Module  # the PEFT layer (its lora_A / lora_B modules hold the factors)
    adapter: str
    base: str  # name of the base weight in the model's parameters
    lora_a: str
    lora_b: str
    scaling: float
    num_experts: int  # 0: a plain Linear; else a fused expert tensor (PEFT ParamWrapper)
    swapped: bool  # ParamWrapper: base stored as (experts, out, in) rather than (experts, in, out)

    def factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lhs, rhs)`` with PEFT's delta weight ``= scaling * lhs @ rhs``, shaped like the base
        weight (per expert for fused tensors); written out after PEFT, checked against its forward."""
        if not self.num_experts:
            return b, a
        a = a.reshape(self.num_experts, -1, a.shape[-1])  # (experts, rank, in)
        b = b.reshape(b.shape[0], -1, self.num_experts).permute(2, 0, 1)  # (experts, out, rank)
        return (b, a) if self.swapped else (a.transpose(-2, -1), b.transpose(-2, -1))

    def delta(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        lhs, rhs = self.factors(a, b)
        return (lhs @ rhs) * self.scaling


def lora_layers(model: nn.Module) -> list[_LoraLayer]:
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    layers = []
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            wrapper = isinstance(module, ParamWrapper)
            base = module.get_param() if wrapper else module.get_base_layer().weight
            if getattr(module, "fan_in_fan_out", False):
                raise ConfigError("DP-SGD does not support LoRA layers with fan_in_fan_out (GPT-2 style Conv1D)")
            layers.append(_LoraLayer(
                module=module, adapter=adapter, base=names[id(base)], lora_a=names[id(module.lora_A[adapter].weight)],
                lora_b=names[id(module.lora_B[adapter].weight)], scaling=float(module.scaling[adapter]),
                num_experts=module.num_experts if wrapper and module.num_experts > 1 else 0,
                swapped=bool(getattr(module, "_did_swap_in_out_features", False))))
    return layers


DENSE_EXPERTS = "fcmoe_dense"


def dense_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the (mostly zero) dense routing weights.

    The same function as the sparse forward — an expert a token was not routed to gets weight 0, so
    it adds nothing and receives no gradient — with no data-dependent shapes, so ``vmap`` can batch
    it; plain matmuls instead of per-token weight gathers (``batched_mm``), at the price of
    num_experts / top_k times the expert FLOPs.
    """
    dense = torch.zeros(hidden_states.shape[0], self.num_experts, dtype=top_k_weights.dtype,
                        device=hidden_states.device).scatter(1, top_k_index, top_k_weights)
    gate_up = _expert_linear(self, "gate_up_proj", hidden_states, "nd")
    gated = self._apply_gate(gate_up)
    out = _expert_linear(self, "down_proj", gated, "ned")
    capture = self.__dict__.get("_fcmoe_capture")
    if capture is not None:  # ghost clipping (silo_agent/dp/ghost.py): inputs and outputs of both matmuls
        capture.append((hidden_states, gate_up, gated, out))
    return torch.einsum("neo,ne->no", out, dense.to(out.dtype)).to(hidden_states.dtype)


def _expert_linear(experts: nn.Module, name: str, x: torch.Tensor, x_dims: str) -> torch.Tensor:
    """Expert e's map of ``x`` for every e (``[N, E, out]``), from ``W [E, out, in]`` or, transposed,
    ``[E, in, out]`` (GPT-OSS), plus its bias ``[E, out]`` where the family has one, plus LoRA on ``W``
    kept factorised when PEFT's adapters are off (PEFT folds it into ``W`` itself otherwise):
    per-sample gradients then stay the size of the LoRA factors instead of one expert stack per sample."""
    transposed = _transposed(experts)
    y = torch.einsum(f"{x_dims},{'edo' if transposed else 'eod'}->neo", x, getattr(experts, name))
    bias = getattr(experts, f"{name}_bias", None)
    if bias is not None:
        y = y + bias
    for layer in getattr(experts, "_fcmoe_lora", {}).get(name, ()):
        if not layer.module.disable_adapters:
            continue
        lhs, rhs = layer.factors(layer.module.lora_A[layer.adapter].weight, layer.module.lora_B[layer.adapter].weight)
        if transposed:  # delta [E, in, out] = lhs [E, in, r] @ rhs [E, r, out]
            low = torch.einsum(f"{x_dims},edr->ner", x, lhs)
            lora = layer.scaling * torch.einsum("ner,ero->neo", low, rhs)
        else:  # delta [E, out, in] = lhs [E, out, r] @ rhs [E, r, in]
            low = torch.einsum(f"{x_dims},erd->ner", x, rhs)
            lora = layer.scaling * torch.einsum("ner,eor->neo", low, lhs)
        capture = experts.__dict__.get("_fcmoe_lora_capture")
        if capture is not None:  # ghost clipping: both factor maps' inputs and outputs
            capture.append((x, low, lora, layer.scaling))
        y = y + lora
    return y


def register_factorised_lora(layers: list[_LoraLayer]) -> None:
    """Tell each dense experts module which LoRA adapters to apply factorised (``_expert_linear``);
    replaced, never appended to, so a new engine per round does not apply an adapter twice."""
    registries: dict[int, tuple[nn.Module, dict[str, list[_LoraLayer]]]] = {}
    for layer in layers:
        experts = layer.module.get_base_layer()
        _, registry = registries.setdefault(id(experts), (experts, {}))
        registry.setdefault(layer.module.parameter_name, []).append(layer)
    for experts, registry in registries.values():
        experts.__dict__["_fcmoe_lora"] = registry


def _transposed(experts: nn.Module) -> bool | None:
    """Whether the gate-up and down stacks are stored ``[E, in, out]`` (None: not a gated pair).
    From transformers' own flag where the class has it, else from the shapes, which tell unambiguously:
    ``[E, 2I, H]`` with ``[E, H, I]``, or ``[E, H, 2I]`` with ``[E, I, H]``."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3 \
            or down.dim() != 3 or gate_up.shape[0] != down.shape[0]:
        return None
    if hasattr(experts, "is_transposed"):
        return bool(experts.is_transposed)
    if gate_up.shape[2] == down.shape[1] and gate_up.shape[1] == 2 * down.shape[2]:
        return False
    if gate_up.shape[1] == down.shape[2] and gate_up.shape[2] == 2 * down.shape[1]:
        return True
    return None


_DENSE_TENSORS = {"gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"}


def dense_supported(experts: nn.Module) -> bool:
    """The dense forward computes exactly what the family's does: a gated pair (either orientation),
    biases under the names it reads, the class's own gate, and no tensor it would leave out."""
    own = {n.rsplit(".", 1)[-1] for n, _ in experts.named_parameters() if "lora_" not in n}
    return (_transposed(experts) is not None and hasattr(experts, "_apply_gate") and own <= _DENSE_TENSORS
            and (not getattr(experts, "has_bias", False) or {"gate_up_proj_bias", "down_proj_bias"} <= own)
            and getattr(experts, "has_gate", True) and not getattr(experts, "has_post_expert_norm", False)
            and not getattr(experts, "_is_expert_parallel", False))


def make_vmap_friendly(model: nn.Module) -> str:
    """Dense experts where the layout allows, else transformers' ``batched_mm`` (neither has
    data-dependent shapes), and eager attention, so ``vmap`` batches every op instead of looping.
    Expert classes outside transformers' experts interface (GPT-OSS) get the dense forward directly."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if DENSE_EXPERTS not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(DENSE_EXPERTS, dense_experts_forward)
    experts = discover(model).containers
    choice = DENSE_EXPERTS if experts and all(dense_supported(m) for m in experts) else "batched_mm"
    if choice == DENSE_EXPERTS:
        for m in experts:
            if not hasattr(m, "is_transposed"):  # not dispatched through the interface
                m.forward = types.MethodType(dense_experts_forward, m)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = choice
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "eager"  # SDPA on CPU has no batching rule: vmap would loop
    return choice


def sample_loss_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the mean next-token loss over the positions that count (as in local training)."""
    targets = labels[:, 1:]
    losses = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                         targets.reshape(-1).clamp_min(0), reduction="none").view_as(targets)
    mask = targets != IGNORE_INDEX
    return (losses * mask).sum(1) / mask.sum(1).clamp_min(1)


def sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of a batch of one sample."""
    return sample_loss_rows(logits, labels)[0]


class PerSampleGradients:
    """``grads, losses = PerSampleGradients(model)(batch)``: one gradient per sample and trainable parameter."""

    def __init__(self, model: nn.Module):
        dense = make_vmap_friendly(model) == DENSE_EXPERTS
        self.model = model
        self.lora = lora_layers(model)
        # dense experts apply their LoRA factorised (_expert_linear); everything else is folded
        self.folded = [layer for layer in self.lora if not (dense and layer.num_experts)]
        if dense:
            register_factorised_lora([layer for layer in self.lora if layer.num_experts])
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # read once: walking the module tree per step costs more than a tiny model's whole step
        self._frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        self._buffers = dict(model.named_buffers())
        self._peft = hasattr(model, "disable_adapter") and bool(self.lora)

    @contextmanager
    def _adapters_off(self) -> Iterator[None]:
        with self.model.disable_adapter() if self._peft else nullcontext():
            yield

    def _substituted(self, frozen: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every parameter the forward reads, LoRA folded into its base weight."""
        out = {**frozen, **params}
        for layer in self.folded:
            out[layer.base] = out[layer.base] + layer.delta(params[layer.lora_a], params[layer.lora_b])
        return out

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        frozen, buffers = self._frozen, self._buffers

        _check_right_padded(batch["attention_mask"])

        def loss(params: dict[str, torch.Tensor], ids: torch.Tensor, labels: torch.Tensor):
            tensors = {**self._substituted(frozen, params), **buffers}
            # every tensor is passed by name, so tied weights need no untying walk over the module tree
            logits = functional_call(self.model, tensors, (), {"input_ids": ids[None]}, tie_weights=False).logits
            return sample_loss(logits, labels[None])

        params = {n: p.detach() for n, p in self.trainable.items()}
        with self._adapters_off():
            grads, losses = vmap(grad_and_value(loss), in_dims=(None, 0, 0), randomness="different")(
                params, batch["input_ids"], batch["labels"])
        return grads, losses


    def clip(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Set ``p.grad_sample`` on every trainable parameter, which is all Opacus' ``DPOptimizer``
        needs to clip per sample, add noise and step; returns the per-sample losses."""
        grads, losses = self(batch)
        for name, param in self.trainable.items():
            param.grad_sample = grads[name]
        return losses

    def clip_nothing(self) -> None:
        """An empty Poisson draw: one zero gradient, so the step still adds noise."""
        for p in self.trainable.values():
            p.grad_sample = torch.zeros((1, *p.shape), dtype=p.dtype, device=p.device)


def _check_right_padded(mask: torch.Tensor) -> None:
    """The attention mask is left out of the transformed forward (building it branches on data):
    with right padding a causal model's real positions never see the padding, and padded positions
    carry no label, so every loss and gradient is unchanged. Left padding would change them."""
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("per-sample gradients need right-padded batches (a 0 before a 1 in attention_mask)")
