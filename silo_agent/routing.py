"""How much a silo's tokens lean on each expert: the routing part of its importance.

Hooks read, per MoE layer, each token's chosen experts and their gate weights where the family hands
them over (:class:`fcmoe.model.discovery.FamilyFacts`): most pass ``(top_k_index, top_k_weights)`` to
the experts; Llama 4's router returns dense per-expert weights; JetMoE's router returns its tokens
sorted by expert; Doge's block returns the product-key logits its experts are chosen from. The meter
sums, per (layer, expert), the weight the silo's real (non-padding) tokens put on the expert; a
layer's shares are that mass over the layer's total, so they sum to one whatever the family's scaling
(DeepSeek-V3 multiplies its gates by 2.5). Ids of zero-compute experts (LongCat's
ids at or above the expert count) are not experts and are left out.

The agent meters the evaluation of each round's global model on the silo's held-out split: the share
then says how this silo's data uses the experts of the model being aggregated (docs/algorithm.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fcmoe.errors import LayoutError
from fcmoe.model import ExpertLayout
from fcmoe.model.discovery import MoeLayer, MoeStructure, discover


def _index_and_weights(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (integer expert ids, float gate weights) pair of equal shape among a call's arguments."""
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
    for index in tensors:
        if index.is_floating_point() or index.dim() < 2:
            continue
        for weights in tensors:
            if weights.is_floating_point() and weights.shape == index.shape:
                return index, weights
    return None


class RoutingMeter:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.mass: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, float] = {}
        self.mask: torch.Tensor | None = None  # [B*T] bool, set before each forward

    def _add(self, layer: int, experts: int, token: torch.Tensor, expert: torch.Tensor,
             weight: torch.Tensor, tokens: int) -> None:
        """Add the gate weight of routing slots (token row, expert id, weight) to a layer's mass."""
        keep = (expert >= 0) & (expert < experts)  # zero-compute / skip ids are not experts
        if self.mask is not None and self.mask.numel() == tokens:
            mask = self.mask.to(token.device)
            keep &= mask[token]
            tokens = int(mask.sum())
        mass = torch.zeros(experts, dtype=torch.float64, device=expert.device)
        mass.index_add_(0, expert[keep], weight[keep].double())
        self.mass[layer] = self.mass.get(layer, torch.zeros_like(mass)).to(mass.device) + mass
        self.tokens[layer] = self.tokens.get(layer, 0.0) + float(tokens)

    def _add_per_token(self, layer: int, experts: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """``ids`` / ``weights`` ``[tokens, slots]``: each token's chosen expert ids and their weights."""
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
        self._add(layer, experts, rows.reshape(-1), ids.reshape(-1), weights.reshape(-1), ids.shape[0])

    def _from_experts_args(self, layer: MoeLayer, experts: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            found = _index_and_weights(args, kwargs)
            if found is None:
                return
            index, weights = (t.detach() for t in found)
            index = index.reshape(-1, index.shape[-1])
            self._add_per_token(layer.index, experts, index, weights.float().reshape(index.shape))
        return hook

    def _from_router_dense(self, layer: MoeLayer, experts: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output) -> None:
            dense = output[0].detach().float().reshape(-1, output[0].shape[-1])[:, :experts]
            self._add_per_token(layer.index, experts, torch.arange(experts, device=dense.device).expand_as(dense),
                                dense)
        return hook

    def _from_router_sorted(self, layer: MoeLayer, experts: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output) -> None:
            _, token, gates, per_expert, logits = output
            ids = torch.repeat_interleave(torch.arange(experts, device=token.device),
                                          torch.as_tensor(per_expert, device=token.device))
            self._add(layer.index, experts, token.detach(), ids, gates.detach().float(), logits.shape[0])
        return hook

    def _from_block_product_keys(self, layer: MoeLayer, experts: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output) -> None:
            logits = output[1].detach().float()  # [2, tokens, keys]: one score per key on each axis
            keys, top_k = module.num_keys, module.top_k
            (sx, sy), (ix, iy) = logits.topk(keys, dim=-1)
            scores = (sx[..., :, None] + sy[..., None, :]).flatten(-2)
            ids = (ix[..., :, None] * keys + iy[..., None, :]).flatten(-2)
            best, where = scores.topk(top_k, dim=-1)
            self._add_per_token(layer.index, experts, ids.gather(-1, where), torch.softmax(best, dim=-1))
        return hook

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator["RoutingMeter"]:
        """Meter every MoE layer while inside; fails loudly if the model ran and no layer was metered."""
        structure = discover(model)
        handles = [model.register_forward_hook(lambda *_: self._count_forward())]
        self._forwards = 0
        for layer in structure.layers:
            handles.append(self._attach(structure, layer))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
        if self._forwards and not self.mass:
            raise LayoutError(f"routing meter: {structure.model_class} ran {self._forwards} forward pass(es) and "
                              f"none of its {len(structure.layers)} MoE layers reported its routing "
                              f"(reader {structure.facts.routing!r})")

    def _count_forward(self) -> None:
        self._forwards += 1

    def _attach(self, structure: MoeStructure, layer: MoeLayer):
        reader, experts = structure.facts.routing, structure.num_experts
        if reader == "experts_args":
            return layer.containers[0].register_forward_pre_hook(self._from_experts_args(layer, experts),
                                                                with_kwargs=True)
        if reader == "block_product_keys":
            return layer.block.register_forward_hook(self._from_block_product_keys(layer, experts))
        if layer.router is None:
            raise LayoutError(f"routing meter: {structure.model_class} layer {layer.index} has no router to read")
        make = {"router_dense": self._from_router_dense, "router_sorted": self._from_router_sorted}[reader]
        return layer.router.register_forward_hook(make(layer, experts))

    def shares(self, layout: ExpertLayout) -> dict[str, float]:
        """Routing share per unit in layout order (each layer's experts sum to one); shared units count
        as fully used (1.0)."""
        out = {}
        for key in layout.units:
            if key.expert is None:
                out[str(key)] = 1.0
                continue
            mass = self.mass.get(key.layer)
            total = float(mass.sum()) if mass is not None else 0.0
            out[str(key)] = float(mass[key.expert]) / total if total > 0 else 0.0
        return out
