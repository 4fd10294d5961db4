"""Build an HF MoE causal LM from a config or a local directory and make the chosen numbers trainable.

Both roles call :func:`build_model` with the same ``ModelConfig`` and therefore obtain the same
trainable parameter names and shapes (the aggregator uses it for the initial global state and the
layout, a silo for training). Where a family keeps its experts, routers and shared experts comes from
:mod:`fcmoe.model.discovery`; LoRA on fused expert tensors goes through PEFT's ``target_parameters``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from fcmoe.config import BuiltinModelConfig, ModelConfig, TrainableConfig
from fcmoe.errors import ConfigError, LayoutError
from fcmoe.logs import log_event
from fcmoe.model.discovery import discover

log = logging.getLogger(__name__)
# peft 0.21 calls a transformers 5 API that transformers deprecates: noise in every silo log, not ours to fix.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

BYTE_VOCAB_SIZE = 260  # 256 bytes + BOS/EOS/PAD, rounded up (see silo_agent.data.tokenize)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def builtin_hf_config(spec: BuiltinModelConfig):  # -> transformers.PretrainedConfig
    """The transformers config of a tiny built-in MoE of the requested family."""
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig

    common = dict(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        num_experts_per_tok=spec.top_k,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        tie_word_embeddings=False,
        initializer_range=spec.initializer_range,
    )
    if spec.family == "mixtral":
        return MixtralConfig(**common, num_local_experts=spec.num_experts)
    if spec.family == "qwen2_moe":
        return Qwen2MoeConfig(
            **common,
            num_experts=spec.num_experts,
            moe_intermediate_size=spec.intermediate_size,
            shared_expert_intermediate_size=spec.intermediate_size,
            decoder_sparse_step=1,
        )
    return OlmoeConfig(**common, num_experts=spec.num_experts)


def build_base_model(spec: ModelConfig, device: str | torch.device = "cpu") -> nn.Module:
    """The frozen base model: seeded random init for built-ins, a local checkpoint otherwise; on the
    ``meta`` device, its shapes only (nothing allocated, nothing read but the checkpoint's config)."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[spec.dtype]
    config = hf_config(spec)  # a local checkpoint's folder and config.json checked first, in one line each
    if torch.device(device).type == "meta":  # shapes only: a rank that receives its weights from rank 0
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif spec.source == "builtin":
        torch.manual_seed(spec.builtin.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec.path, local_files_only=True, dtype=dtype)
    discover(model)  # refuse at once a model whose experts cannot be found (one line naming its class)
    if torch.device(device).type != "meta":
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def hf_config(spec: ModelConfig):  # -> transformers.PretrainedConfig
    """The transformers config of ``spec``: the built-in's, or ``config.json`` of ``model.path`` alone (no
    weights read), with a one-line error naming the path when it cannot be read."""
    if spec.source == "builtin":
        return builtin_hf_config(spec.builtin)
    from transformers import AutoConfig

    assert spec.path is not None
    where = f"model.path = {str(spec.path)!r}"
    if not spec.path.is_dir():
        raise ConfigError(f"{where}: not a directory")
    if not (spec.path / "config.json").is_file():
        raise ConfigError(f"{where}: no config.json")
    try:
        return AutoConfig.from_pretrained(spec.path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        lines = str(exc).strip().splitlines()
        raise ConfigError(f"{where}: cannot read config.json: {lines[0] if lines else type(exc).__name__}") from None


def make_trainable(model: nn.Module, trainable: TrainableConfig, seed: int = 0) -> nn.Module:
    """Apply the run's trainable choice; returns the model to train (a PeftModel for LoRA).

    What counts as an expert, a router or a shared expert comes from :func:`discover`, so every family
    it knows trains the same way. Parameters are chosen by identity: PEFT wraps modules in place but
    keeps the base parameters, so the choice made on the base model holds after wrapping.
    """
    structure = discover(model)
    experts = [t.param for t in structure.expert_tensors]
    if trainable.router and not structure.router_params:
        raise ConfigError(f"model.trainable.router = true: no router found in {structure.model_class}")
    if trainable.mode == "lora":
        from peft import get_peft_model

        if structure.facts.no_lora:
            raise ConfigError(f"model.trainable.mode = lora: not for {structure.model_class}: {structure.facts.no_lora}")

        torch.manual_seed(seed)  # LoRA A init; the aggregator's initial global overrides it anyway
        model = get_peft_model(model, lora_config(trainable, model))
        if trainable.attention_lora and not any(n.endswith(("q_proj.lora_A.default.weight", "v_proj.lora_A.default.weight"))
                                                for n, _ in model.named_parameters()):
            raise ConfigError(f"model.trainable.attention_lora = true: {structure.model_class} has no attention "
                              "projection named q_proj or v_proj")
        chosen = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    else:
        chosen = {id(p) for p in experts + structure.shared_params}
    if trainable.router:
        chosen |= {id(p) for p in structure.router_params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    if not chosen:
        raise LayoutError(f"{structure.model_class}: nothing to train for mode {trainable.mode!r}")
    return model


def lora_config(trainable: TrainableConfig, model: nn.Module, modules_to_save: list[str] | None = None):
    """PEFT's config for the run's LoRA on ``model`` (the base): every expert tensor (biases left out),
    named as briefly as names say exactly those tensors (``mlp.experts.gate_up_proj``), plus attention's
    q/v projections when asked (``target_modules`` is always given: left unset, PEFT adds its own
    per-family default modules)."""
    from peft import LoraConfig

    targets = [t.name for t in discover(model).expert_tensors
               if t.param.dim() >= 2 and "bias" not in t.name.rsplit(".", 1)[-1]]
    return LoraConfig(r=trainable.lora_rank, lora_alpha=trainable.lora_alpha, lora_dropout=0.0,
                      target_modules=["q_proj", "v_proj"] if trainable.attention_lora else [],
                      target_parameters=short_names(targets, [n for n, _ in model.named_parameters()]),
                      modules_to_save=modules_to_save)


def short_names(wanted: list[str], names: list[str]) -> list[str]:
    """``wanted`` (full paths) with the part up to the layer index dropped (``mlp.gate``) when those
    suffixes match exactly the same paths among ``names``, else as they are: what PEFT configs read."""
    short = list(dict.fromkeys(re.sub(r"^(?:.*\.)?\d+\.", "", m) for m in wanted))  # in order: PEFT wraps in it
    matched = {n for n in names if any(n == s or n.endswith("." + s) for s in short)}
    return short if matched == set(wanted) else list(wanted)


def build_model(spec: ModelConfig, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    model = make_trainable(build_base_model(spec, device), spec.trainable, seed)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log_event(log, "model_built", source=spec.source, mode=spec.trainable.mode,
              trainable=n_train, total=n_all, device=str(device))
    return model


def checkpoint_activations(model: nn.Module) -> None:
    """Keep only each decoder layer's input for the backward pass and recompute the rest: LoRA on fused
    experts saves every layer's merged expert weights for backward otherwise, which can outweigh the base."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # through PEFT's wrapper
    hf.config.use_cache = False  # no key/value cache in training (transformers warns when it must turn it off)
    hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached float32 copies of every trainable parameter, by name."""
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in state.items():
        if name not in params or not params[name].requires_grad:
            raise LayoutError(f"parameter {name!r} is not trainable in this model")
        params[name].copy_(value.to(params[name].device, params[name].dtype))


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the frozen weights, so silos and aggregator can tell they start from the same base.
    One digest per tensor, combined in name order: a sharded silo digests its base as it streams it in
    the checkpoint's order (:class:`fcmoe.model.stream.CheckpointStream`) and gets the same answer."""
    return combine_digests({n: tensor_digest(p) for n, p in model.named_parameters() if not p.requires_grad})


def tensor_digest(tensor: torch.Tensor) -> bytes:
    return hashlib.sha256(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).digest()


def combine_digests(digests: Mapping[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(name.encode())
        h.update(digests[name])
    return h.hexdigest()
