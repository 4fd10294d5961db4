"""Sparse upcycling (Komatsuzaki et al. 2022): a dense Llama-style checkpoint becomes an MoE.

Every chosen layer's MLP is copied into ``E`` identical experts and gets a fresh, seeded router that
picks ``top_k`` of them with renormalised weights. Identical experts whose weights sum to one give
exactly the dense MLP's output whatever the router says, so the upcycled model's logits equal the
dense model's before any training (up to float rounding). The router is random, not zero, so that
tokens spread over all experts from the start (a zero router ties them all and every token would go
to the same ``top_k``); fine-tuning then makes the experts, and so the router's choices, matter.

Target architectures (transformers >= 5, fused experts ``gate_up_proj [E, 2I, H]`` =
``cat(gate_proj, up_proj)`` per expert and ``down_proj [E, H, I]``, i.e. ``nn.Linear`` weights
stacked, no transpose):

- every layer upcycled (the default): **Mixtral** (``MixtralForCausalLM``). Its decoder layer is
  always an MoE block, so it cannot keep some MLPs dense.
- a subset of layers: **Qwen2-MoE** (``Qwen2MoeForCausalLM``), the simplest transformers family
  that mixes dense and MoE layers (``mlp_only_layers``) and whose attention is Llama's
  (``qkv_bias=False``; no QK-norm). Its MoE block always has a shared expert; it is given width 0,
  so it adds exactly zero, and ``norm_topk_prob=True`` renormalises the top-k weights.

Attention, embeddings, norms and the LM head are copied unchanged. Config, state and model functions
are pure (nothing read or written); only the directory functions at the end touch files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fcmoe.errors import ConfigError
from fcmoe.logs import log_event

log = logging.getLogger(__name__)

_MLP = ("gate_proj", "up_proj", "down_proj")
# Files of a checkpoint directory that hold weights or the architecture: written anew, never copied.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
_NOT_COPIED_NAMES = frozenset({"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"})


@dataclass(frozen=True)
class UpcycleSpec:
    """What to build: ``num_experts`` copies per chosen layer, ``top_k`` of them per token.

    ``layers`` None means every layer (Mixtral); a subset gives Qwen2-MoE with the others dense.
    ``router_std`` None takes the dense config's ``initializer_range`` (the scale its own linear
    layers were initialised at).
    """

    num_experts: int = 4
    top_k: int = 2
    layers: tuple[int, ...] | None = None
    seed: int = 0
    router_std: float | None = None

    def __post_init__(self) -> None:
        """Options that are wrong whatever the model fail here, before anything is loaded."""
        if self.num_experts < 2:
            raise ConfigError(f"experts = {self.num_experts}: an MoE needs at least 2 experts")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top_k = {self.top_k}: must be between 1 and experts ({self.num_experts})")
        if self.router_std is not None and not self.router_std >= 0:
            raise ConfigError(f"router_std = {self.router_std}: must be >= 0")

    def moe_layers(self, num_layers: int) -> tuple[int, ...]:
        """The upcycled layer indices, sorted; ConfigError if one is not a layer of the model."""
        if self.layers is None:
            return tuple(range(num_layers))
        chosen = sorted(set(self.layers))
        if not chosen:
            raise ConfigError("layers: empty selection (leave it out to upcycle every layer)")
        bad = [i for i in chosen if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(f"layers = {bad}: the model has layers 0..{num_layers - 1}")
        return tuple(chosen)


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """``None``/``"all"`` -> None (every layer); ``"0,2,4-7"`` -> (0, 2, 4, 5, 6, 7)."""
    if text is None or text.strip().lower() == "all":
        return None
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match or (match.group(2) is not None and int(match.group(2)) < int(match.group(1))):
            raise ConfigError(f"layers = {text!r}: expected 'all' or indices and ranges like '0,2,4-7'")
        lo = int(match.group(1))
        out.extend(range(lo, int(match.group(2) or lo) + 1))
    return tuple(out)


# -- config ----------------------------------------------------------------------------------------

def check_dense_config(config) -> None:
    """Refuse what the targets cannot reproduce exactly (one line saying what and why)."""
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise ConfigError(f"model_type {model_type!r}: upcycling reads a dense Llama checkpoint (LlamaForCausalLM)")
    if getattr(config, "attention_bias", False):
        raise ConfigError("attention_bias = true: the MoE targets (Mixtral, Qwen2-MoE) have no attention biases")
    if getattr(config, "mlp_bias", False):
        raise ConfigError("mlp_bias = true: fused experts have no biases")


def _common_fields(dense) -> dict:
    """The dense config's fields that mean the same thing in both targets."""
    fields = {
        "vocab_size": dense.vocab_size,
        "hidden_size": dense.hidden_size,
        "num_hidden_layers": dense.num_hidden_layers,
        "num_attention_heads": dense.num_attention_heads,
        "num_key_value_heads": dense.num_key_value_heads,
        "hidden_act": dense.hidden_act,
        "max_position_embeddings": dense.max_position_embeddings,
        "initializer_range": dense.initializer_range,
        "rms_norm_eps": dense.rms_norm_eps,
        "attention_dropout": dense.attention_dropout,
        "rope_parameters": dict(dense.rope_parameters),
        "tie_word_embeddings": dense.tie_word_embeddings,
        "bos_token_id": dense.bos_token_id,
        "eos_token_id": dense.eos_token_id,
        "pad_token_id": dense.pad_token_id,
        "output_router_logits": False,
    }
    head_dim = getattr(dense, "head_dim", None)
    if head_dim is not None:
        fields["head_dim"] = head_dim
    return fields


def moe_config(dense, spec: UpcycleSpec):  # -> MixtralConfig | Qwen2MoeConfig
    """The MoE config for a dense Llama config: Mixtral for every layer, Qwen2-MoE for a subset."""
    check_dense_config(dense)
    layers = spec.moe_layers(dense.num_hidden_layers)
    common = _common_fields(dense)
    if len(layers) == dense.num_hidden_layers:
        from transformers import MixtralConfig

        return MixtralConfig(**common, intermediate_size=dense.intermediate_size, num_local_experts=spec.num_experts,
                             num_experts_per_tok=spec.top_k, router_jitter_noise=0.0, sliding_window=None)
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **common,
        intermediate_size=dense.intermediate_size,  # the dense layers' MLPs
        moe_intermediate_size=dense.intermediate_size,
        shared_expert_intermediate_size=0,  # the family's shared expert, made to add exactly zero
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(dense.num_hidden_layers) if i not in layers],
        qkv_bias=False,
        use_sliding_window=False,
    )  # head_dim is no declared Qwen2-MoE field; it is kept as an attribute, which its attention reads


# -- state -----------------------------------------------------------------------------------------

def router_weights(num_layers: int, layers: Sequence[int], num_experts: int, hidden_size: int,
                   std: float, seed: int, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """A fresh ``[E, H]`` router per upcycled layer, N(0, std) from one seeded generator in layer order."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(num_layers):
        weight = torch.randn(num_experts, hidden_size, generator=generator, dtype=torch.float32) * std
        if layer in layers:  # draw for every layer so a layer's router does not depend on the selection
            out[layer] = weight.to(dtype)
    return out


def upcycle_state(dense_state: Mapping[str, torch.Tensor], num_layers: int, layers: Sequence[int],
                  num_experts: int, routers: Mapping[int, torch.Tensor],
                  shared_expert: bool = False) -> dict[str, torch.Tensor]:
    """Dense Llama state dict -> the MoE's, names as transformers >= 5 holds them in memory.

    For an upcycled layer ``l``: ``mlp.experts.gate_up_proj [E, 2I, H]`` is ``cat(gate, up)`` repeated
    E times (gate first: the experts' forward does ``linear(x, gate_up).chunk(2)`` -> gate, up),
    ``mlp.experts.down_proj [E, H, I]`` is ``down`` repeated, ``mlp.gate.weight`` is ``routers[l]``.
    ``shared_expert`` adds Qwen2-MoE's zero-width shared expert and its (inert) gate.
    Every other tensor is passed through unchanged (the same tensor object: no copy).
    """
    chosen = set(layers)
    out: dict[str, torch.Tensor] = {}
    mlp: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in dense_state.items():
        parts = name.split(".")
        if len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[3] == "mlp" and parts[4] in _MLP:
            layer = int(parts[2])
            if layer in chosen:
                mlp.setdefault(layer, {})[parts[4]] = tensor
                continue
        out[name] = tensor
    missing = sorted(chosen - set(mlp))
    if missing or any(len(m) != 3 for m in mlp.values()):
        raise ConfigError(f"dense state lacks the MLP weights of layer(s) {missing or sorted(mlp)}")
    for layer in sorted(mlp):
        m, prefix = mlp[layer], f"model.layers.{layer}.mlp"
        gate_up = torch.cat([m["gate_proj"], m["up_proj"]], dim=0)  # [2I, H]
        out[f"{prefix}.experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(num_experts, 1, 1)
        out[f"{prefix}.experts.down_proj"] = m["down_proj"].unsqueeze(0).repeat(num_experts, 1, 1)
        out[f"{prefix}.gate.weight"] = routers[layer]
        if shared_expert:
            hidden, dtype = gate_up.shape[1], gate_up.dtype
            out[f"{prefix}.shared_expert.gate_proj.weight"] = torch.zeros(0, hidden, dtype=dtype)
            out[f"{prefix}.shared_expert.up_proj.weight"] = torch.zeros(0, hidden, dtype=dtype)
            out[f"{prefix}.shared_expert.down_proj.weight"] = torch.zeros(hidden, 0, dtype=dtype)
            out[f"{prefix}.shared_expert_gate.weight"] = torch.zeros(1, hidden, dtype=dtype)
    return out


# -- model -----------------------------------------------------------------------------------------

@torch.no_grad()
def upcycle_model(dense: nn.Module, spec: UpcycleSpec) -> nn.Module:
    """A dense ``LlamaForCausalLM`` -> a Mixtral (or Qwen2-MoE) causal LM with the same outputs."""
    from transformers import AutoModelForCausalLM

    config = moe_config(dense.config, spec)
    num_layers = dense.config.num_hidden_layers
    layers = spec.moe_layers(num_layers)
    dtype = next(dense.parameters()).dtype
    std = dense.config.initializer_range if spec.router_std is None else spec.router_std
    routers = router_weights(num_layers, layers, spec.num_experts, dense.config.hidden_size, std, spec.seed, dtype)
    state = upcycle_state(dense.state_dict(), num_layers, layers, spec.num_experts, routers,
                          shared_expert=config.model_type == "qwen2_moe")
    with warnings.catch_warnings():  # Qwen2-MoE's zero-width shared expert: torch notes it cannot init it
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ConfigError(f"upcycled state does not fit {type(model).__name__}: "
                          f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = dense.generation_config
    return model.eval()


# -- directories -----------------------------------------------------------------------------------

def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir}: exists and is not an empty directory (choose a new folder)")


def read_dense_config(src_dir: Path):  # -> LlamaConfig
    """The checkpoint's config, checked to be one this module can upcycle exactly."""
    from transformers import AutoConfig

    src_dir = Path(src_dir)
    if not (src_dir / "config.json").is_file():
        raise ConfigError(f"{src_dir}: not a checkpoint directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(src_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{src_dir}: cannot read config.json: {first}") from None
    check_dense_config(config)
    return config


def load_dense(src_dir: Path) -> nn.Module:
    """The dense checkpoint at ``src_dir`` in its stored dtype, from local files only."""
    from transformers import AutoModelForCausalLM

    read_dense_config(src_dir)
    return AutoModelForCausalLM.from_pretrained(Path(src_dir), local_files_only=True, dtype="auto").eval()


def copy_side_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy the source's top-level non-weight files (tokenizer, generation config, licence, README)."""
    copied = []
    for path in sorted(Path(src_dir).iterdir()):
        if (not path.is_file() or path.name in _NOT_COPIED_NAMES or path.name.endswith(_NOT_COPIED_SUFFIXES)
                or path.name.startswith(".")):
            continue
        shutil.copy2(path, dst_dir / path.name)
        copied.append(path.name)
    return copied


def publish_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Rename a finished temporary directory onto ``out_dir`` (absent or empty): readers never see half."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    os.replace(tmp_dir, out_dir)


def _write_provenance(out_dir: Path, src_dir: Path, spec: UpcycleSpec, model: nn.Module) -> None:
    """``upcycle.json``: enough to redo the conversion and to tell an upcycled checkpoint apart."""
    num_layers = model.config.num_hidden_layers
    record = {
        "method": "sparse upcycling (Komatsuzaki et al. 2022): experts copied from the dense MLP, fresh router",
        "source": str(src_dir.resolve()),
        "architecture": model.config.model_type,
        "experts": spec.num_experts,
        "top_k": spec.top_k,
        "layers": list(spec.moe_layers(num_layers)),
        "router_std": model.config.initializer_range if spec.router_std is None else spec.router_std,
        "seed": spec.seed,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out_dir / "upcycle.json").write_text(json.dumps(record, indent=2) + "\n")


def upcycle_checkpoint(src_dir: Path, out_dir: Path, spec: UpcycleSpec) -> Path:
    """Read a dense checkpoint directory, upcycle it and write a normal HF checkpoint directory.

    ``out_dir`` gets ``model.safetensors`` (transformers' hub layout), ``config.json``, the source's
    tokenizer / generation / licence files, and ``upcycle.json`` recording how it was made. It is
    written into a temporary sibling folder and renamed at the end, so it is complete or absent.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    _check_out_dir(out_dir)
    start = time.perf_counter()
    spec.moe_layers(read_dense_config(src_dir).num_hidden_layers)  # a bad layer choice fails before any work
    dense = load_dense(src_dir)
    loaded = time.perf_counter()
    moe = upcycle_model(dense, spec)
    del dense
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        moe.save_pretrained(tmp)
        copied = copy_side_files(src_dir, tmp)
        _write_provenance(tmp, src_dir, spec, moe)
        _check_out_dir(out_dir)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log_event(log, "upcycled", source=str(src_dir), out=str(out_dir), architecture=moe.config.model_type,
              experts=spec.num_experts, top_k=spec.top_k, layers=len(spec.moe_layers(moe.config.num_hidden_layers)),
              parameters=sum(p.numel() for p in moe.parameters()), copied=",".join(copied) or "-",
              load_s=round(loaded - start, 2), total_s=round(time.perf_counter() - start, 2))
    return out_dir


def run_upcycle(src: Path | None, out: Path, origin: str | None, experts: int, top_k: int, layers: str | None,
                seed: int, cache_dir: Path | None = None) -> int:
    """``fcmoe upcycle``: SRC (a directory) or ``--from smollm2`` -> OUT; prints one line."""
    if (src is None) == (origin is None):
        raise ConfigError("give either a dense checkpoint directory SRC or --from smollm2 (exactly one)")
    if cache_dir is not None and origin is None:
        raise ConfigError("--cache-dir applies to --from only")
    spec = UpcycleSpec(experts, top_k, parse_layers(layers), seed)
    _check_out_dir(Path(out))  # before a conversion that may take a while
    if origin == "smollm2":
        from fcmoe.model.smollm2 import smollm2_dense_dir

        src = smollm2_dense_dir(cache_dir)
    assert src is not None
    path = upcycle_checkpoint(src, out, spec)
    record = json.loads((path / "upcycle.json").read_text())
    print(f"upcycled {src} -> {path}: {record['architecture']}, {spec.num_experts} experts, top-{spec.top_k}, "
          f"{len(record['layers'])} MoE layer(s), {record['parameters']:,} parameters")
    return 0
