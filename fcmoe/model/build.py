"""Build an HF MoE causal LM from a config or a local directory and make the chosen numbers trainable.

Both roles call :func:`build_model` with the same ``ModelConfig`` and therefore obtain the same
trainable parameter names and shapes (the aggregator uses it for the initial global state and the
layout, a silo for training). transformers >= 5 stores experts fused (``mlp.experts.gate_up_proj``
``[E, 2I, H]``, ``mlp.experts.down_proj`` ``[E, H, I]``); LoRA on them goes through PEFT's
``target_parameters``.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from fcmoe.config import BuiltinModelConfig, ModelConfig, TrainableConfig
from fcmoe.errors import ConfigError, LayoutError
from fcmoe.logs import log_event

log = logging.getLogger(__name__)
# peft 0.21 calls a transformers 5 API that transformers deprecates: noise in every silo log, not ours to fix.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

BYTE_VOCAB_SIZE = 260  # 256 bytes + BOS/EOS/PAD, rounded up (see silo_agent.data.tokenize)
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
ROUTER_SUFFIX = "mlp.gate.weight"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def num_experts(hf_config) -> int:
    """Routed experts per MoE layer, whatever the family calls the field."""
    for field in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = getattr(hf_config, field, None)
        if isinstance(value, int) and value > 1:
            return value
    raise LayoutError(f"{type(hf_config).__name__} declares no routed experts (not an MoE model?)")


def build_base_model(spec: ModelConfig, device: str | torch.device = "cpu") -> nn.Module:
    """The frozen base model: seeded random init for built-ins, a local checkpoint otherwise."""
    from transformers import AutoModelForCausalLM

    dtype = _DTYPES[spec.dtype]
    if spec.source == "builtin":
        torch.manual_seed(spec.builtin.seed)
        model = AutoModelForCausalLM.from_config(builtin_hf_config(spec.builtin), dtype=dtype)
    else:
        assert spec.path is not None
        if not spec.path.is_dir():
            raise ConfigError(f"model.path = {str(spec.path)!r}: not a directory")
        model = AutoModelForCausalLM.from_pretrained(spec.path, local_files_only=True, dtype=dtype)
    num_experts(model.config)  # fail early on a dense model
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_trainable(model: nn.Module, trainable: TrainableConfig, seed: int = 0) -> nn.Module:
    """Apply the run's trainable choice; returns the model to train (a PeftModel for LoRA)."""
    if trainable.mode == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)  # LoRA A init; the aggregator's initial global overrides it anyway
        config = LoraConfig(
            r=trainable.lora_rank,
            lora_alpha=trainable.lora_alpha,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"] if trainable.attention_lora else [],
            target_parameters=list(EXPERT_PARAMETERS),
        )
        model = get_peft_model(model, config)
        for name, p in model.named_parameters():
            if "lora_" not in name:
                p.requires_grad_(False)
    else:
        for name, p in model.named_parameters():
            expert = any(name.endswith(s) for s in EXPERT_PARAMETERS) or ".mlp.shared_expert" in name
            p.requires_grad_(expert)
    if trainable.router:
        for name, p in model.named_parameters():
            if name.endswith(ROUTER_SUFFIX):
                p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise LayoutError("no trainable parameters: the model has no fused experts this project recognises")
    return model


def build_model(spec: ModelConfig, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    model = make_trainable(build_base_model(spec, device), spec.trainable, seed)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log_event(log, "model_built", source=spec.source, mode=spec.trainable.mode,
              trainable=n_train, total=n_all, device=str(device))
    return model


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
    """SHA-256 over the frozen weights, so silos and aggregator can tell they start from the same base."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            continue
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
