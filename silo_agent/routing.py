"""How much a silo's tokens lean on each expert: the routing part of its importance.

A forward pre-hook on every fused ``*Experts`` module sees the router's exact ``top_k_index`` and
``top_k_weights`` (transformers >= 5), so the meter sums, per (layer, expert), the gate weight that
the silo's real (non-padding) tokens put on the expert. Divided by the token count this is the
expert's routing share in that layer (the shares of a layer sum to one).

The agent meters the evaluation of each round's global model on the silo's held-out split: the
share then says how this silo's data uses the experts of the model being aggregated. Metering local
training instead measured the silo's own drifting router, which aggregation does not keep; on the
conflict benchmark that cost FC-MoE's global model 2 % (docs/algorithm.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fcmoe.model import ExpertLayout

_LAYER = re.compile(r"\.layers\.(\d+)\.")


class RoutingMeter:
    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.mass: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, float] = {}
        self.mask: torch.Tensor | None = None  # [B*T] bool, set before each forward

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            weights = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
            if index is None or weights is None:
                return
            index, weights = index.detach().reshape(-1, index.shape[-1]), weights.detach().float()
            weights = weights.reshape(index.shape)
            if self.mask is not None and self.mask.numel() == index.shape[0]:
                keep = self.mask.to(index.device)
                index, weights = index[keep], weights[keep]
            mass = torch.zeros(self.num_experts, dtype=torch.float64, device=index.device)
            mass.index_add_(0, index.reshape(-1), weights.reshape(-1).double())
            self.mass[layer] = self.mass.get(layer, torch.zeros_like(mass)).to(mass.device) + mass
            self.tokens[layer] = self.tokens.get(layer, 0.0) + float(index.shape[0])

        return hook

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator["RoutingMeter"]:
        handles = []
        for name, module in model.named_modules():
            m = _LAYER.search(name + ".")
            if type(module).__name__.endswith("Experts") and m:
                handles.append(module.register_forward_pre_hook(self._hook(int(m.group(1))), with_kwargs=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def shares(self, layout: ExpertLayout) -> dict[str, float]:
        """Routing share per unit in layout order; shared units count as fully used (1.0)."""
        out = {}
        for key in layout.units:
            if key.expert is None:
                out[str(key)] = 1.0
            else:
                tokens = self.tokens.get(key.layer, 0.0)
                mass = self.mass.get(key.layer)
                out[str(key)] = float(mass[key.expert]) / tokens if tokens and mass is not None else 0.0
        return out
