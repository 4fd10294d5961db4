"""How much GPU memory a silo's local training takes per rank, from a checkpoint's config alone.

``fcmoe plan-memory`` answers before anyone buys or books GPUs: :func:`read_model` builds the Hugging Face
model on the meta device (shapes, no weights, no allocation) and asks :mod:`fcmoe.model.discovery`
where the experts, routers and shared experts are, so every family discovery knows is planned the
same way; :func:`plan_memory` turns those counts into bytes per rank for one layout. Only the reading
touches torch modules; the planning is arithmetic on :class:`ModelShape`.

What is counted, and why (docs/operations.md, *Planning a silo's memory*):

* **Parameters.** The frozen base in ``model.dtype``; LoRA factors in float32 (PEFT casts adapters of
  a bf16 base to float32); router and full-mode experts are base tensors, so in ``model.dtype``.
* **Gradients and optimizer.** One gradient per trainable number, in that number's dtype; AdamW keeps
  two moments in the parameter's dtype plus a 4-byte ``step`` per tensor. No float32 master copy:
  the silo runs ``torch.optim.AdamW`` on the parameters as they are (full-mode bf16 experts train in
  bf16). Under DDP (``silo.world_size`` > 1) each rank also holds DDP's gradient buckets (one more
  copy of the gradients).
* **FSDP** (FSDP2 ``fully_shard`` on every decoder layer, the input embeddings and the output head,
  then the root): each tensor split on dim 0 into N padded chunks; the root's own parameters (the
  final norm; embeddings and head too where they are tied) stay gathered through forward and backward
  (FSDP2 does not reshard the root), and two of the other groups are gathered at a time (the running
  one and the prefetched next); one layer's unsharded gradients wait for their reduce-scatter.
* **Activations** are an estimate (:func:`_layer_activation`): what autograd keeps per token between
  forward and backward in transformers' own code (grouped-mm experts, SDPA attention, RMSNorm's
  float32 copy), plus what LoRA on fused experts costs: PEFT folds ``W + BA`` into one tensor the size
  of the expert stack on every forward, and autograd keeps it for backward, in every MoE layer.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fcmoe.config import ModelConfig, TrainableConfig, load_config
from fcmoe.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from fcmoe.model.discovery import MoeLayer

GIB = 1024**3
FIT_GIB = 80  # the fit check; an "80GB" A100/H100 reports about 79.6 GiB, CUDA context and allocator slack not counted
_LORA_BYTES = 4  # PEFT autocasts adapter weights of a bf16/fp16 base to float32
_STEP_BYTES = 4  # AdamW's per-tensor ``step``: a float32 scalar
_LOSS_BYTES = 12  # per vocabulary entry and token as backward starts: the log-softmax output, its gradient and
# the NLL loss's gradient, all float32
ASSUMPTIONS = (
    "AdamW as the silo runs it: two moments in each trainable tensor's dtype and a float32 step per tensor; "
    "no float32 master copy",
    "LoRA factors in float32 (PEFT's autocast); base weights, router and full-mode experts in model.dtype",
    "ddp: every rank a whole replica, plus DDP's gradient buckets (none at 1 GPU: one process)",
    "fsdp: FSDP2 fully_shard per decoder layer, embeddings, head and the root; dim-0 shards; the root and two "
    "groups gathered",
    "activations: an estimate (SDPA attention, eager where the family has none), rows split over the ranks; "
    "CUDA context and allocator fragmentation not counted",
)
# FSDP groups other than the decoder layers, as Tensor.layer: the root (final norm; embeddings and head where
# tied), the input embeddings, the output head
ROOT_GROUP, EMBEDDINGS_GROUP, HEAD_GROUP = -1, -2, -3
_TOP_K_NAMES = ("num_experts_per_tok", "moe_top_k", "top_k", "num_experts_per_token", "experts_per_token", "moe_k")


@dataclass(frozen=True)
class Tensor:
    """One parameter as the plan sees it."""

    numel: int
    itemsize: int
    dim0: int  # FSDP2 shards on dim 0
    layer: int  # decoder layer index; ROOT_GROUP, EMBEDDINGS_GROUP, HEAD_GROUP: FSDP's other groups
    trainable: bool
    lora: bool = False  # a LoRA factor PEFT adds (not a base weight)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def shard_bytes(self, ranks: int) -> int:
        """Bytes of one rank's dim-0 chunk (FSDP2 pads dim 0 to a multiple of the ranks)."""
        return math.ceil(self.dim0 / ranks) * (self.numel // max(self.dim0, 1)) * self.itemsize


@dataclass(frozen=True)
class LayerActivation:
    per_token: int  # bytes autograd keeps per token of this layer
    fixed: int  # bytes independent of the batch (LoRA's merged expert weights)
    eager_heads: int  # heads whose [T, T] probabilities eager attention keeps (0 under SDPA)


@dataclass(frozen=True)
class ModelShape:
    """Everything :func:`plan_memory` needs, read once from the meta-device model."""

    model_class: str
    model_type: str
    dtype_bytes: int
    hidden_size: int
    vocab_size: int
    num_experts: int
    top_k: int
    moe_layers: int
    tensors: tuple[Tensor, ...]
    layers: tuple[LayerActivation, ...]
    head_per_token: int  # the final norm's input and the logits, per token (held through backward)
    transient: int  # the largest single tensor backward makes (a merged expert stack's gradient under LoRA)
    notes: tuple[str, ...] = ()
    read_layer_by_layer: bool = False  # a local checkpoint (fcmoe.model.stream); a built-in model is built whole

    @property
    def base_params(self) -> int:
        return sum(t.numel for t in self.tensors if not t.lora)

    @property
    def lora_params(self) -> int:
        return sum(t.numel for t in self.tensors if t.lora)

    @property
    def trainable_params(self) -> int:
        return sum(t.numel for t in self.tensors if t.trainable)


@dataclass(frozen=True)
class Plan:
    """One layout to plan: GPUs, how they share the model, and the micro-batch."""

    gpus: int
    strategy: str  # "ddp" (each rank a replica; one process when gpus == 1) or "fsdp"
    batch_size: int  # rows of one micro-batch, split over the ranks
    seq_len: int
    checkpointing: bool = False  # activation checkpointing per decoder layer: only layer inputs kept


@dataclass(frozen=True)
class Memory:
    """Bytes on one rank (the busiest: rank 0 gets the extra row of an uneven split)."""

    parameters: int
    gathered: int
    gradients: int
    optimizer: int
    activations: int
    host_model: int  # rank 0's host memory (not a GPU's) at start-up, fsdp over > 1 GPU: what it reads to hand out

    @property
    def total(self) -> int:
        return self.parameters + self.gathered + self.gradients + self.optimizer + self.activations

    @property
    def state(self) -> int:
        """Parameters, gradients and optimizer state: what is exact (the rest is gathered or estimated)."""
        return self.parameters + self.gradients + self.optimizer


def plan_memory(shape: ModelShape, plan: Plan) -> Memory:
    """Per-rank bytes of one training step under ``plan``."""
    if plan.gpus < 1 or plan.batch_size < 1 or plan.seq_len < 1:
        raise ConfigError(f"gpus, batch size and sequence length must be positive (got {plan.gpus}, "
                          f"{plan.batch_size}, {plan.seq_len})")
    n = plan.gpus
    train = [t for t in shape.tensors if t.trainable]
    steps = _STEP_BYTES * len(train)
    host = _startup_host_bytes(shape) if n > 1 and plan.strategy == "fsdp" else 0
    if plan.strategy == "ddp":
        grads = sum(t.nbytes for t in train)
        parameters, gathered = sum(t.nbytes for t in shape.tensors), 0
        gradients = grads * (2 if n > 1 else 1)  # DDP's buckets hold a second copy (gradient_as_bucket_view off)
        optimizer = 2 * grads + steps
    elif plan.strategy == "fsdp":
        parameters = sum(t.shard_bytes(n) for t in shape.tensors)
        by_layer: dict[int, list[Tensor]] = {}
        for t in shape.tensors:
            by_layer.setdefault(t.layer, []).append(t)
        group_bytes = sorted((sum(t.nbytes for t in ts) for k, ts in by_layer.items() if k != ROOT_GROUP),
                             reverse=True)
        root = sum(t.nbytes for t in by_layer.get(ROOT_GROUP, []))
        gathered = (root + sum(group_bytes[:2])) if n > 1 else 0
        in_flight = max((sum(t.nbytes for t in ts if t.trainable) for k, ts in by_layer.items() if k >= 0), default=0)
        gradients = sum(t.shard_bytes(n) for t in train) + (in_flight if n > 1 else 0)
        optimizer = 2 * sum(t.shard_bytes(n) for t in train) + steps
    else:
        raise ConfigError(f"strategy {plan.strategy!r}: allowed 'ddp' or 'fsdp'")
    rows = math.ceil(plan.batch_size / n)
    return Memory(parameters, gathered, gradients, optimizer, activation_bytes(shape, rows, plan.seq_len,
                                                                              plan.checkpointing), host)


def _startup_host_bytes(shape: ModelShape) -> int:
    """Rank 0's host memory while it hands the model out under fsdp: a local checkpoint is read one
    layer (or the embeddings, norm and head) at a time, its tensors and their converted form (fused
    experts) both held for a moment, plus the LoRA factors; a built-in model is built whole."""
    if not shape.read_layer_by_layer:
        return sum(t.nbytes for t in shape.tensors)
    groups: dict[int, int] = {}
    for t in shape.tensors:
        if not t.lora:
            group = t.layer if t.layer >= 0 else ROOT_GROUP  # the checkpoint's non-layer keys are read as one group
            groups[group] = groups.get(group, 0) + t.nbytes
    return 2 * max(groups.values(), default=0) + sum(t.nbytes for t in shape.tensors if t.lora)


def activation_bytes(shape: ModelShape, rows: int, seq_len: int, checkpointing: bool = False) -> int:
    """Estimated peak of what autograd keeps for one micro-batch of ``rows`` x ``seq_len`` on one rank.

    Without checkpointing every layer's saved tensors are alive when backward starts at the loss;
    with it only each layer's input (``hidden_size`` values per token) is, and one layer's saved
    tensors are rebuilt at a time during backward.
    """
    tokens = rows * seq_len

    def layer(a: LayerActivation) -> int:
        return tokens * a.per_token + a.fixed + rows * a.eager_heads * seq_len * seq_len * shape.dtype_bytes

    head = tokens * shape.head_per_token
    loss = tokens * shape.vocab_size * _LOSS_BYTES
    if not checkpointing:
        return sum(layer(a) for a in shape.layers) + head + loss + shape.transient
    inputs = len(shape.layers) * tokens * shape.hidden_size * shape.dtype_bytes
    return inputs + head + max([loss] + [layer(a) for a in shape.layers]) + shape.transient


# ---- reading the model ---------------------------------------------------------------------------------


def read_model(spec: ModelConfig) -> ModelShape:
    """Build ``spec``'s model on the meta device and read the shapes the plan needs (no weights read)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from fcmoe.model.build import DTYPES, hf_config
    from fcmoe.model.discovery import decoder_layers, discover, vocabulary_modules

    config = hf_config(spec)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # stdout/stderr carry the plan, not transformers' notices
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[spec.dtype])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{_where(spec)}: transformers cannot build it as a causal LM: {_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    structure = discover(model)  # LayoutError (one line naming the class) when it is not an MoE
    trainable = spec.trainable
    if trainable.router and not structure.router_params:
        raise ConfigError(f"model.trainable.router = true: no router found in {structure.model_class}")
    if trainable.mode == "lora" and structure.facts.no_lora:
        raise ConfigError(f"model.trainable.mode = lora: not for {structure.model_class}: {structure.facts.no_lora}")

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    s = DTYPES[spec.dtype].itemsize
    hidden = int(text.hidden_size)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    head_dim = int(getattr(text, "head_dim", 0) or (hidden // heads if heads else 0))
    first_moe = structure.layers[0]
    block = first_moe.block
    top_k, notes = _top_k(first_moe.router, block, text)
    layer_list = decoder_layers(model, structure)
    moe_by_index = {layer.index: layer for layer in structure.layers}

    # parameters: the base (router / full-mode experts trainable), then LoRA factors as PEFT makes them
    chosen: set[int] = set()
    if trainable.mode == "full":
        chosen |= {id(t.param) for t in structure.expert_tensors} | {id(p) for p in structure.shared_params}
    if trainable.router:
        chosen |= {id(p) for p in structure.router_params}
    layer_of = {id(p): i for i, element in enumerate(layer_list) for p in element.parameters()}
    layer_of |= {id(p): EMBEDDINGS_GROUP if m is model.get_input_embeddings() else HEAD_GROUP
                 for m in vocabulary_modules(model, structure) for p in m.parameters()}
    tensors = [Tensor(p.numel(), s, p.shape[0] if p.dim() else 1, layer_of.get(id(p), ROOT_GROUP),
                      id(p) in chosen) for p in model.parameters()]
    lora: list[Tensor] = []
    merged: dict[int, list[int]] = {}  # layer -> bytes of each merged expert tensor (W + BA), in order
    if trainable.mode == "lora":
        r = trainable.lora_rank
        for layer in structure.layers:
            transposed = any(getattr(c, "is_transposed", False) for c in layer.containers)
            for t in layer.tensors:
                if t.param.dim() < 2 or "bias" in t.name.rsplit(".", 1)[-1]:
                    continue
                shape = tuple(t.param.shape)
                experts, a, b = shape if len(shape) == 3 else (1, shape[1], shape[0])
                if len(shape) == 3 and not transposed:  # PEFT's ParamWrapper: in/out swapped unless transposed
                    a, b = b, a
                lora += [Tensor(r * experts * a, _LORA_BYTES, r * experts, layer.index, True, True),  # A: [r*E, in]
                         Tensor(b * r * experts, _LORA_BYTES, b, layer.index, True, True)]  # B: [out, r*E]
                merged.setdefault(layer.index, []).append(t.param.numel() * s + r * experts * (a + b) * s)
        if trainable.attention_lora:
            projections = [(i, m) for i, element in enumerate(layer_list) for name, m in element.named_modules()
                           if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "v_proj")]
            for i, m in projections:  # PEFT's Linear LoRA: A [r, in], B [out, r]
                lora += [Tensor(r * m.in_features, _LORA_BYTES, r, i, True, True),
                         Tensor(m.out_features * r, _LORA_BYTES, m.out_features, i, True, True)]
            if not projections:
                raise ConfigError(f"model.trainable.attention_lora = true: {structure.model_class} has no attention "
                                  "projection named q_proj or v_proj")

    # activations: nothing is kept before the first trainable tensor; in its layer, only from there on
    first = 0 if trainable.attention_lora else min(moe_by_index)
    eager = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
    layers = []
    for i, element in enumerate(layer_list):
        moe = moe_by_index.get(i)
        if i < first:
            layers.append(LayerActivation(0, 0, 0))
            continue
        partial = i == first and not trainable.attention_lora
        per_token = _layer_activation(element, moe, hidden, heads, head_dim, s, top_k, structure.num_experts,
                                      trainable, partial)
        fixed = merged.get(i, [])
        if partial and fixed:  # the first expert tensor's input needs no gradient: its merged weight is not kept
            fixed = fixed[1:]
        layers.append(LayerActivation(per_token, sum(fixed), heads if eager and not partial else 0))
    if eager:
        notes.append("eager attention (no SDPA for this family): each layer keeps [heads, T, T] probabilities")
    output = model.get_output_embeddings()
    vocab = int(output.weight.shape[0]) if output is not None else int(text.vocab_size)
    in_layers = {id(m) for element in layer_list for m in element.modules()}
    final_norms = sum(_norm_width(m, hidden, heads, head_dim) for m in model.modules()
                      if _is_norm(m) and id(m) not in in_layers)
    transient = max((t.param.numel() * s for t in structure.expert_tensors), default=0) if lora else 0
    return ModelShape(
        model_class=structure.model_class, model_type=structure.model_type, dtype_bytes=s, hidden_size=hidden,
        vocab_size=vocab, num_experts=structure.num_experts, top_k=top_k, moe_layers=len(structure.layers),
        tensors=tuple(tensors + lora), layers=tuple(layers), head_per_token=4 * final_norms + vocab * s,
        transient=transient, notes=tuple(notes), read_layer_by_layer=spec.source == "local")


def _layer_activation(element: nn.Module, moe: MoeLayer | None, hidden: int, heads: int, head_dim: int, s: int,
                      top_k: int, experts: int, trainable: TrainableConfig, partial: bool) -> int:
    """Bytes autograd keeps per token in one decoder layer (checked against a measured peak in
    tests/unit/fcmoe/model/test_memory_plan.py):

    * each RMSNorm/LayerNorm: its float32 input copy (4 bytes per normalised value);
    * attention (SDPA): q, k, v and the output (every projection's output but the last, plus the last
      one's input), the log-sum-exp (4 bytes per head); LoRA on q/v: a float32 input copy and r values;
    * routed experts, per chosen expert: its input and output (2 x hidden) and, for the matrices
      gate_up -> down, the intermediate values (gate-up output, activation, product) — 2H + 4I for the
      gated MLP; router: its input when trained, float32 probabilities, indices and weights;
    * shared experts / dense MLPs: the same as one expert.

    ``partial``: the first trainable layer, whose input needs no gradient (only the MoE block keeps anything).
    """
    from torch import nn

    from fcmoe.model.discovery import is_attention  # one notion of "attention" for the project

    skip: set[int] = set()
    if moe is not None:
        for c in moe.containers + ((moe.router,) if moe.router is not None else ()):
            skip |= {id(m) for m in c.modules()}
    attention_linears, mlp_linears, norms, lora_inputs = [], [], 0, 0
    in_attention: set[int] = set()
    for name, m in element.named_modules():
        if id(m) in skip:
            continue
        if id(m) in in_attention or (name and is_attention(name, m)):
            in_attention |= {id(x) for x in m.modules()}
        if isinstance(m, nn.Linear):
            (attention_linears if id(m) in in_attention else mlp_linears).append(m)
            if trainable.attention_lora and name.rsplit(".", 1)[-1] in ("q_proj", "v_proj"):
                lora_inputs += 4 * (m.in_features + trainable.lora_rank)
        elif _is_norm(m) and not partial:
            norms += _norm_width(m, hidden, heads, head_dim)
    total = 0
    if not partial:
        total += 4 * norms + lora_inputs
        if attention_linears:
            out = next((m for m in reversed(attention_linears) if m.out_features == hidden), attention_linears[-1])
            total += s * (sum(m.out_features for m in attention_linears if m is not out) + out.in_features) + 4 * heads
    if mlp_linears and (not partial or trainable.mode == "full"):
        total += s * _mlp_values([(m.out_features, m.in_features) for m in mlp_linears], hidden)
    if moe is not None:
        if trainable.router:
            total += s * hidden
        total += 4 * experts + 20 * top_k  # float32 probabilities; per choice an index, a sort slot and a weight
        matrices = [tuple(t.view[1:]) for t in moe.tensors if len(t.view) == 3]
        total += top_k * s * _mlp_values(matrices, hidden)
    return total


def _mlp_values(matrices: list[tuple[int, int]], hidden: int) -> int:
    """Values kept per token by a (gated) MLP of these matrices: input and output (2 x hidden), each
    matrix's non-hidden side (gate-up output, ...), and once more the down projection's (the
    activation's output)."""
    if not matrices:
        return 0
    others = [a + b - hidden if hidden in (a, b) else min(a, b) for a, b in matrices]
    down = next((o for (a, b), o in zip(reversed(matrices), reversed(others)) if hidden in (a, b)), others[-1])
    return 2 * hidden + sum(others) + down


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith(("Norm", "RMSNorm", "LayerNorm")) and getattr(module, "weight", None) is not None


def _norm_width(module: nn.Module, hidden: int, heads: int, head_dim: int) -> int:
    """Values a norm sees per token: its width, times the heads for a per-head (q/k) norm."""
    width = int(module.weight.numel())
    return width * heads if width == head_dim and head_dim != hidden else width


def _top_k(router: nn.Module | None, block: nn.Module, text: object) -> tuple[int, list[str]]:
    """Experts per token: the router's or block's ``top_k``, else the config's field, else 2 (with a note)."""
    for source in (router, block):
        value = getattr(source, "top_k", None)
        if isinstance(value, int) and value > 0:
            return value, []
    for name in _TOP_K_NAMES:
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value, []
    return 2, ["experts per token not found in the config: assumed 2"]


def _where(spec: ModelConfig) -> str:
    if spec.source == "local":
        return f"model.path = {str(spec.path)!r}"
    return f"model.builtin.family = {spec.builtin.family!r}"


def _line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---- the command ---------------------------------------------------------------------------------------


def plans_for(shape: ModelShape, gpus: list[int], batch_size: int, seq_len: int,
              checkpointing: bool) -> list[tuple[Plan, Memory]]:
    return [(plan, plan_memory(shape, plan)) for n in gpus for strategy in ("ddp", "fsdp")
            for plan in [Plan(n, strategy, batch_size, seq_len, checkpointing)]]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def _gib(n: int) -> float:
    return round(n / GIB, 2)


def report(shape: ModelShape, rows: list[tuple[Plan, Memory]]) -> dict:
    """The JSON form: counts, assumptions and one entry per plan (bytes and GiB)."""
    return {
        "model": {"class": shape.model_class, "model_type": shape.model_type, "parameters": shape.base_params,
                  "lora_parameters": shape.lora_params, "trainable_parameters": shape.trainable_params,
                  "dtype_bytes": shape.dtype_bytes, "experts": shape.num_experts, "top_k": shape.top_k,
                  "moe_layers": shape.moe_layers, "decoder_layers": len(shape.layers), "vocab_size": shape.vocab_size},
        "notes": list(shape.notes),
        "assumptions": list(ASSUMPTIONS),
        "plans": [{**asdict(plan), "bytes": {**asdict(mem), "total": mem.total},
                   "gib": {**{k: _gib(v) for k, v in asdict(mem).items()}, "total": _gib(mem.total)},
                   "fits_80gib": mem.total <= FIT_GIB * GIB} for plan, mem in rows],
    }


def render(shape: ModelShape, rows: list[tuple[Plan, Memory]]) -> str:
    plan0 = rows[0][0]
    lines = [f"{shape.model_class} ({shape.model_type}): {_count(shape.base_params)} parameters, "
             f"{_count(shape.trainable_params)} trainable, {shape.moe_layers} MoE layers of {len(shape.layers)}, "
             f"{shape.num_experts} experts, top-{shape.top_k}",
             f"micro-batch {plan0.batch_size} x {plan0.seq_len} tokens (split over the ranks), activation "
             f"checkpointing {'on' if plan0.checkpointing else 'off'}; GiB per rank:",
             "", f"{'GPUs':>4}  {'layout':<6} {'params':>8} {'gathered':>8} {'grads':>8} {'AdamW':>8} "
             f"{'activ.':>8} {'total':>8}  fits {FIT_GIB} GiB"]
    for plan, mem in rows:
        cells = [mem.parameters, mem.gathered, mem.gradients, mem.optimizer, mem.activations, mem.total]
        lines.append(f"{plan.gpus:>4}  {plan.strategy:<6} " + " ".join(f"{c / GIB:8.2f}" for c in cells)
                     + f"  {'yes' if mem.total <= FIT_GIB * GIB else 'no'}")
    host = next((mem.host_model for _, mem in rows if mem.host_model), 0)
    if host:
        how = ("reads the checkpoint one layer at a time" if shape.read_layer_by_layer
               else "builds the whole model once")
        lines.append(f"fsdp: rank 0 {how} in host memory (not on a GPU) to hand it out: "
                     f"{host / GIB:.2f} GiB of host RAM at start-up")
    lines += [f"note: {n}" for n in shape.notes]
    lines.append("activations are an estimate; parameters, gradients and AdamW state are counted exactly "
                 "(docs/operations.md, Planning a silo's memory)")
    return "\n".join(lines)


def run_plan_memory(config_path: Path, gpus: list[int], batch_size: int | None, seq_len: int | None,
                    checkpointing: bool, as_json: bool) -> int:
    config = load_config(config_path)
    batch = batch_size if batch_size is not None else config.federation.local.batch_size
    seq = seq_len if seq_len is not None else config.data.max_length
    if any(n < 1 for n in gpus):
        raise ConfigError(f"--gpus {' '.join(map(str, gpus))}: every count must be at least 1")
    if batch < 1 or seq < 1:
        raise ConfigError(f"--batch-size {batch} / --seq-len {seq}: both must be at least 1")
    shape = read_model(config.model)
    rows = plans_for(shape, gpus, batch, seq, checkpointing)
    print(json.dumps(report(shape, rows)) if as_json else render(shape, rows))
    return 0
