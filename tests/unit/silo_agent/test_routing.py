"""silo_agent/routing.py: routing shares per layer, padding ignored, a silent layer a loud error."""

import torch
from conftest import jsonl_config

from fcmoe.model import build_model


def test_routing_meter_shares_sum_to_one_per_layer_and_ignore_padding(tmp_path):
    from fcmoe.model import ExpertLayout
    from silo_agent.routing import RoutingMeter

    config = jsonl_config(tmp_path)
    model = build_model(config.model)
    layout = ExpertLayout.from_model(model)
    meter = RoutingMeter()
    ids = torch.tensor([[65, 66, 67, 258, 258], [68, 69, 70, 71, 72]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with meter.attached(model):
        meter.mask = mask.reshape(-1).bool()
        model(input_ids=ids, attention_mask=mask)
    shares = meter.shares(layout)
    assert meter.tokens == {0: 8.0, 1: 8.0}  # padding excluded
    for layer in (0, 1):
        experts = [v for k, v in shares.items() if k.startswith(f"L{layer}.E")]
        assert len(experts) == 4 and sum(experts) == __import__("pytest").approx(1.0)
    assert all(v == 1.0 for k, v in shares.items() if k.endswith("shared"))
    with meter.attached(model):
        pass
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_routing_meter_fails_loudly_when_no_layer_reports_its_routing(tmp_path, monkeypatch):
    """A family whose experts stopped passing (index, weights) must not quietly give FC-MoE equal shares."""
    import pytest

    from fcmoe.errors import LayoutError
    from silo_agent import routing

    model = build_model(jsonl_config(tmp_path).model)
    monkeypatch.setattr(routing, "_index_and_weights", lambda args, kwargs: None)
    with pytest.raises(LayoutError, match=r"routing meter: .* ran 1 forward pass\(es\) and none of its 2 MoE layers"):
        with routing.RoutingMeter().attached(model):
            model(input_ids=torch.tensor([[65, 66, 67]]))


def test_routing_meter_leaves_zero_compute_experts_out_and_normalises_scaled_gates(tmp_path):
    """LongCat routes some tokens to zero-compute experts (ids >= E) and DeepSeek-V3 scales its gates by
    2.5: each layer's expert shares still sum to one, over the real experts only."""
    import pytest
    from families import save_tiny_checkpoint

    from fcmoe.config import ModelConfig
    from fcmoe.model import ExpertLayout
    from fcmoe.model.discovery import discover
    from silo_agent.routing import RoutingMeter

    for family in ("longcat_flash", "deepseek_v3"):
        save_tiny_checkpoint(family, tmp_path / family)
        model = build_model(ModelConfig(source="local", path=tmp_path / family))
        picked: list[torch.Tensor] = []
        for layer in discover(model).layers:  # what the experts are called with, seen from outside the meter
            layer.containers[0].register_forward_pre_hook(lambda m, args: picked.append(args[1]))
        meter = RoutingMeter()
        ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), meter.attached(model):
            model(input_ids=ids)
        shares = meter.shares(ExpertLayout.from_model(model))
        for layer in (0, 1):
            assert sum(v for k, v in shares.items() if k.startswith(f"L{layer}.E")) == pytest.approx(1.0)
        if family == "longcat_flash":
            assert any(bool((p >= 4).any()) for p in picked)  # zero-compute experts were chosen
        else:
            assert model.config.routed_scaling_factor == 2.5
