"""silo_agent/training.py: a JSONL silo trains and evaluates per domain; FedProx keeps it nearer its start."""

import torch
from conftest import jsonl_config

from fcmoe.model import build_model
from fcmoe.plan import RoundPlan
from silo_agent.data.loading import load_data
from silo_agent.training import evaluate, train_locally


def test_jsonl_silo_trains_and_evaluates_per_domain(tmp_path):
    config = jsonl_config(tmp_path)
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
    config = jsonl_config(tmp_path)
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
