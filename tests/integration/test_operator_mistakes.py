"""Operator mistakes, made as an operator makes them: ``fcmoe aggregator`` / ``fcmoe silo`` run as
processes on a config with one thing wrong. Each must exit non-zero with one ``fcmoe: error:`` line
that names the key or path, no traceback, and nothing on disk changed (a checkpoint folder moved
aside or a run record rewritten before the check would be lost work)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, kill_process_groups, silo_config, smoke_config

from crypto.pki import ensure_pki
from fcmoe.config import Config, dump_config, parse_config
from fcmoe.launch.inprocess import run_in_process

pytestmark = [pytest.mark.subprocess]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a digest of its content: what "nothing changed" compares."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _write(config: Config | dict, path: Path) -> Path:
    dump_config(config if isinstance(config, Config) else parse_config(config), path)
    return path


def _fcmoe(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """The command as an operator types it (no progress flag: stderr is a pipe here, not a terminal)."""
    return subprocess.run([sys.executable, "-m", "fcmoe", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=_env())


def _the_error(proc: subprocess.CompletedProcess) -> str:
    """The one line the user is shown; exit status 2 and no traceback."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fcmoe: error:")]
    assert proc.returncode == 2 and len(errors) == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture
def finished_run(tmp_path) -> Config:
    """A finished one-round run in tmp_path/run: what a mistaken restart must not disturb."""
    config = smoke_config(tmp_path, rounds=1, min_silos=3)
    ensure_pki(config.aggregator.pki_dir, ["silo0", "silo1", "silo2"])
    silos = [silo_config(config, f"silo{i}", 0, i, 3) for i in range(3)]
    assert run_in_process(config, silos).machine.succeeded
    return config


def _aggregator_with(config: Config, tmp_path: Path, **sections) -> Path:
    data = config.model_dump(mode="json")
    for section, values in sections.items():
        data[section].update(values)
    return _write(data, tmp_path / "aggregator.yaml")


def test_missing_certificates_stop_the_start_before_the_last_run_is_moved_aside(tmp_path, finished_run):
    path = _aggregator_with(finished_run, tmp_path, aggregator={"pki_dir": str(tmp_path / "nocerts")})
    before = _tree(tmp_path)
    line = _the_error(_fcmoe("aggregator", str(path)))
    assert str(tmp_path / "nocerts") in line, line
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("where", ["proc", "below_a_file"])
def test_an_output_folder_that_cannot_be_made_is_named(tmp_path, pki, where):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    output = Path("/proc/fcmoe-run") if where == "proc" else tmp_path / "notes.txt" / "run"
    config = smoke_config(tmp_path)
    path = _aggregator_with(config, tmp_path, run={"output_dir": str(output)})
    before = _tree(tmp_path)
    line = _the_error(_fcmoe("aggregator", str(path)))
    assert f"run.output_dir = {output}" in line, line
    assert ("is a file, not a folder" in line) if where == "below_a_file" else ("cannot create files" in line)
    assert _tree(tmp_path) == before


def test_too_few_silos_for_a_masked_group_is_refused_at_start(tmp_path, pki):
    data = smoke_config(tmp_path).model_dump(mode="json")
    data["federation"].update({"min_silos": 2, "min_group_size": 3})
    data["federation"]["secure_aggregation"] = {"mode": "masking"}
    path = tmp_path / "aggregator.yaml"
    path.write_text(json.dumps(data))  # YAML is a superset of JSON; written as the operator would
    before = _tree(tmp_path)
    line = _the_error(_fcmoe("aggregator", str(path)))
    assert "min_silos = 2 is below min_group_size = 3" in line and "raise min_silos" in line, line
    assert _tree(tmp_path) == before


def test_a_silo_that_could_not_keep_its_privacy_ledger_stops_before_joining(tmp_path, pki):
    (tmp_path / "ledgers").write_text("a file where the ledger folder should be")
    config = silo_config(smoke_config(tmp_path), "silo0", 1).model_dump(mode="json")  # no aggregator needed
    config["silo"]["dp"] = {"enabled": True, "noise_multiplier": 1.0,
                            "ledger": str(tmp_path / "ledgers" / "silo0.jsonl")}
    path = _write(config, tmp_path / "silo.yaml")
    before = _tree(tmp_path)
    line = _the_error(_fcmoe("silo", str(path)))
    assert f"silo.dp.ledger = {tmp_path / 'ledgers'}" in line and "is a file" in line, line
    assert _tree(tmp_path) == before


def test_a_silo_without_its_certificate_names_the_file(tmp_path, pki):
    config = silo_config(smoke_config(tmp_path), "silo9", 1)  # no certificate was issued for silo9
    path = _write(config, tmp_path / "silo.yaml")
    before = _tree(tmp_path)
    line = _the_error(_fcmoe("silo", str(path)))
    assert "silo-silo9.pem" in line, line
    assert _tree(tmp_path) == before


def test_resume_is_refused_for_a_finished_run_and_a_new_run_moves_it_aside(tmp_path, finished_run):
    path = _aggregator_with(finished_run, tmp_path)
    before = _tree(tmp_path)
    line = _the_error(_fcmoe("aggregator", str(path), "--resume"))
    assert "--resume" in line and "no unfinished run" in line, line
    assert _tree(tmp_path) == before


def test_an_aborted_run_goes_on_only_with_resume(tmp_path, pki):
    """No silo joins within join_timeout_s: the run aborts and its log says how to go on. The same
    command then refuses to start (naming --resume) and changes nothing; with --resume it goes on."""
    config = smoke_config(tmp_path, join_timeout_s=1.0)
    path = _aggregator_with(config, tmp_path)
    first = _fcmoe("aggregator", str(path))
    assert first.returncode == 1, first.stderr[-2000:]
    assert "rounds:" not in first.stderr and "\r" not in first.stderr  # no progress bar off a terminal
    aborted = [line for line in first.stderr.splitlines() if "event=run_aborted" in line]
    assert len(aborted) == 1 and "--resume" in aborted[0], first.stderr[-2000:]

    before = _tree(tmp_path)
    line = _the_error(_fcmoe("aggregator", str(path)))
    assert "--resume" in line and "aborted" in line and str(tmp_path / "run" / "checkpoints") in line, line
    assert _tree(tmp_path) == before

    again = _fcmoe("aggregator", str(path), "--resume", "--progress")  # forced: drawn on the pipe too
    assert "rounds:" in again.stderr
    resumed = [line for line in again.stderr.splitlines() if "event=run_resumed" in line]
    assert len(resumed) == 1 and "after=" in resumed[0] and "aborted" in resumed[0], again.stderr[-2000:]
    assert again.returncode == 1  # no silo this time either: aborted again, nothing lost


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.ci_only)])
def test_a_signal_stops_the_aggregator_with_one_line_and_the_same_command_resumes(tmp_path, pki, sig):
    config = smoke_config(tmp_path)
    path = _aggregator_with(config, tmp_path, aggregator={"port_file": str(tmp_path / "port")})
    log = tmp_path / "aggregator.log"

    def start() -> subprocess.Popen:
        (tmp_path / "port").unlink(missing_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "fcmoe", "aggregator", str(path)],
                                    cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + 120
        while not (tmp_path / "port").exists():
            assert proc.poll() is None and time.monotonic() < end, log.read_text()[-2000:]
            time.sleep(0.1)
        return proc

    proc = start()
    try:
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 128 + sig
        text = log.read_text()
        assert text.count("event=stopping") == 1 and f"signal={sig.name}" in text, text[-2000:]
        assert "event=stopped" in text and "same command" in text
        record = json.loads((tmp_path / "run" / "checkpoints" / "run.json").read_text())
        assert not record["finished"] and record["outcome"] == ""  # resumable, not aborted
        proc = start()
        assert f"event=run_resumed run_id={record['run_id']}" in log.read_text()
    finally:
        kill_process_groups([proc])
