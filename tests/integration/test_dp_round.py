"""DP-SGD silos through the real coordinator: ledgers written and resumed, a silo at its budget declines."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import silo_config, smoke_config

from crypto.pki import ensure_pki
from crypto.signed_log import verify
from fcmoe.launch.audit import audit
from fcmoe.config import parse_config
from fcmoe.launch.inprocess import run_in_process
from silo_agent.dp.accounting import epsilon

SILOS = ["silo0", "silo1", "silo2"]


def _configs(tmp_path, budgets=(50.0, 50.0, 50.0), rounds=2):
    config = smoke_config(tmp_path, min_silos=3, quorum=2, rounds=rounds, round_timeout_s=60)
    pki = ensure_pki(config.aggregator.pki_dir, SILOS)
    silos = []
    for i, (name, budget) in enumerate(zip(SILOS, budgets)):
        data = silo_config(config, name, 0, index=i, num_silos=3).model_dump(mode="json")
        data["silo"]["dp"] = {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5,
                              "epsilon_budget": budget, "ledger": str(tmp_path / f"{name}.ledger.jsonl")}
        silos.append(parse_config(data))
    return config, silos, pki


def test_dp_run_writes_signed_ledgers_whose_epsilon_the_accountant_reproduces(tmp_path):
    config, silos, pki = _configs(tmp_path)
    coordinator = run_in_process(config, silos)
    assert coordinator.machine.succeeded and coordinator.metrics.rows()[-1]["updates"] == 3
    for name, silo in zip(SILOS, silos):
        entries = verify(silo.silo.dp.ledger, pki.silo_cert(name).read_bytes())
        assert [e["round"] for e in entries] == [1, 2]
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
        for i, e in enumerate(entries):
            assert e["epsilon"] == epsilon("rdp", history[: i + 1], 1e-5) > 0
        assert entries[1]["epsilon"] > entries[0]["epsilon"] and len(entries[0]["released_sha256"]) == 64
        rows = audit(silo.silo.dp.ledger, pki.silo_cert(name).read_bytes())  # the auditor's independent check
        assert [r.round for r in rows] == [1, 2] and rows[-1].recomputed_epsilon == pytest.approx(rows[-1].logged_epsilon,
                                                                                                  rel=1e-6)
        reported = coordinator.status()["privacy"][name]  # what the operator's status page shows
        assert reported == {"epsilon": entries[-1]["epsilon"], "epsilon_budget": entries[-1]["epsilon_budget"],
                            "delta": 1e-5, "round": 2}


def test_a_silo_at_its_budget_declines_and_the_run_completes_without_it(tmp_path):
    # a first run tells what one round costs; silo2's budget then allows exactly one round
    probe_config, probe_silos, _ = _configs(tmp_path / "probe", rounds=1)
    run_in_process(probe_config, probe_silos)
    one_round = json.loads(probe_silos[2].silo.dp.ledger.read_text().splitlines()[0])["epsilon"]
    config, silos, _ = _configs(tmp_path / "run", budgets=(50.0, 50.0, one_round * 1.01))
    coordinator = run_in_process(config, silos)
    rows = coordinator.metrics.rows()
    assert coordinator.machine.succeeded and [r["updates"] for r in rows[1:]] == [3, 2]
    assert "privacy budget" in rows[2]["silos"]["silo2"]["declined"]
    assert len(silos[2].silo.dp.ledger.read_text().splitlines()) == 1  # nothing spent on the declined round
    assert np.isfinite(rows[-1]["global_loss"])


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "granitemoe"])
def test_dp_silos_train_full_experts_of_hugging_face_families_with_ghost_clipping(family, tmp_path, monkeypatch):
    """A DP run on a local checkpoint of the family: every silo's private steps go through ghost clipping
    (GPT-OSS: transposed stacks with per-expert biases; DeepSeek-V3: shared experts; GraniteMoE:
    experts under block_sparse_moe), and each ledger holds the run's rounds."""
    from families import save_tiny_checkpoint
    from silo_agent.dp.ghost import GhostClipping

    save_tiny_checkpoint(family, tmp_path / family)
    clipped = []
    clip = GhostClipping.clip
    monkeypatch.setattr(GhostClipping, "clip", lambda self, batch: (clipped.append(1), clip(self, batch))[1])
    config, silos, pki = _configs(tmp_path, rounds=1)
    local = lambda c: parse_config({**c.model_dump(mode="json"), "model": {  # noqa: E731
        "source": "local", "path": str(tmp_path / family), "trainable": {"mode": "full", "router": True}}})
    coordinator = run_in_process(local(config), [local(s) for s in silos])
    assert coordinator.machine.succeeded and coordinator.metrics.rows()[-1]["updates"] == 3
    assert len(clipped) >= 3  # every silo's steps (an empty Poisson draw skips the clipping)
    for name, silo in zip(SILOS, silos):
        assert [e["round"] for e in verify(silo.silo.dp.ledger, pki.silo_cert(name).read_bytes())] == [1]


def test_a_dp_silo_on_a_family_dp_cannot_train_is_refused_at_start(tmp_path):
    """JetMoE's experts take tokens sorted by expert with Python-side counts, which neither DP engine can
    run: the silo says so in one line when it starts, before it joins, not in its first private round."""
    from families import save_tiny_checkpoint
    from fcmoe.errors import ConfigError

    save_tiny_checkpoint("jetmoe", tmp_path / "jetmoe")
    config, silos, _ = _configs(tmp_path, rounds=1)
    local = parse_config({**silos[0].model_dump(mode="json"), "model": {
        "source": "local", "path": str(tmp_path / "jetmoe"), "trainable": {"mode": "full"}}})
    with pytest.raises(ConfigError, match=r"^silo.dp.enabled: JetMoeForCausalLM cannot train privately here \("):
        run_in_process(parse_config({**config.model_dump(mode="json"), "model": local.model.model_dump(mode="json")}),
                       [local])
