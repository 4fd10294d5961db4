"""Config errors are one line naming the key, the value and what is allowed."""

import subprocess
import sys
from pathlib import Path

import pytest

from fcmoe.config import load_config, parse_config
from fcmoe.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"federation": {"rounds": 0}}, "federation.rounds = 0: Input should be greater than 0"),
        ({"federation": {"roundz": 3}}, "federation.roundz: unknown key (allowed: rounds, min_silos"),
        ({"federation": {"strategy": {"name": "fedsgd"}}},
         "federation.strategy.name = 'fedsgd': Input should be 'fedavg', 'fedprox', 'fedavgm', 'fedadam', 'local', 'fcmoe' or 'fedmoe'"),
        ({"model": {"trainable": {"mode": "qlora"}}}, "model.trainable.mode = 'qlora': Input should be 'lora' or 'full'"),
        ({"model": {"source": "local"}}, "needs model.path"),
        ({"model": {"builtin": {"num_experts": 2, "top_k": 3}}}, "top_k=3 exceeds num_experts=2"),
        ({"silo": {"name": "no spaces"}}, "silo.name = 'no spaces': String should match pattern"),
        ({"silo": {"name": "a", "device": "tpu"}}, "device 'tpu': allowed 'cpu', 'cuda' or 'cuda:N'"),
        ({"federation": {"min_silos": 2, "quorum": 3}}, "quorum=3 exceeds min_silos=2"),
        ({"data": {"builtin": {"partition": "iid"}}}, "data.builtin.partition = 'iid': Input should be 'domain' or 'dirichlet'"),
        ({"simulation": {"silos": "four"}}, "simulation.silos = 'four': Input should be a valid integer"),
        ({"extra_section": {}}, "extra_section: unknown key (allowed: run, model, data"),
        ([1, 2], "top level must be a mapping"),
        ({"federation": {"secure_aggregation": {"mode": "masking"}, "local": {"clip_norm": 0}}},
         "'masking' needs local.clip_norm > 0"),
        ({"federation": {"evaluation": {"every": 0}}}, "federation.evaluation.every = 0: Input should be greater than 0"),
        ({"federation": {"evaluation": {"max_examples": 0}}},
         "federation.evaluation.max_examples = 0: Input should be greater than 0"),
        ({"federation": {"evaluation": {"final": "sometimes"}}},
         "federation.evaluation.final = 'sometimes': Input should be a valid boolean"),
        ({"federation": {"evaluation": {"evry": 2}}},
         "federation.evaluation.evry: unknown key (allowed: every, max_examples, final)"),
        ({"federation": {"secure_aggregation": {"mode": "shamir"}}},
         "federation.secure_aggregation.mode = 'shamir': Input should be 'none', 'masking' or 'ckks'"),
        ({"silo": {"name": "a", "dp": {"enabled": True}}}, "needs exactly one of noise_multiplier and target_epsilon"),
        ({"silo": {"name": "a", "dp": {"target_epsilon": 9, "epsilon_budget": 8}}}, "exceeds epsilon_budget 8"),
        # the secure-aggregation arithmetic: a round closing with `quorum` updates must be openable
        ({"federation": {"min_silos": 2, "min_group_size": 3, "secure_aggregation": {"mode": "ckks"}}},
         "federation: min_silos = 2 is below min_group_size = 3"),
        ({"federation": {"min_silos": 5, "quorum": 3, "secure_aggregation": {"mode": "masking", "threshold": 0.8}}},
         "federation: quorum = 3 is below the 4 survivors that secure_aggregation.threshold = 0.8 needs"),
        ({"aggregator": {"keep_checkpoints": 0}}, "aggregator.keep_checkpoints = 0: Input should be greater than 0"),
    ],
)
def test_errors_name_key_value_and_allowed(data, expected):
    with pytest.raises(ConfigError) as exc:
        parse_config(data, origin="x.yaml")
    message = str(exc.value)
    assert expected in message and message.startswith("x.yaml: ") and "\n" not in message


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation:\n  rounds: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.subprocess
def test_cli_prints_one_line_and_exits_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("federation:\n  rounds: -3\n")
    proc = subprocess.run([sys.executable, "-m", "fcmoe", "aggregator", str(cfg)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"fcmoe: error: {cfg}: federation.rounds = -3: Input should be greater than 0"]
