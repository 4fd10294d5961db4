"""Retention's personal adapter: it starts as the identity, learns the silo's residual, never changes
what the silo uploads, and re-applies itself to every new global model."""

import pytest
import torch
from conftest import smoke_config
from torch import nn

from fcmoe.config import parse_config
from fcmoe.errors import LayoutError
from fcmoe.model import build_model
from fcmoe.model.build import load_trainable_state, trainable_state
from fcmoe.plan import RoundPlan
from silo_agent.data.loading import load_data
from silo_agent.personal import PersonalAdapter, output_layer
from silo_agent.training import evaluate, train_locally

CPU = torch.device("cpu")
PLAN = RoundPlan(local_steps=12, batch_size=8, learning_rate=0.01, seed=5)


def _silo(tmp_path):
    """A tiny MoE and one silo of the conflict suite (shift_up only)."""
    data = smoke_config(tmp_path).model_dump(mode="json")
    data["data"]["builtin"].update({"partition": "domain", "domains": ["shift_up", "shift_down"],
                                    "samples_per_silo": 256})
    data["silo"] = {"name": "silo0", "index": 0, "num_silos": 2}
    config = parse_config(data)
    torch.manual_seed(0)
    return build_model(config.model), load_data(config)


def _mean(result):
    return sum(loss for loss, _ in result.values()) / sum(n for _, n in result.values())


def test_a_fresh_adapter_is_the_identity(tmp_path):
    model, data = _silo(tmp_path)
    adapter = PersonalAdapter.for_model(model, 0.01)
    assert evaluate(model, data.eval, CPU, 8, adapter) == evaluate(model, data.eval, CPU, 8)


def test_the_adapter_never_changes_the_model_the_silo_uploads(tmp_path):
    """Same start, same batches: the model trained alongside the adapter is bit-for-bit the one
    trained without it, so the update (and the global) are FedAvg's whatever the adapter learns."""
    model, data = _silo(tmp_path)
    start = trainable_state(model)
    train_locally(model, data.train, PLAN, CPU)
    alone = trainable_state(model)
    load_trainable_state(model, start)
    adapter = PersonalAdapter.for_model(model, 0.01)
    train_locally(model, data.train, PLAN, CPU, adapter=adapter)
    for name, value in trainable_state(model).items():
        assert torch.equal(value, alone[name]), name
    assert adapter.residual.weight.abs().sum() > 0  # it did learn


def test_the_adapter_learns_the_silos_residual_and_reapplies_it_to_a_new_global(tmp_path):
    model, data = _silo(tmp_path)
    adapter = PersonalAdapter.for_model(model, 0.01)
    for _ in range(3):  # three rounds from the same (unmoved) global model
        train_locally(model, data.train, PLAN, CPU, adapter=adapter)
    federated, personal = _mean(evaluate(model, data.eval, CPU, 8)), _mean(evaluate(model, data.eval, CPU, 8, adapter))
    assert personal < federated
    assert adapter.helps and adapter.gain > 0  # its prequential score says so too, without the held-out split
    # A new global model: the adapter acts on its hidden state, through its output layer.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = next(iter(data.eval.iter_eval(4)))[0]
    with adapter.attach(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        correction = adapter.personalise(logits) - logits
        hidden, weight = adapter._hidden, output_layer(model).weight
        expected = nn.functional.linear(adapter.residual(hidden), weight)
        model.zero_grad(set_to_none=True)
        adapter.personalise(logits).sum().backward()
    torch.testing.assert_close(correction, expected)
    assert all(p.grad is None for p in model.parameters())  # its loss reaches the adapter only
    assert adapter.residual.weight.grad is not None


def test_an_adapter_that_hurts_is_scored_as_such(tmp_path):
    """A learning rate far too high: the adapter makes held-out loss worse, and its prequential score,
    taken on training batches before it learns from them, turns it off (the silo then reports the
    trained model itself as its personalised model)."""
    model, data = _silo(tmp_path)
    adapter = PersonalAdapter.for_model(model, 1.0)
    for _ in range(2):
        train_locally(model, data.train, PLAN, CPU, adapter=adapter)
    assert _mean(evaluate(model, data.eval, CPU, 8, adapter)) > _mean(evaluate(model, data.eval, CPU, 8))
    assert not adapter.helps and adapter.gain < 0


def test_prequential_score_fades_old_batches():
    adapter = PersonalAdapter(4, 0.01)
    assert not adapter.helps  # a fresh adapter is the identity: nothing to gain yet
    adapter.score(model_loss=3.0, personal_loss=2.0)
    assert adapter.gain == pytest.approx(0.1) and adapter.helps
    for _ in range(30):  # it started well, then got worse: recent batches decide
        adapter.score(model_loss=3.0, personal_loss=3.5)
    assert adapter.gain == pytest.approx(0.1 * 0.9**30 - 0.5 * (1 - 0.9**30)) and not adapter.helps


def test_adapter_misuse_is_a_one_line_error(tmp_path):
    model, _ = _silo(tmp_path)
    adapter = PersonalAdapter.for_model(model, 0.01)
    with pytest.raises(LayoutError, match="outside attach"):
        adapter.personalise(torch.zeros(1, 2, 3))
    with pytest.raises(LayoutError, match="linear output layer"):
        PersonalAdapter.for_model(nn.Sequential(nn.Linear(2, 2)), 0.01)
