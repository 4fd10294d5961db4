"""The expert-unit layout: each unit is exactly one expert of one layer, for every family and mode."""

import numpy as np
import pytest
import torch

from fcmoe.config import BuiltinModelConfig, ModelConfig, TrainableConfig
from fcmoe.errors import LayoutError
from fcmoe.model import ExpertLayout, UnitKey, build_model, load_trainable_state, trainable_state

FAMILIES = ["mixtral", "qwen2_moe", "olmoe"]


def _model(family: str, mode: str, router: bool = False):
    spec = ModelConfig(
        builtin=BuiltinModelConfig(family=family, hidden_size=16, intermediate_size=24, num_layers=2,
                                   num_heads=2, num_kv_heads=1, num_experts=4, top_k=2),
        trainable=TrainableConfig(mode=mode, lora_rank=2, lora_alpha=4, router=router),
    )
    model = build_model(spec)
    return model, ExpertLayout.from_model(model)


def _expert_weights(model) -> dict[tuple[int, str], torch.Tensor]:
    """Effective per-expert weight (or LoRA delta) tensors [E, ...] keyed by (layer, parameter)."""
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "ParamWrapper":
            layer = int(name.split(".layers.")[1].split(".")[0])
            out[(layer, module.parameter_name)] = module.get_delta_weight("default").detach().clone()
    if not out:
        for name, p in model.named_parameters():
            if p.requires_grad and p.dim() == 3:
                out[(int(name.split(".layers.")[1].split(".")[0]), name)] = p.detach().clone()
    return out


def _random_units(layout, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(n).astype(np.float32) for k, n in layout.unit_sizes().items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_units_are_experts(family, mode):
    model, layout = _model(family, mode)
    state = trainable_state(model)
    back = layout.merge(layout.split(state))
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert {UnitKey.parse(k) for k in layout.unit_names} >= {UnitKey(l, e) for l in range(2) for e in range(4)}

    units = _random_units(layout, 0)
    load_trainable_state(model, layout.merge(units))
    before = _expert_weights(model)
    assert len(before) == 4  # two fused tensors per layer
    for layer, expert in [(0, 1), (1, 3)]:
        changed = dict(units)
        key = str(UnitKey(layer, expert))
        changed[key] = units[key] + 1.0
        load_trainable_state(model, layout.merge(changed))
        after = _expert_weights(model)
        for (lyr, pname), w in after.items():
            diff = (w - before[(lyr, pname)]).abs().flatten(1).sum(1)  # per expert
            for e in range(4):
                should_change = lyr == layer and e == expert
                assert (diff[e] > 0).item() == should_change, (pname, lyr, e)
        load_trainable_state(model, layout.merge(units))


def _routed_experts(model):
    seen: dict[int, set[int]] = {}

    def hook(module, args, kwargs):
        idx = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        seen.setdefault(module._layer, set()).update(idx.flatten().tolist())

    handles = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Experts") and ".layers." in name:
            module._layer = int(name.split(".layers.")[1].split(".")[0])
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_changes_only_routed_expert_units(family, mode):
    """One token, one AdamW step: exactly the units of the experts it was routed to change."""
    torch.manual_seed(0)
    model, layout = _model(family, mode, router=False)
    load_trainable_state(model, layout.merge(_random_units(layout, 1)))  # LoRA B != 0 so A gets gradients
    start = layout.split(trainable_state(model))
    seen, handles = _routed_experts(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = torch.tensor([[65]])
    loss = model(input_ids=ids).logits[0, -1].logsumexp(0)
    loss.backward()
    opt.step()
    for h in handles:
        h.remove()
    end = layout.split(trainable_state(model))
    changed = {UnitKey.parse(k) for k in start if not np.array_equal(start[k], end[k])}
    expected = {UnitKey(layer, e) for layer, experts in seen.items() for e in experts}
    assert len(expected) == 2 * 2  # top-2 in each of 2 layers
    assert {u for u in changed if u.is_expert} == expected


def test_router_and_attention_go_to_shared_units():
    model, layout = _model("mixtral", "lora", router=True)
    shared = [k for k in layout.units if not k.is_expert]
    assert [str(k) for k in shared] == ["L0.shared", "L1.shared"]
    assert all(s.param.endswith("mlp.gate.weight") for k in shared for s in layout.units[k])


def test_layout_hash_depends_on_structure_not_values():
    m1, l1 = _model("mixtral", "lora")
    load_trainable_state(m1, l1.merge(_random_units(l1, 3)))
    assert ExpertLayout.from_model(m1).hash == l1.hash
    _, l2 = _model("mixtral", "full")
    _, l3 = _model("olmoe", "lora")
    _, l4 = _model("mixtral", "lora", router=True)
    assert len({l1.hash, l2.hash, l3.hash, l4.hash}) == 4


def test_merge_refuses_wrong_sizes():
    _, layout = _model("mixtral", "lora")
    units = _random_units(layout, 0)
    units["L0.E0"] = units["L0.E0"][:-1]
    with pytest.raises(LayoutError, match="L0.E0"):
        layout.merge(units)
    with pytest.raises(LayoutError, match="malformed"):
        UnitKey.parse("L0.X1")
