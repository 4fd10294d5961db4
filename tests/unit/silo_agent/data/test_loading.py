"""silo_agent/data/loading.py: a silo's data from its config, what it logs, and one-line errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fcmoe.errors import DataError
from silo_agent.data import DOMAINS, ByteTokenizer, Example, build_silo_dataset, generate, load_jsonl, write_jsonl


def _silo_with_jsonl(tmp_path: Path, max_length: int):
    """A silo config (configs/smoke.yaml's model) on two small JSONL files of known byte lengths."""
    from fcmoe.config import load_config, parse_config

    # encoded with BOS and EOS: "the quick brown fox" 21 tokens, "2+2=" -> "4" 7; held out: 20 and 7
    train = [Example("", "the quick brown fox", "prose"), Example("2+2=", "4", "maths")] * 8
    held_out = [Example("", "jumps over the dog", "prose"), Example("3+3=", "6", "maths")] * 2
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "eval.jsonl", held_out)
    data = load_config(Path(__file__).resolve().parents[4] / "configs" / "smoke.yaml").model_dump(mode="json")
    data.pop("simulation", None)
    data["run"]["output_dir"] = str(tmp_path / "run")
    data["data"] = {"train_file": str(tmp_path / "train.jsonl"), "eval_file": str(tmp_path / "eval.jsonl"),
                    "max_length": max_length}
    data["silo"] = {"name": "silo0", "pki_dir": str(tmp_path / "certs"), "threads": 1}
    return parse_config(data)


def _data_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "silo_agent.data.loading"
            and r.getMessage().startswith(("event=data_truncated", "event=data_loaded"))]


def _builtin_sources() -> list[tuple[str, int, dict, int]]:
    """``(name, silos, build_silo_dataset arguments, the config's max_length)`` of every built-in data
    set a shipped config (or no config at all) trains on; Shakespeare configs set their own max_length."""
    from fcmoe.config import Config, load_config

    sources = []
    shipped = sorted((Path(__file__).resolve().parents[4] / "configs").glob("*.yaml"))
    configs = [("(defaults)", Config())] + [(path.name, load_config(path)) for path in shipped]
    for name, config in configs:
        b = config.data.builtin
        if b is None:
            continue
        silos = config.simulation.silos if config.simulation else config.federation.min_silos
        args = dict(domains=b.domains, partition=b.partition, alpha=b.alpha, samples_per_silo=b.samples_per_silo,
                    eval_fraction=b.eval_fraction, seed=b.seed)
        sources.append((name, silos, args, config.data.max_length))
        for s in config.benchmark.settings if config.benchmark else []:
            if s.shakespeare is None:
                sources.append((f"{name}:{s.name}", s.silos, {**args, "domains": s.domains, "partition": s.partition,
                                                              "alpha": s.alpha}, config.data.max_length))
    return sources


def test_a_wrong_key_lists_every_allowed_key_and_an_empty_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "response": "r", "txt": "x"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: unknown key\(s\) \['txt'\]; allowed: \['domain', 'prompt', "
                                        r"'response', 'text'\]"):
        load_jsonl(path)
    path.write_text("\n  \n")
    with pytest.raises(DataError, match=r"d.jsonl: no records \(the file is empty or holds only blank lines\)"):
        load_jsonl(path)


def test_train_and_eval_files_switch_the_built_in_data_off(tmp_path: Path) -> None:
    from fcmoe.config import parse_config

    config = parse_config({"run": {"name": "x"}, "model": {"source": "builtin"},
                           "data": {"train_file": str(tmp_path / "t.jsonl"), "eval_file": str(tmp_path / "e.jsonl")}})
    assert config.data.builtin is None and config.data.train_file == tmp_path / "t.jsonl"


def test_silo_logs_what_max_length_cuts_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from crypto.pki import ensure_pki
    from silo_agent.agent import SiloAgent

    ensure_pki(tmp_path / "certs", ["silo0"])
    caplog.set_level(logging.INFO, logger="silo_agent.data.loading")
    agent = SiloAgent(_silo_with_jsonl(tmp_path, max_length=12))  # real certificates; connects only when run
    agent.client.close()
    assert _data_lines(caplog) == [
        ("WARNING", "event=data_truncated split=train records=16 cut=8 max_length=12 longest=21 most_cut=9 "
                    'tokens_cut=72 to_fix="set data.max_length to 21 or shorten the records"'),
        ("WARNING", "event=data_truncated split=held_out records=4 cut=2 max_length=12 longest=20 most_cut=8 "
                    'tokens_cut=16 to_fix="set data.max_length to 20 or shorten the records"'),
    ]
    assert agent.data.train.truncation.cut == 8 and agent.data.eval.truncation.tokens_cut == 16


def test_silo_logs_data_loaded_when_nothing_is_cut(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from silo_agent.data.loading import load_data

    caplog.set_level(logging.INFO, logger="silo_agent.data.loading")
    load_data(_silo_with_jsonl(tmp_path, max_length=21))  # the longest record exactly fits
    assert _data_lines(caplog) == [
        ("INFO", "event=data_loaded split=train records=16 cut=0 max_length=21 longest=21 most_cut=0 tokens_cut=0"),
        ("INFO", "event=data_loaded split=held_out records=4 cut=0 max_length=21 longest=20 most_cut=0 tokens_cut=0"),
    ]


def test_default_max_length_cuts_no_built_in_demo_record() -> None:
    from fcmoe.config import DataConfig
    from silo_agent.data import count_truncation, encoded_length

    default = DataConfig.model_fields["max_length"].default
    tok = ByteTokenizer()
    # every synthetic domain at its longest input (8 letters): `double` is the longest, 28 tokens
    for domain in DOMAINS:
        longest_inputs = generate(domain, 16, seed=0, min_len=8, max_len=8)
        worst = count_truncation([encoded_length(tok, e) for e in longest_inputs], default)
        assert worst.cut == 0 and worst.longest == (28 if domain == "double" else 20), domain
    sources = _builtin_sources()
    assert {"(defaults)", "demo.yaml", "demo_fcmoe.yaml", "demo_dp.yaml", "smoke.yaml",
            "bench_conflict.yaml:dirichlet-0.1"} <= {name for name, *_ in sources}
    for name, silos, args, own in sources:
        lengths = [encoded_length(tok, e) for i in range(silos)
                   for split in build_silo_dataset(silo_index=i, num_silos=silos, **args) for e in split]
        assert count_truncation(lengths, default).cut == 0, name
        assert count_truncation(lengths, own).cut == 0, name  # and the config's own max_length
