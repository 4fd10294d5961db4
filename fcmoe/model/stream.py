"""A local checkpoint read one layer at a time: what lets a sharded silo start without any process
holding the whole model.

Under ``silo.parallel: fsdp`` rank 0 hands each rank its shard of the base, tensor by tensor. Reading
the base with ``from_pretrained`` first would hold all of it in rank 0's host memory (94 GB for
Mixtral-8x7B in bf16). :class:`CheckpointStream` instead reads the safetensors files a layer at a time
(every key under ``….layers.N.``, or whatever the first numbered module is; the rest, embeddings, norm
and head, as one more group) into a model whose parameters live on the ``meta`` device, and yields each
tensor under the name :func:`fcmoe.model.build_model` gives it. Only one group is ever in memory.

Transformers 5 converts checkpoints while loading them (per-expert ``w1/w2/w3`` into one fused
``gate_up_proj``, renamed keys): every group goes through transformers' own conversion,
``convert_and_load_state_dict_in_model``, the function ``from_pretrained`` itself calls, so a stream
yields exactly the tensors ``from_pretrained`` would (tested for every family). That function is not
part of transformers' documented API; transformers is pinned.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from fcmoe.config import ModelConfig
from fcmoe.errors import ConfigError, LayoutError
from fcmoe.logs import log_event
from fcmoe.model.build import DTYPES, build_model, combine_digests, hf_config, tensor_digest

log = logging.getLogger(__name__)
_PEFT_PREFIX = "base_model.model."
_GROUP = re.compile(r"^(.*?\.\d+)\.")  # up to the first numbered module: "model.layers.3"


class CheckpointStream:
    """``build_model(spec)``'s parameters and buffers as ``(name, tensor)`` pairs, read from the local
    checkpoint at ``spec.path`` one group (layer) at a time. :attr:`model` is that model with its base
    on the meta device (names, shapes, what trains); LoRA tensors, which no checkpoint holds, are
    initialised as PEFT does (the silo loads the run's global state over them before any use).
    :meth:`fingerprint` is :func:`fcmoe.model.base_fingerprint` of the whole model, from the tensors
    streamed so far (streaming the rest first if needed)."""

    def __init__(self, spec: ModelConfig, seed: int = 0):
        if spec.source != "local" or spec.path is None:
            raise ConfigError("model.source: only a local checkpoint can be read layer by layer")
        self.spec, self.seed = spec, seed
        self.files = checkpoint_files(spec.path)
        self.model = build_model(spec, "meta", seed)
        _initialise_lora(self.model, seed)
        self._digests: dict[str, bytes] = {}
        self._streamed = False

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter and buffer of :attr:`model`, each once: LoRA first, then the buffers computed at
        construction (rotary frequencies), then group by group. A group's tensors are freed once the next
        group is read (unless the caller keeps them)."""
        from transformers.utils import logging as transformers_logging

        bar = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # transformers' bar would be drawn once per layer
        try:
            yield from self._stream()
        finally:
            if bar:
                transformers_logging.enable_progress_bar()

    def _stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        ours = dict(self.model.named_parameters())
        ours.update(self.model.named_buffers())
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        skeleton = _skeleton(self.spec)
        names = {_checkpoint_name(n): n for n in ours}  # the transformers model's names -> build_model's
        dtype = DTYPES[self.spec.dtype]
        load = LoadStateDictConfig(pretrained_model_name_or_path=str(self.spec.path), dtype=dtype,
                                   dtype_plan=skeleton._get_dtype_plan(dtype),
                                   weight_mapping=get_model_conversion_mapping(skeleton, None, None))
        left = set(ours)
        started, groups = time.perf_counter(), _groups(self.files)

        def give(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
            if name in frozen:
                self._digests[name] = tensor_digest(tensor)
            left.discard(name)
            return name, tensor

        for name, tensor in ours.items():
            if tensor.device.type != "meta":  # LoRA, which no checkpoint holds
                yield give(name, tensor)
        persistent = set(skeleton.state_dict())
        for base_name, buffer in skeleton.named_buffers():
            if base_name not in persistent and base_name in names:
                yield give(names[base_name], buffer)
        for group, keys in groups.items():
            before = dict(_tensors(skeleton))  # held, not just their ids: a freed object's id can come back
            convert_and_load_state_dict_in_model(model=skeleton, state_dict=_lazy(self.files, keys), load_config=load)
            loaded = [(n, t) for n, t in _tensors(skeleton) if t is not before.get(n) and t.device.type != "meta"]
            del before
            for base_name, tensor in loaded:
                if base_name in names and names[base_name] in left:
                    yield give(names[base_name], tensor)
            _drop(skeleton, [n for n, t in loaded if isinstance(t, nn.Parameter)])
            del loaded
            log_event(log, "checkpoint_group_read", level=logging.DEBUG, group=group or "(outside the layers)",
                      keys=len(keys))
        if left:
            raise LayoutError(f"model.path = {str(self.spec.path)!r}: the checkpoint holds no value for "
                              f"{len(left)} tensor(s) of the model, e.g. {sorted(left)[0]!r}")
        self._streamed = True
        log_event(log, "checkpoint_read", path=str(self.spec.path), groups=len(groups), tensors=len(ours),
                  seconds=round(time.perf_counter() - started, 3))

    def fingerprint(self) -> str:
        if not self._streamed:
            for _ in self:
                pass
        return combine_digests(self._digests)


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Every tensor key of the safetensors checkpoint in ``folder`` -> the file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"model.path: {index} is not a safetensors index ({type(exc).__name__})") from None
        return {key: folder / name for key, name in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ConfigError(f"model.path = {str(folder)!r}: no model.safetensors or model.safetensors.index.json "
                          "(a sharded silo reads safetensors checkpoints layer by layer)")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {key: single for key in f.keys()}


def _groups(files: dict[str, Path]) -> dict[str, list[str]]:
    """Checkpoint keys by the module they sit under (``model.layers.3``); ``""`` for the rest. Every
    conversion transformers makes (experts merged, projections split) stays within one such group."""
    groups: dict[str, list[str]] = {}
    for key in files:
        match = _GROUP.match(key)
        groups.setdefault(match.group(1) if match else "", []).append(key)
    return groups


def _lazy(files: dict[str, Path], keys: list[str]) -> dict:
    """The keys' tensors as safetensors slices: read when transformers converts them (as from_pretrained)."""
    from safetensors import safe_open

    handles = {path: safe_open(str(path), framework="pt") for path in {files[k] for k in keys}}
    return {key: handles[files[key]].get_slice(key) for key in keys}


def _skeleton(spec: ModelConfig) -> nn.Module:
    """The checkpoint's transformers model, parameters on the meta device, buffers computed for real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(hf_config(spec), dtype=DTYPES[spec.dtype])


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def _drop(model: nn.Module, names: list[str]) -> None:
    """Put these parameters back on the meta device: the group's memory goes with them."""
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(torch.empty_like(old, device="meta"), requires_grad=False)


def _checkpoint_name(name: str) -> str:
    """build_model's name of a base tensor -> the transformers model's (PEFT's wrapping taken off)."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return name.replace(".base_layer", "")


@torch.no_grad()
def _initialise_lora(model: nn.Module, seed: int) -> None:
    """Give the LoRA tensors of a meta-built model real values, initialised as PEFT initialises them."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_A:
                module.lora_A[adapter].to_empty(device="cpu")
                module.lora_B[adapter].to_empty(device="cpu")
                module.reset_lora_parameters(adapter, True)
