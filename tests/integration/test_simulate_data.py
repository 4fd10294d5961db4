"""`fcmoe simulate` on the user's own per-silo files: `data.silos` and `{silo}` in the file paths."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SMOKE

from fcmoe.config import dump_config, load_config, parse_config
from fcmoe.errors import ConfigError
from fcmoe.launch.simulate import missing_data_files, role_configs, simulate

pytestmark = [pytest.mark.subprocess]

EXAMPLE = ROOT / "configs" / "examples" / "simulate_files.yaml"
TASKS = {"silo0": ("upper", str.upper), "silo1": ("reverse", lambda w: w[::-1]),
         "silo2": ("sort", lambda w: "".join(sorted(w)))}
TRAIN = {"silo0": 12, "silo1": 20, "silo2": 28}  # a different size per silo: each log must show its own


def _words(count: int, offset: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [letters[(i * 7 + offset) % 26] + letters[(i * 3 + 1) % 26] + letters[(i + offset) % 26] + "xq"[i % 2]
            for i in range(count)]


def _write_silo_files(root: Path) -> dict[str, dict[str, str]]:
    files = {}
    for k, (name, (domain, task)) in enumerate(TASKS.items()):
        folder = root / name
        folder.mkdir(parents=True)
        words = _words(TRAIN[name] + 4, offset=k)
        for split, part in (("train", words[:TRAIN[name]]), ("eval", words[TRAIN[name]:])):
            (folder / f"{split}.jsonl").write_text("".join(
                json.dumps({"prompt": f"{w}=", "response": f"{task(w)}\n", "domain": domain}) + "\n" for w in part))
        files[name] = {"train_file": str(folder / "train.jsonl"), "eval_file": str(folder / "eval.jsonl")}
    return files


def _smoke(tmp_path: Path, data: dict, **federation) -> dict:
    raw = load_config(SMOKE).model_dump(mode="json")
    raw["run"]["output_dir"] = str(tmp_path / "run")
    raw["data"] = {"max_length": 24, **data}
    raw["federation"].update(federation)
    return raw


def _run(cfg: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fcmoe", "simulate", str(cfg), "--no-progress"],
                          capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)


def _examples(log: str) -> tuple[int, int, int]:
    """(train records, held-out records, train_examples at join) as the silo logged them."""
    train = re.search(r"event=data_loaded split=train records=(\d+)", log)
    held_out = re.search(r"event=data_loaded split=held_out records=(\d+)", log)
    joined = re.search(r"event=joined .*train_examples=(\d+)", log)
    assert train and held_out and joined, log
    return int(train[1]), int(held_out[1]), int(joined[1])


def test_simulate_each_silo_reads_its_own_files(tmp_path):
    """data.silos: three silos, three tasks, three sizes; 2 rounds over the real launcher."""
    cfg = tmp_path / "sim.yaml"
    dump_config(parse_config(_smoke(tmp_path, {"silos": _write_silo_files(tmp_path / "data")})), cfg)
    proc = _run(cfg)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "run"
    for name in TASKS:
        assert _examples((out / "logs" / f"{name}.log").read_text()) == (TRAIN[name], 4, TRAIN[name])
        role = load_config(out / "roles" / f"{name}.yaml").data
        assert role.silos is None and role.train_file == tmp_path / "data" / name / "train.jsonl"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(f"global_loss/{domain}" in rows[-1] for domain, _ in TASKS.values())  # every silo's own domain
    assert all(set(r["silos"]) == set(TASKS) for r in rows[1:])


def test_shipped_example_data_loads_per_silo(monkeypatch):
    """configs/examples/simulate_files.yaml (the README's snippet) from the repository root: each silo's
    role config reads its own shipped pair whole (the launcher path itself runs in the test above)."""
    from silo_agent.data.loading import load_data

    monkeypatch.chdir(ROOT)  # the example's paths are relative to the repository root
    _, silos = role_configs(load_config(EXAMPLE), port=1)
    sizes = []
    for silo in silos:
        data = load_data(silo)
        assert data.train.truncation.cut == 0 and data.eval.truncation.cut == 0
        assert data.num_train == len(silo.data.train_file.read_text().splitlines())
        sizes.append(data.num_train)
    assert len(set(sizes)) == 3


def test_placeholder_expands_per_silo_in_role_configs(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config(EXAMPLE)
    assert missing_data_files(config) == []  # the example's data ships with it
    agg, silos = role_configs(config, port=1)
    for i, silo in enumerate(silos):
        assert silo.data.train_file == Path(f"configs/examples/data/silo{i}/train.jsonl")
        assert silo.data.eval_file == Path(f"configs/examples/data/silo{i}/eval.jsonl")
        parse_config(silo.model_dump(mode="json"))  # a valid silo file: no placeholder, no data.silos
    assert agg.silo is None and agg.simulation is None


def test_one_eval_file_for_all_and_builtin_untouched(tmp_path):
    shared = _smoke(tmp_path, {"train_file": "d/{silo}.jsonl", "eval_file": "d/common.jsonl"})
    _, silos = role_configs(parse_config(shared), port=1)
    assert [(str(s.data.train_file), str(s.data.eval_file)) for s in silos] == [
        (f"d/silo{i}.jsonl", "d/common.jsonl") for i in range(3)]
    _, silos = role_configs(load_config(SMOKE), port=1)
    assert all(s.data == load_config(SMOKE).data for s in silos)


F = {"train_file": "a.jsonl", "eval_file": "b.jsonl"}


@pytest.mark.parametrize("data, expected", [
    ({"data": {"builtin": {}, "silos": {"silo0": F}}}, "data: silos gives each simulated silo its own "
     "train_file/eval_file: not with builtin"),
    ({"data": {"shakespeare": {}, "silos": {"silo0": F}}}, "data: silos gives each simulated silo its own "
     "train_file/eval_file: not with shakespeare"),
    ({"data": {**F, "silos": {"silo0": F}}}, "data: give train_file/eval_file (one pair; {silo} in them expands "
     "per silo) or silos (a pair per silo), not both"),
    ({"data": {"silos": {"silo0": F, "silo1": F, "site7": F}}, "simulation": {"silos": 2}},
     "data.silos.site7: not a simulated silo (simulation.silos = 2: silo0, silo1)"),
    ({"data": {"silos": {"silo0": F}}, "simulation": {"silos": 3}},
     "data.silos: no entry for silo1, silo2 (simulation.silos = 3: silo0, silo1, silo2; each needs"),
    ({"data": {"silos": {"silo0": F}}, "simulation": {"silos": 12}},
     "data.silos: no entry for silo1, silo2, silo3 and 8 more (simulation.silos = 12: silo0 .. silo11;"),
    ({"data": {"silos": {"silo0": {"train_file": "a.jsonl"}}}}, "data.silos.silo0.eval_file: Field required"),
    ({"data": {"silos": {}}}, "data.silos: Dictionary should have at least 1 item"),
    ({"data": {"silos": {"silo0": F}}, "silo": {"name": "a"}},
     "data.silos: a silo config (with a silo section) has one data set: give data.train_file and data.eval_file"),
    ({"data": {"train_file": "d/{silo}/t.jsonl", "eval_file": "e.jsonl"}, "silo": {"name": "a"}},
     "data.train_file = 'd/{silo}/t.jsonl': {silo} is expanded by fcmoe simulate only"),
    ({"run": {"output_dir": "runs/{silo}"}}, "run.output_dir = 'runs/{silo}': {silo} is expanded only in "
     "data.train_file and data.eval_file"),
    ({"data": {"shakespeare": {"data_dir": "s/{silo}"}}}, "data.shakespeare.data_dir = 's/{silo}': {silo} is"),
])
def test_per_silo_data_errors_are_one_line(data, expected):
    with pytest.raises(ConfigError) as exc:
        parse_config(data, origin="x.yaml")
    message = str(exc.value)
    assert message.startswith(f"x.yaml: {expected}") and "\n" not in message, message


def test_launcher_names_missing_files_before_anything_starts(tmp_path):
    files = _write_silo_files(tmp_path / "data")
    (tmp_path / "data" / "silo1" / "eval.jsonl").unlink()
    config = parse_config(_smoke(tmp_path, {"silos": files}))
    with pytest.raises(ConfigError) as exc:
        simulate(config, progress=False)
    assert str(exc.value) == f"no such file: data.silos.silo1.eval_file = {tmp_path / 'data/silo1/eval.jsonl'}"
    assert not (tmp_path / "run").exists()  # nothing written, no process started

    config = parse_config(_smoke(tmp_path, {"train_file": str(tmp_path / "data/{silo}/train.jsonl"),
                                            "eval_file": str(tmp_path / "data/{silo}/eval.jsonl")}))
    with pytest.raises(ConfigError, match=r"^no such file: data.eval_file \(silo1\) = .*silo1/eval.jsonl$"):
        simulate(config, progress=False)
    config = parse_config(_smoke(tmp_path, {"train_file": str(tmp_path / "data/{silo}/train.jsonl"),
                                            "eval_file": str(tmp_path / "nope.jsonl")}))
    with pytest.raises(ConfigError, match=r"^no such file: data.eval_file = .*nope.jsonl$"):  # named once
        simulate(config, progress=False)
    assert not (tmp_path / "run").exists()
