"""Where a Mixture-of-Experts model keeps its experts, routers and shared experts — read from its structure.

Every part of the project that needs to know the expert layout asks :func:`discover`: the trainable
choice (LoRA targets, full experts, the router), the unit layout, DP's ghost clipping and the routing
meter. Nothing else keeps a list of parameter names, so a Hugging Face family whose experts sit under
``block_sparse_moe``, ``feed_forward``, ``mixer`` or ``transformer.blocks.N.ffn`` works like Mixtral.

What structure tells:

* **Expert containers.** transformers' fused experts are decorated with ``use_experts_implementation``,
  which gives them ``is_transposed`` / ``is_concatenated`` / ``has_gate``; other containers are classes
  named ``...Experts`` that say how many experts they hold (DBRX's 2-D stacks, JetMoE's
  ``ParallelExperts``, GPT-OSS). A container's tensors split into experts along dim 0: ``[E, ...]`` as
  they are, ``[E*I, H]`` viewed as ``(E, I, H)``; rows past E (LongCat's zero-compute experts) belong
  to no expert. Mixtures of attention heads (JetMoE) are not FFN experts and are left alone.
* **Decoder layers.** The element of an ``nn.ModuleList`` that holds a container is its layer; the
  list position is the layer index (whatever the path: ``model.layers.N``, ``transformer.blocks.N``).
* **Routers.** In the container's MoE block, the other child that says it has E experts or owns an
  ``[E, hidden]`` matrix.
* **Shared experts.** Whatever else the block owns (Qwen2-MoE's shared expert and its gate, DeepSeek's
  shared experts, JetMoE's output bias) — only when the block is not the decoder layer itself — and
  the decoder layer's children named ``shared...`` (GraniteMoeShared's ``shared_mlp``).

Where structure cannot tell, :data:`FAMILY_FACTS` says so, by ``model_type``: where the routing meter
reads routing (Llama 4, JetMoE, Doge), Doge's per-expert embedding tables and router, DBRX's LoRA.

PEFT's LoRA wraps containers in place (``experts.base_layer.base_layer``); discovery sees through its
wrappers, so it answers the same for a model before and after ``get_peft_model``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from fcmoe.errors import LayoutError


@dataclass(frozen=True)
class FamilyFacts:
    """What a family does that its module tree does not show."""

    routing: str = "experts_args"  # where the routing meter reads each token's experts and weights:
    # "experts_args": the (int index, float weight) pair the experts are called with (most families);
    # "router_dense": the router's first output is a dense [tokens, E] weight (Llama 4);
    # "router_sorted": JetMoE's router returns (sorted slots, token of each slot, gate of each slot,
    # tokens per expert, logits).
    # "block_product_keys": Doge's block returns (hidden, router logits [2, tokens, keys]) and picks
    # its experts from the sums of two top-k key scores (the reader repeats that choice).
    no_lora: str = ""  # why LoRA on this family's experts cannot work ("" : it can)
    split_changes_update: str = ""  # why training on a batch split over ranks cannot give one process's update
    expert_tables: tuple[str, ...] = ()  # children of the MoE block that are per-expert embedding tables
    router: str = ""  # the router's name in the MoE block, where its shape does not say
    embeddings_read_directly: str = ""  # why the model reads its input embeddings' weight outside their forward
    # (FSDP then keeps them in the root group, gathered, instead of a group of their own)


_LLAMA4 = FamilyFacts(routing="router_dense")  # experts get pre-weighted copies of every token
FAMILY_FACTS: dict[str, FamilyFacts] = {
    "llama4_text": _LLAMA4,
    "llama4": _LLAMA4,
    "jetmoe": FamilyFacts(routing="router_sorted"),  # experts get tokens sorted by expert, and counts
    # Doge's experts are single neurons: rows of two embedding tables in the MoE block, chosen by product keys
    "doge": FamilyFacts(routing="block_product_keys", expert_tables=("down_embed", "up_embed"), router="router_gate",
                        split_changes_update="its router splits the logits of all the batch's tokens into two halves "
                        "(modeling_doge.py keeps that for its checkpoints)"),
    "phimoe": FamilyFacts(split_changes_update="its router samples experts at random in training (sparsemixer), "
                          "and each process draws for its own rows"),
    "gemma4": FamilyFacts(embeddings_read_directly="its multimodal wrapper takes the pad token's row of "
                          "embed_tokens.weight for the per-layer inputs"),
    "dbrx": FamilyFacts(no_lora="its experts read their stacked weights as attributes of a submodule (mlp.w1), "
                        "which PEFT's parameter wrapper hides; train the experts with mode: full"),
}


@dataclass(frozen=True, eq=False)
class ExpertTensor:
    """One tensor of an expert container; ``tensor.reshape(view)[e]`` is expert e's part."""

    name: str  # logical parameter name (PEFT wrappers left out)
    param: nn.Parameter
    view: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class MoeLayer:
    index: int  # position in the decoder layer list
    decoder_layer: nn.Module
    containers: tuple[nn.Module, ...]  # the expert containers (unwrapped), in module order
    tensors: tuple[ExpertTensor, ...]
    router: nn.Module | None
    router_params: tuple[nn.Parameter, ...]
    shared_params: tuple[nn.Parameter, ...]
    block: nn.Module  # the module that calls router and experts


@dataclass(frozen=True, eq=False)
class MoeStructure:
    model_class: str
    model_type: str
    num_experts: int
    layers: tuple[MoeLayer, ...]
    facts: FamilyFacts = field(default_factory=FamilyFacts)
    # every parameter under a decoder layer -> that layer's index (LoRA factors included, once applied)
    layer_of: dict[int, int] = field(default_factory=dict)
    views: dict[int, tuple[int, ...]] = field(default_factory=dict)  # id(expert tensor) -> its expert view

    @property
    def expert_tensors(self) -> list[ExpertTensor]:
        return [t for layer in self.layers for t in layer.tensors]

    @property
    def router_params(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.router_params]

    @property
    def shared_params(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.shared_params]

    @property
    def routers(self) -> list[nn.Module]:
        return [layer.router for layer in self.layers if layer.router is not None]

    @property
    def containers(self) -> list[nn.Module]:
        return [c for layer in self.layers for c in layer.containers]

    def expert_view(self, param: nn.Parameter) -> tuple[int, ...] | None:
        """How a base expert tensor splits into experts (``None``: it is not one)."""
        return self.views.get(id(param))


def _is_peft_wrapper(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def _logical_modules(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` with PEFT's wrappers replaced by what they wrap (so LoRA's own modules, the
    wrappers' children, are left out) and paths as in the unwrapped model."""
    root = _unwrapped(root)
    yield prefix, root
    for name, child in root.named_children():
        yield from _logical_modules(child, f"{prefix}.{name}" if prefix else name)


def is_attention(path: str, module: nn.Module) -> bool:
    last = path.rsplit(".", 1)[-1].lower()
    return "attention" in type(module).__name__.lower() or "attn" in last or "attention" in last


def _expert_count(module: nn.Module) -> int | None:
    if isinstance(module, nn.Embedding):  # a per-expert table (FamilyFacts.expert_tables)
        return module.num_embeddings
    for attr in ("num_experts", "moe_num_experts", "num_local_experts", "num_routed_experts"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def _is_container(path: str, module: nn.Module, facts: FamilyFacts) -> bool:
    decorated = all(hasattr(module, a) for a in ("is_transposed", "is_concatenated", "has_gate"))
    table = isinstance(module, nn.Embedding) and path.rsplit(".", 1)[-1] in facts.expert_tables
    return (decorated or table or type(module).__name__.endswith("Experts")) and _expert_count(module) is not None


def _container_tensors(path: str, module: nn.Module, experts: int) -> list[ExpertTensor]:
    out = []
    for name, param in _logical_parameters(module, set()):
        shape = tuple(param.shape)
        if shape[:1] == (experts,):  # [E, ...]
            out.append(ExpertTensor(f"{path}.{name}", param, shape))
        elif len(shape) == 3 and shape[0] > experts:
            # LongCat's gate-up stack also has rows for its zero-compute experts ([E+Z, 2I, H]): never
            # read, they belong to no expert (the layout puts them in the layer's shared unit)
            out.append(ExpertTensor(f"{path}.{name}", param, shape))
        elif len(shape) == 2 and shape[0] % experts == 0:  # DBRX: [E*I, H] stacked
            out.append(ExpertTensor(f"{path}.{name}", param, (experts, shape[0] // experts, shape[1])))
        else:
            raise LayoutError(f"{type(module).__name__} at {path}: tensor {name} {list(shape)} does not split "
                              f"into {experts} experts")
    return out


def _unwrapped(module: nn.Module) -> nn.Module:
    while _is_peft_wrapper(module):
        module = module.base_layer
    return module


def _logical_parameters(module: nn.Module, skip: set[int]) -> list[tuple[str, nn.Parameter]]:
    """``named_parameters`` with PEFT's wrappers seen through and LoRA factors left out, outside the
    ``skip`` modules (by id)."""
    out: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()

    def walk(m: nn.Module, prefix: str) -> None:
        m = _unwrapped(m)
        if id(m) in skip:
            return
        for name, p in m.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out.append((prefix + name, p))
        for name, child in m.named_children():
            if not name.startswith("lora_"):
                walk(child, f"{prefix}{name}.")

    walk(module, "")
    return out


def discover(model: nn.Module) -> MoeStructure:
    """The model's MoE layers; raises :class:`LayoutError` naming the class when it has none."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "") or ""
    facts = FAMILY_FACTS.get(model_type, FamilyFacts())
    modules = list(_logical_modules(model))
    # decoder layers: elements of module lists, by identity -> (index, path)
    elements: dict[int, tuple[int, str, nn.Module]] = {}
    for path, module in modules:
        if isinstance(module, nn.ModuleList):
            for i, child in enumerate(module):
                elements[id(_unwrapped(child))] = (i, f"{path}.{i}", _unwrapped(child))
    parents: dict[int, nn.Module] = {}
    for _, module in modules:
        for child in module.children():
            parents[id(_unwrapped(child))] = module
    layers: dict[int, dict] = {}
    num_experts = None
    attention: set[int] = set()
    for path, module in modules:
        if id(module) in attention or is_attention(path, module):
            attention.update(id(_unwrapped(m)) for m in module.modules())
            continue
        if not _is_container(path, module, facts):
            continue
        experts = _expert_count(module)
        if num_experts is not None and experts != num_experts:
            raise LayoutError(f"{type(model).__name__}: expert containers with {num_experts} and {experts} experts")
        num_experts = experts
        # climb to the decoder layer that holds this container
        block, node = parents.get(id(module)), module
        while node is not None and id(node) not in elements:
            node = parents.get(id(node))
        if node is None:
            raise LayoutError(f"{type(model).__name__}: experts at {path} are in no decoder layer list")
        index, _, decoder_layer = elements[id(node)]
        entry = layers.setdefault(index, {"decoder": decoder_layer, "block": block, "containers": [], "tensors": []})
        entry["containers"].append(module)
        entry["tensors"].extend(_container_tensors(path, module, experts))
    if not layers:
        raise LayoutError(f"{type(model).__name__}: no expert container found (looked for modules decorated by "
                          "transformers' use_experts_implementation or named ...Experts, inside a decoder layer list)")
    assert num_experts is not None
    moe_layers = []
    for index in sorted(layers):
        entry = layers[index]
        block = entry["block"]
        skip = {id(c) for c in entry["containers"]}
        router = (_unwrapped(getattr(block, facts.router)) if facts.router
                  else _find_router(block, skip, num_experts))
        router_params = tuple(p for _, p in _logical_parameters(router, set())) if router is not None else ()
        shared: list[nn.Parameter] = []
        if block is not entry["decoder"]:
            skip |= {id(router)} if router is not None else set()
            shared = [p for _, p in _logical_parameters(block, skip)]
        # shared experts beside the MoE block rather than in it (GraniteMoeShared's shared_mlp)
        for name, child in entry["decoder"].named_children():
            if name.startswith("shared") and child is not block:
                shared += [p for _, p in _logical_parameters(child, set()) if all(p is not q for q in shared)]
        moe_layers.append(MoeLayer(index, entry["decoder"], tuple(entry["containers"]), tuple(entry["tensors"]),
                                   router, router_params, tuple(shared), block))
    # every decoder layer's parameters by index, dense layers among the MoE ones included (hybrids,
    # first_k_dense), LoRA factors too once applied
    layer_lists = {id(parents[id(layer.decoder_layer)]) for layer in moe_layers}
    layer_of = {id(p): index for index, _, element in elements.values()
                if id(parents.get(id(element))) in layer_lists for p in element.parameters()}
    views = {id(t.param): t.view for layer in moe_layers for t in layer.tensors}
    return MoeStructure(type(model).__name__, model_type, num_experts, tuple(moe_layers), facts, layer_of, views)


def decoder_layers(model: nn.Module, structure: MoeStructure | None = None) -> list[nn.Module]:
    """Every element of the module list that holds the MoE layers (dense layers of hybrids included), in
    order: what FSDP shards one group each and the memory plan counts layer by layer."""
    moe = {id(layer.decoder_layer) for layer in (structure or discover(model)).layers}
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and any(id(m) in moe for m in module):
            return list(module)
    return []


def vocabulary_modules(model: nn.Module, structure: MoeStructure | None = None) -> list[nn.Module]:
    """The input embeddings and the output head, each an FSDP group of its own; none where they share a
    weight (tied: one parameter cannot live in two groups, so both stay in the root), and not the input
    embeddings of a family that reads their weight outside their forward (it would find it sharded)."""
    inputs, output = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is not None and output is not None and {id(p) for p in inputs.parameters()} & {
            id(p) for p in output.parameters()}:
        return []
    if (structure or discover(model)).facts.embeddings_read_directly:
        inputs = None
    return [m for m in (inputs, output) if m is not None and any(True for _ in m.parameters())]


def _find_router(block: nn.Module, skip: set[int], experts: int) -> nn.Module | None:
    """The child of ``block`` outside the expert containers that routes: it says it has ``E`` experts
    (routers with zero-compute or skip experts have more outputs than E), or owns an ``[E, hidden]`` matrix."""
    candidates = []
    for name, child in block.named_children():
        child = _unwrapped(child)
        if id(child) in skip or any(id(m) in skip for m in child.modules()) or is_attention(name, child):
            continue
        if getattr(child, "num_experts", None) == experts:
            return child
        if any(p.dim() == 2 and p.shape[0] == experts for p in child.parameters()):
            candidates.append(child)
    return candidates[0] if candidates else None
