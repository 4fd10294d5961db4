"""The expert-unit layout: which trainable number belongs to which (layer, expert).

An *expert unit* is every trainable number of one expert in one layer: its slice of the fused expert
tensors, or its slice of the LoRA factors on them. Everything else trainable (routers, attention LoRA,
shared experts) forms one *shared unit* per layer (``layer = -1`` for model-wide tensors).

PEFT's ``ParamWrapper`` (peft 0.21) reads a fused tensor's LoRA factors as
``lora_A [E*r, in] -> (E, r, in)`` (expert e owns rows e*r .. e*r+r-1) and
``lora_B [out, r*E] -> (out, r, E)`` (expert e owns the *interleaved* columns e, e+E, e+2E, ...).
Slicing B in contiguous blocks would mix experts; tests/unit/fcmoe/model/test_layout.py checks the effective weights.
On 2-D stacked experts (``[E*I, H]``, DBRX) LoRA is one low-rank map of the whole stack: B's rows are
per expert, A is shared by all of them and sits in the layer's shared unit.

Which tensors are experts, and which decoder layer a parameter is in, come from
:func:`fcmoe.model.discovery.discover`; tests/integration/test_families.py checks the layout of every family.

The layout is derived from the model structure alone (names and shapes, never values), so both roles
compute it identically from the same config; its hash travels in every message.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fcmoe.errors import LayoutError
from fcmoe.model.discovery import MoeStructure, discover

_LORA = re.compile(r"^(?P<owner>.+)\.lora_(?P<ab>[AB])\.[^.]+\.weight$")


@dataclass(frozen=True)
class UnitKey:
    layer: int  # -1: model-wide
    expert: int | None = None  # None: the layer's shared unit

    def __str__(self) -> str:
        where = "model" if self.layer < 0 else f"L{self.layer}"
        return f"{where}.shared" if self.expert is None else f"{where}.E{self.expert}"

    @classmethod
    def parse(cls, text: str) -> "UnitKey":
        m = re.fullmatch(r"(?:L(\d+)|model)\.(?:E(\d+)|shared)", text)
        if not m:
            raise LayoutError(f"malformed unit key {text!r}")
        return cls(int(m.group(1)) if m.group(1) else -1, int(m.group(2)) if m.group(2) else None)

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.layer, -1 if self.expert is None else self.expert)

    @property
    def is_expert(self) -> bool:
        return self.expert is not None


@dataclass(frozen=True)
class Slice:
    """``param.reshape(view).select(axis, index)``; ``axis is None`` means the whole parameter."""

    param: str
    view: tuple[int, ...]
    axis: int | None
    index: int

    def select(self, tensor: torch.Tensor) -> torch.Tensor:
        viewed = tensor.reshape(self.view)
        return viewed if self.axis is None else viewed.select(self.axis, self.index)

    @property
    def numel(self) -> int:
        n = int(np.prod(self.view))
        return n if self.axis is None else n // self.view[self.axis]


class ExpertLayout:
    """Maps a model's trainable state to flat float32 vectors per unit, and back."""

    def __init__(
        self,
        units: Mapping[UnitKey, list[Slice]],
        param_shapes: Mapping[str, tuple[int, ...]],
        architecture: str = "",
    ):
        self.architecture = architecture
        self.units: dict[UnitKey, list[Slice]] = dict(sorted(units.items(), key=lambda kv: kv[0].sort_key))
        self.param_shapes = dict(param_shapes)
        covered = sum(s.numel for slices in self.units.values() for s in slices)
        total = sum(int(np.prod(shape)) for shape in self.param_shapes.values())
        if covered != total:
            raise LayoutError(f"layout covers {covered} of {total} trainable numbers")
        canonical = json.dumps(
            {
                "architecture": architecture,
                "params": sorted((k, list(v)) for k, v in self.param_shapes.items()),
                "units": [[str(k), [[s.param, list(s.view), s.axis, s.index] for s in v]]
                          for k, v in self.units.items()],
            },
            separators=(",", ":"),
        )
        self.hash = hashlib.sha256(canonical.encode()).hexdigest()[:32]

    @classmethod
    def from_model(cls, model: nn.Module) -> "ExpertLayout":
        structure = discover(model)
        modules = dict(model.named_modules())
        units: dict[UnitKey, list[Slice]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            shape = tuple(p.shape)
            shapes[name] = shape
            layer = structure.layer_of.get(id(p), -1)
            for expert, sl in _expert_slices(name, p, modules, structure):
                units.setdefault(UnitKey(layer, expert), []).append(sl)
        if not shapes:
            raise LayoutError("model has no trainable parameters")
        config = getattr(model, "config", None)
        architecture = getattr(config, "model_type", "") or type(model).__name__
        return cls(units, shapes, architecture)

    # -- sizes -------------------------------------------------------------------------------
    def unit_sizes(self) -> dict[str, int]:
        return {str(k): sum(s.numel for s in v) for k, v in self.units.items()}

    @property
    def unit_names(self) -> list[str]:
        return [str(k) for k in self.units]

    @property
    def num_parameters(self) -> int:
        return sum(self.unit_sizes().values())

    # -- conversions -------------------------------------------------------------------------
    def split(self, state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Trainable state (by parameter name) -> one flat float32 vector per unit."""
        self._check_names(state)
        out: dict[str, np.ndarray] = {}
        for key, slices in self.units.items():
            parts = [s.select(state[s.param].detach().to("cpu", torch.float32)).reshape(-1) for s in slices]
            out[str(key)] = torch.cat(parts).numpy().copy()
        return out

    def merge(self, vectors: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """One vector per unit -> trainable state by parameter name (the inverse of split)."""
        missing = [k for k in self.unit_names if k not in vectors]
        if missing:
            raise LayoutError(f"missing units: {', '.join(missing[:5])}")
        state = {n: torch.zeros(shape, dtype=torch.float32) for n, shape in self.param_shapes.items()}
        for key, slices in self.units.items():
            vector = torch.as_tensor(np.asarray(vectors[str(key)], dtype=np.float32))
            if vector.numel() != sum(s.numel for s in slices):
                raise LayoutError(f"unit {key}: {vector.numel()} numbers, expected {sum(s.numel for s in slices)}")
            offset = 0
            for s in slices:
                target = s.select(state[s.param])
                target.copy_(vector[offset : offset + s.numel].reshape(target.shape))
                offset += s.numel
        return state

    def _check_names(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self.param_shapes):
            extra = sorted(set(state) - set(self.param_shapes))[:3]
            missing = sorted(set(self.param_shapes) - set(state))[:3]
            raise LayoutError(f"state does not match layout (unexpected {extra}, missing {missing})")
        for n, t in state.items():
            if tuple(t.shape) != self.param_shapes[n]:
                raise LayoutError(f"{n}: shape {tuple(t.shape)}, layout expects {self.param_shapes[n]}")


def _expert_slices(name: str, param: torch.Tensor, modules: Mapping[str, nn.Module], structure: MoeStructure):
    """Yield (expert index or None, Slice) for one trainable parameter."""
    shape = tuple(param.shape)
    lora = _LORA.match(name)
    owner = modules.get(lora.group("owner")) if lora else None
    wrapper_experts = getattr(owner, "num_experts", 1) if owner is not None else 1
    if lora and type(owner).__name__ == "ParamWrapper" and wrapper_experts > 1:
        E = wrapper_experts
        if lora.group("ab") == "A":  # [E*r, in] -> (E, r, in), expert owns a contiguous row block
            if shape[0] % E:
                raise LayoutError(f"{name}: {shape[0]} rows do not divide into {E} experts")
            view, axis = (E, shape[0] // E, shape[1]), 0
        else:  # B: [out, r*E] -> (out, r, E), expert owns interleaved columns
            if shape[1] % E:
                raise LayoutError(f"{name}: {shape[1]} columns do not divide into {E} experts")
            view, axis = (shape[0], shape[1] // E, E), 2
        return [(_expert_or_none(e, structure), Slice(name, view, axis, e)) for e in range(E)]
    stacked = structure.expert_view(owner.get_param()) if lora and type(owner).__name__ == "ParamWrapper" else None
    if stacked is not None:  # LoRA on experts stacked 2-D ([E*I, H], DBRX): B's rows are per expert, A is shared
        if lora.group("ab") == "A":
            return [(None, Slice(name, shape, None, 0))]
        view = (stacked[0], shape[0] // stacked[0], shape[1])
        return [(e, Slice(name, view, 0, e)) for e in range(stacked[0])]
    view = structure.expert_view(param)
    if view is not None:  # a whole expert tensor (full mode): expert e owns view[e]
        return [(_expert_or_none(e, structure), Slice(name, view, 0, e)) for e in range(view[0])]
    return [(None, Slice(name, shape, None, 0))]


def _expert_or_none(row: int, structure: MoeStructure) -> int | None:
    """Rows past the routed experts (LongCat's zero-compute experts: never read) join the shared unit."""
    return row if row < structure.num_experts else None
