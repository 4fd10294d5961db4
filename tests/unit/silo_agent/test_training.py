"""silo_agent/training.py: a JSONL silo trains and evaluates per domain; FedProx keeps it nearer its start."""

import torch
from conftest import smoke_config

from fcmoe.config import parse_config
from fcmoe.model import build_model
from fcmoe.plan import RoundPlan
from silo_agent.data import Example, write_jsonl
from silo_agent.data.loading import load_data
from silo_agent.training import evaluate, train_locally


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
