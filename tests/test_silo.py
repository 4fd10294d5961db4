"""Silo-side pieces without a network: update maths, data loading from JSONL, training, the certs CLI."""

import subprocess
import sys

import numpy as np
import torch
from conftest import ROOT, smoke_config

from fcmoe.config import parse_config
from fcmoe.model import build_model
from fcmoe.plan import RoundPlan
from silo_agent.data.loading import load_data
from silo_agent.data import Example, write_jsonl
from silo_agent.training import evaluate, train_locally
from silo_agent.update import clip_units, scaled_payload, unit_deltas


def test_clip_units_bounds_each_unit_and_keeps_direction():
    deltas = {"a": np.array([3.0, 4.0], np.float32), "b": np.array([0.3, 0.4], np.float32)}
    clipped, norms = clip_units(deltas, 1.0)
    assert norms == {"a": 5.0, "b": 0.5} or np.allclose(list(norms.values()), [5.0, 0.5])
    np.testing.assert_allclose(clipped["a"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(clipped["b"], deltas["b"])  # under the bound: untouched
    np.testing.assert_array_equal(clip_units(deltas, 0.0)[0]["a"], deltas["a"])  # 0 disables
    payload = scaled_payload(unit_deltas({"a": np.ones(2)}, {"a": np.zeros(2)}), {"a": 3.0})
    np.testing.assert_array_equal(payload["a"], [3.0, 3.0])


def _jsonl_config(tmp_path):
    train = [Example("", "the quick brown fox", "prose"), Example("2+2=", "4", "maths")] * 8
    held_out = [Example("", "jumps over the dog", "prose"), Example("3+3=", "6", "maths")] * 2
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "eval.jsonl", held_out)
    data = smoke_config(tmp_path).model_dump(mode="json")
    data["data"] = {"builtin": None, "train_file": str(tmp_path / "train.jsonl"),
                    "eval_file": str(tmp_path / "eval.jsonl"), "max_length": 32}
    data["silo"] = {"name": "silo0"}
    return parse_config(data)


def test_jsonl_silo_trains_and_evaluates_per_domain(tmp_path):
    config = _jsonl_config(tmp_path)
    data = load_data(config)
    assert data.num_train == 16 and sorted(set(data.eval.domains)) == ["maths", "prose"]
    model = build_model(config.model)
    cpu = torch.device("cpu")
    before = evaluate(model, data.eval, cpu, 8)
    result = train_locally(model, data.train, RoundPlan(local_steps=15, batch_size=4, learning_rate=0.02), cpu)
    after = evaluate(model, data.eval, cpu, 8)
    assert result.steps == 15 and result.tokens > 0 and result.loss_last < result.loss_first
    for domain in ("maths", "prose"):
        assert after[domain][1] == before[domain][1] > 0  # same tokens scored
        assert after[domain][0] < before[domain][0]


def test_fedprox_term_keeps_model_closer_to_start(tmp_path):
    config = _jsonl_config(tmp_path)
    data = load_data(config)
    distances = []
    for mu in (0.0, 50.0):
        model = build_model(config.model)
        start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        train_locally(model, data.train, RoundPlan(local_steps=10, batch_size=4, learning_rate=0.02, prox_mu=mu),
                      torch.device("cpu"))
        trained = [p.detach() for p in model.parameters() if p.requires_grad]
        distances.append(sum(float(((a - b) ** 2).sum()) for a, b in zip(trained, start)))
    assert distances[1] < distances[0]


def test_certs_command_creates_and_keeps_pki(tmp_path):
    cmd = [sys.executable, "-m", "fcmoe", "certs", "--dir", str(tmp_path / "pki"), "--silos", "a,b"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    names = sorted(p.name for p in (tmp_path / "pki").iterdir())
    assert names == ["aggregator.key", "aggregator.pem", "ca.key", "ca.pem",
                     "silo-a.key", "silo-a.pem", "silo-b.key", "silo-b.pem"]
    ca = (tmp_path / "pki" / "ca.pem").read_bytes()
    assert subprocess.run(cmd, capture_output=True, timeout=60, cwd=ROOT).returncode == 0
    assert (tmp_path / "pki" / "ca.pem").read_bytes() == ca
    bad = subprocess.run(cmd[:-1] + ["bad name"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith("fcmoe: error:") and len(bad.stderr.splitlines()) == 1


def test_routing_meter_shares_sum_to_one_per_layer_and_ignore_padding(tmp_path):
    from fcmoe.model import ExpertLayout
    from silo_agent.routing import RoutingMeter

    config = _jsonl_config(tmp_path)
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

    model = build_model(_jsonl_config(tmp_path).model)
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


def test_a_redone_attempt_reuses_training_only_for_the_same_model_and_instructions():
    import numpy as np

    from protos import fcmoe_pb2 as pb
    from silo_agent.agent import training_key

    units = {"L0.E0": np.arange(4, dtype=np.float32)}
    task = pb.Task(kind=pb.Task.TRAIN, round=2, train=pb.TrainInstructions(learning_rate=0.01, session=2 << 16))
    retry = pb.Task(kind=pb.Task.TRAIN, round=2, train=pb.TrainInstructions(learning_rate=0.01, session=2 << 16 | 5))
    changed = pb.Task(kind=pb.Task.TRAIN, round=2, train=pb.TrainInstructions(learning_rate=0.02, session=2 << 16))
    assert training_key("run", task, units) == training_key("run", retry, units)  # only the session differs
    assert training_key("run", task, units) != training_key("run", changed, units)
    assert training_key("run", task, units) != training_key("run", task, {"L0.E0": units["L0.E0"] + 1})
    assert training_key("run", task, units) != training_key("other", task, units)


def test_reliability_is_the_gain_on_all_held_out_tokens_not_a_mean_over_domains():
    from silo_agent.evaluation import reliability

    # the silo's main domain (100 held-out tokens) improves, its 8-token minor domain gets worse
    before = {"main": (300.0, 100), "minor": (24.0, 8)}
    after = {"main": (240.0, 100), "minor": (40.0, 8)}
    assert reliability(before, after) == __import__("pytest").approx((324 - 280) / 324)
    assert reliability(after, before) == 0.0  # worse: bounded at 0
    assert reliability({}, after) == 0.0
