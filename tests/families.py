"""Tiny checkpoints of every Mixture-of-Experts causal-LM family that the installed transformers registers.

Not a test module: a parametrised test imports it. ``moe_model_types()`` lists the families at call time
(a causal-LM class whose modeling module defines a class named ``*Experts``, ``*Moe*`` or ``*MoE*``);
``tiny_config(model_type)`` shrinks the family's default config to a model of a few thousand parameters
(vocabulary 260 = the project's byte tokenizer, hidden size 32, 2 decoder layers, 4 routed experts,
top-2, expert width 16), and ``save_tiny_checkpoint`` writes it with the byte tokenizer beside it so that
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(folder)`` load it offline.

``tiny_model(model_type, seed)`` builds the same model in memory (what the checkpoint holds).

The shrink is generic (``_GENERIC``: whichever of the common field names the family's config has, plus
``_shrink``'s rules: per-layer lists cut to two layers with every MLP sparse, one shared expert, and as many
key/value heads as query heads under multi-head latent attention, whose latent is expanded per query head).
What one family needs beyond it is in ``_OVERRIDES`` (text-config fields), ``_COMPOSITE_OVERRIDES``
(top-level fields of a composite config) and ``_FINISH`` (a fix-up of the built model), one comment each:
a family's config validation rejecting the generic values (dots3_note, zaya, granitemoehybrid), an MoE
block that is off by default (doge, gemma4), a layer pattern that two layers do not cover (jamba, lfm2_moe,
nemotron_h), a default that cannot run as is (dbrx), a size the generic names miss (longcat_flash's
zero-compute experts), a warning (gpt_oss's YaRN), a routing table a real checkpoint supplies (deepseek_v4).

Every type builds and trains on CPU (forward, loss, backward in train and eval mode, reload with equal
parameters); ``EXCLUDED`` names the ones the project itself does not support.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

# Families the project does not support, with the reason (docs/models.md lists them; the family test
# leaves them out by name, so a family is never silently skipped).
EXCLUDED: dict[str, str] = {}

VOCAB, BOS, EOS, PAD = 260, 256, 257, 258
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 32, 2, 4, 2, 8
EXPERTS, TOP_K, EXPERT_WIDTH = 4, 2, 16

_MOE_CLASS = re.compile(r"Experts$|Moe|MoE")


def moe_model_types() -> list[str]:
    """Causal-LM model types whose modeling module defines its own MoE class (``*Experts``/``*Moe*``)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        try:
            module = inspect.getmodule(getattr(transformers, class_name))
        except (AttributeError, ImportError):  # a class whose optional dependency is missing
            continue
        if any(inspect.isclass(o) and o.__module__ == module.__name__ and _MOE_CLASS.search(name)
               for name, o in vars(module).items()):
            found.append(model_type)
    return sorted(found)


# Generic shrink: field -> value, applied where the family's default config has the field (and, for the
# fields in _ONLY_IF_SET, only where the default is set: a None/0 there means "the family has none").
_GENERIC: dict[str, object] = {
    "vocab_size": VOCAB, "unpadded_vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB,
    "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD,
    "hidden_size": HIDDEN, "d_model": HIDDEN,
    "num_hidden_layers": LAYERS, "n_layers": LAYERS, "num_layers": LAYERS,
    "num_attention_heads": HEADS, "n_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
    "kv_channels": HEAD_DIM, "swa_num_attention_heads": HEADS, "swa_num_key_value_heads": KV_HEADS,
    "swa_head_dim": HEAD_DIM,
    # multi-head latent attention (DeepSeek-style)
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": HEAD_DIM, "qk_rope_head_dim": HEAD_DIM,
    "qk_head_dim": 2 * HEAD_DIM, "v_head_dim": HEAD_DIM, "o_lora_rank": 16, "o_groups": 2,
    # sparse-attention indexers
    "index_n_heads": 2, "index_head_dim": HEAD_DIM, "index_topk": 8,
    "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": HEAD_DIM, "indexer_budget": 8,
    "indexer_compress_ratio": 2,
    # linear attention / Mamba mixers
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": HEAD_DIM,
    "linear_value_head_dim": HEAD_DIM, "linear_num_heads": HEADS, "linear_head_dim": HEAD_DIM,
    # feed-forward widths: dense MLPs, routed experts, shared experts
    "intermediate_size": EXPERT_WIDTH, "moe_intermediate_size": EXPERT_WIDTH, "ffn_hidden_size": EXPERT_WIDTH,
    "expert_ffn_hidden_size": EXPERT_WIDTH, "intermediate_size_mlp": EXPERT_WIDTH,
    "dense_intermediate_size": EXPERT_WIDTH, "prefix_dense_intermediate_size": EXPERT_WIDTH,
    "shared_expert_intermediate_size": EXPERT_WIDTH, "moe_shared_expert_intermediate_size": EXPERT_WIDTH,
    "shared_experts_intermediate_size": EXPERT_WIDTH, "shared_intermediate_size": EXPERT_WIDTH,
    # experts and routing
    "num_local_experts": EXPERTS, "num_experts": EXPERTS, "n_routed_experts": EXPERTS,
    "moe_num_experts": EXPERTS,
    "num_experts_per_tok": TOP_K, "num_experts_per_token": TOP_K, "top_k": TOP_K, "moe_topk": TOP_K,
    "moe_k": TOP_K, "moe_top_k": TOP_K, "top_k_experts": TOP_K,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    "n_group": 1, "num_expert_group": 1, "topk_group": 1, "router_hidden_size": 16,
    # every layer an MoE layer
    "first_k_dense_replace": 0, "num_dense_layers": 0, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "moe_layer_freq": 1, "moe_layer_interval": 1, "moe_layer_start_index": 0,
    "interleave_moe_layer_step": 1, "expert_layer_period": 1, "expert_layer_offset": 0,
    # no multi-token-prediction heads
    "num_nextn_predict_layers": 0, "num_mtp_layers": 0,
    # positions, windows, low-rank side paths
    "max_position_embeddings": 128, "max_seq_len": 128, "model_max_length": 128, "sliding_window": 8,
    "sliding_window_size": 8, "attention_chunk_size": 8, "hc_lowrank": 8, "gated_norm_rank": 4,
    "hidden_size_per_layer_input": 8, "ple_embed_dim": 16,
    "initializer_range": 0.02, "tie_word_embeddings": False,
}
_ONLY_IF_SET = {
    "q_lora_rank", "sliding_window", "prefix_dense_intermediate_size", "num_mtp_layers", "num_nextn_predict_layers",
    "n_group", "topk_group", "num_expert_group", "unpadded_vocab_size", "num_experts", "top_k_experts",
    "moe_intermediate_size",
}
_DENSE_MLP = {"dense", "mlp"}

# Per-family additions to the generic shrink (applied last; for composite types, to the text config).
_OVERRIDES: dict[str, dict[str, object]] = {
    # DBRX keeps attention and FFN settings in sub-configs. Its attention reads attn_config.rope_theta,
    # which the sub-config class does not define, and calls clamp(min=-clip_qkv, max=clip_qkv), which
    # torch rejects when clip_qkv is None (the default)
    "dbrx": {"attn_config": {"kv_n_heads": KV_HEADS, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": EXPERT_WIDTH, "moe_num_experts": EXPERTS, "moe_top_k": TOP_K}},
    # its sliding-window layers require head_dim = qk_nope_head_dim + qk_rope_head_dim
    "dots3_note": {"head_dim": 2 * HEAD_DIM},
    "dots3_note_text": {"head_dim": 2 * HEAD_DIM},
    # the MoE block is off by default (is_moe=False); its product-key router needs a square expert count
    "doge": {"is_moe": True, "num_experts": EXPERTS, "num_experts_per_tok": TOP_K},
    # the MoE block is off by default (enable_moe_block=False, num_experts=None)
    "gemma4": {"enable_moe_block": True, "num_experts": EXPERTS, "top_k_experts": TOP_K,
               "moe_intermediate_size": EXPERT_WIDTH},
    "gemma4_text": {"enable_moe_block": True, "num_experts": EXPERTS, "top_k_experts": TOP_K,
                    "moe_intermediate_size": EXPERT_WIDTH},
    # Mamba-2 mixer: heads * head size = expand * hidden; one Mamba and one attention layer
    "granitemoehybrid": {"mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_chunk_size": 16,
                         "layer_types": ["linear_attention", "full_attention"]},
    # YaRN scaling from 4096 original positions warns on a 128-position model: plain RoPE instead
    "gpt_oss": {"rope_parameters": {"rope_type": "default", "rope_theta": 150000.0}},
    # layer 0 Mamba, layer 1 attention (the default period of 8 leaves no attention layer in 2)
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "mamba_dt_rank": 4, "mamba_d_state": 8},
    # default layer_types is None; one short-convolution layer and one attention layer
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # zero-compute (identity) experts beside the routed ones: 256 by default
    "longcat_flash": {"zero_expert_num": 2},
    # the layer pattern is the layer list itself; Mamba-2 sizes shrunk (the default Mamba is 128 heads x 64)
    "nemotron_h": {"layers_block_type": ["full_attention", "moe"], "mamba_num_heads": 4, "mamba_head_dim": 16,
                   "ssm_state_size": 8, "n_groups": 1, "chunk_size": 16},
    # ZAYA supports top-1 routing only
    "zaya": {"num_experts_per_tok": 1},
}

# Top-level additions for composite types (whose AutoModelForCausalLM may build only the text model, but
# whose config still validates its vision/audio sub-configs against the text one).
_COMPOSITE_OVERRIDES: dict[str, dict[str, object]] = {
    # the vision and audio adapters must output the text hidden size
    "dots3_note": {"vision_config": {"adapter_out_dim": HIDDEN}, "audio_config": {"adapter_out_dim": HIDDEN}},
}


def _pattern(values: list, keep=lambda v: True) -> list:
    """A per-layer list cut to LAYERS entries: its first distinct kept values in order, the last repeated."""
    distinct: list = []
    for v in values:
        if keep(v) and v not in distinct:
            distinct.append(v)
    distinct = distinct[:LAYERS] or values[:1]
    return distinct + [distinct[-1]] * (LAYERS - len(distinct))


def _shrink(default) -> dict[str, object]:
    """Overrides of the generic recipe for the fields that ``default`` (a family's default config) has."""
    fields = default.to_dict()
    out = {k: v for k, v in _GENERIC.items()
           if k in fields and not (k in _ONLY_IF_SET and not fields[k])}
    if "kv_lora_rank" in fields:  # multi-head latent attention expands the latent into every query head
        out["num_key_value_heads"] = HEADS
    for name in ("layer_types", "indexer_types", "no_rope_layers", "layer_rope_theta"):
        if isinstance(fields.get(name), list):
            out[name] = _pattern(fields[name])
    if isinstance(fields.get("mlp_layer_types"), list):  # every layer sparse
        out["mlp_layer_types"] = _pattern(fields["mlp_layer_types"], lambda v: v not in _DENSE_MLP)
    if isinstance(fields.get("moe_layers"), list):
        out["moe_layers"] = list(range(LAYERS))
    if isinstance(fields.get("num_attention_heads_per_layer"), list):
        out["num_attention_heads_per_layer"] = [HEADS] * LAYERS
    if "per_layer_config" in fields:  # per-layer exceptions name layers of the full-size model
        out["per_layer_config"] = {}
    return out


def tiny_config(model_type: str):
    """A tiny config of ``model_type`` (see the module docstring); composite types shrink their text config."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    overrides = _OVERRIDES.get(model_type, {})
    if "text_config" in default.sub_configs and getattr(default, "text_config", None) is not None:
        text = {**_shrink(default.text_config), **overrides}
        top = {k: _GENERIC[k] for k in ("tie_word_embeddings", "initializer_range") if k in default.to_dict()}
        top.update(_COMPOSITE_OVERRIDES.get(model_type, {}))
        return AutoConfig.for_model(model_type, text_config=text, **top)
    return AutoConfig.for_model(model_type, **{**_shrink(default), **overrides})


def tiny_model(model_type: str, seed: int = 0):
    """The seeded tiny float32 model of ``model_type``: ``from_config(tiny_config(...))`` after
    ``torch.manual_seed(seed)``, with the fix-ups of ``_FINISH`` applied."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
    for finish in _FINISH.get(model_type, ()):
        finish(model)
    return model


def _spread_hash_routes(model) -> None:
    """DeepSeek-V4's hash-routed layers pick experts by a token -> experts table (``tid2eid``) that a
    checkpoint supplies and initialisation leaves at zeros (every token to expert 0, k times); fill it
    with a fixed spread: token t goes to experts t, t+1, ... (mod the expert count)."""
    import torch

    for module in model.modules():
        if hasattr(module, "tid2eid"):
            vocab, k = module.tid2eid.shape
            table = (torch.arange(vocab)[:, None] + torch.arange(k)[None, :]) % module.num_experts
            module.tid2eid.copy_(table)


# What a checkpoint of the family supplies that from_config leaves unset (applied to the built model).
_FINISH = {"deepseek_v4": (_spread_hash_routes,)}


def save_tiny_checkpoint(model_type: str, folder, seed: int = 0) -> None:
    """``tiny_model(model_type, seed)`` in safetensors and the byte tokenizer, both in ``folder``."""
    from fcmoe.model.tokenizer import byte_tokenizer

    tiny_model(model_type, seed).save_pretrained(Path(folder))
    byte_tokenizer().save_pretrained(Path(folder))
