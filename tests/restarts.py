"""Helpers of the tests that kill a real aggregator process and restart it (tests/integration/test_crash_resume.py,
tests/integration/test_restart_matrix.py): the process, its configs, the silos driven task by task, its logs and
metrics, and the uninterrupted run a resumed one must end as.

Imported like conftest (``from restarts import ...``); the fixture ``aggregator_process`` is imported
into the test modules that use it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TaskDriver, kill_process_groups, silo_config, smoke_config
from safetensors.numpy import load_file

from crypto.pki import ensure_pki
from fcmoe.config import Config, dump_config, parse_config
from fcmoe.launch.inprocess import run_in_process
from protos import fcmoe_pb2 as pb
from silo_agent.agent import SiloAgent

K = pb.Task.Kind
FEDADAM = {"name": "fedadam", "server_lr": 0.05}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_silo_process(config: Config, folder: Path) -> subprocess.Popen:
    """``fcmoe silo CONFIG`` as its own process group, logging to FOLDER/NAME.log (the caller kills it:
    conftest.kill_process_groups)."""
    path = folder / f"{config.silo.name}.yaml"
    dump_config(config, path)
    with open(folder / f"{config.silo.name}.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "fcmoe", "silo", str(path), "--no-progress"], cwd=ROOT,
                                env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


class AggregatorProcess:
    """``fcmoe aggregator CONFIG`` as its own process group; killed, restarted, always cleaned up."""

    def __init__(self, config: Config, tmp_path: Path):
        self.path = tmp_path / "aggregator.yaml"
        dump_config(config, self.path)
        self.port_file = config.aggregator.port_file
        self.log = tmp_path / "aggregator.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.port_file.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "fcmoe", "aggregator", str(self.path),
                                          "--no-progress"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.starts += 1
        end = time.monotonic() + 120
        while not (self.port_file.exists() and self.port_file.read_text().strip()):
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < end, "aggregator did not listen"
            time.sleep(0.1)

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, "the aggregator died before its kill"
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def restart(self) -> None:
        """SIGKILL, then the same command again."""
        self.kill()
        self.start()

    def close(self) -> None:
        kill_process_groups([self.proc])


@pytest.fixture
def aggregator_process(tmp_path):
    """Makes AggregatorProcess objects (each in its own folder under tmp_path); kills what is left of
    them when the test ends."""
    started: list[AggregatorProcess] = []

    def make(config: Config, folder: Path | None = None) -> AggregatorProcess:
        started.append(AggregatorProcess(config, folder or tmp_path))
        return started[-1]

    yield make
    for agg in started:
        agg.close()


def federation_configs(tmp_path: Path, silos: int, dp: bool = False, mode: str = "masking", *,
                       strategy: Mapping | None = None, model: Mapping | None = None,
                       rounds: int = 3) -> tuple[Config, list[Config]]:
    """The aggregator's config (configs/smoke.yaml, its run under ``tmp_path``, a fixed port and a
    port file) and each silo's. ``strategy`` replaces federation.strategy (default FedAdam);
    ``model`` sets model fields, a mapping value updating that section (``{"builtin": {"family":
    "qwen2_moe"}}`` changes the family only)."""
    names = [f"silo{i}" for i in range(silos)]
    ensure_pki(tmp_path / "certs", names)
    base = smoke_config(tmp_path, dict(strategy or FEDADAM), rounds=rounds, min_silos=silos,
                        round_timeout_s=300, upload_timeout_s=300, min_group_size=3,
                        secure_aggregation={"mode": mode, "phase_timeout_s": 300})
    data = base.model_dump(mode="json")
    for key, value in (model or {}).items():
        if isinstance(value, Mapping) and isinstance(data["model"].get(key), dict):
            data["model"][key].update(value)
        else:
            data["model"][key] = value
    data["aggregator"].update({"port": free_port(), "port_file": str(tmp_path / "aggregator.port")})
    aggregator = parse_config(data)
    silo_configs = []
    for i, name in enumerate(names):
        silo = silo_config(aggregator, name, aggregator.aggregator.port, i, silos).model_dump(mode="json")
        silo["silo"]["connect_timeout_s"] = 120  # outlives an aggregator restart
        if dp:
            silo["silo"]["dp"] = {"enabled": True, "noise_multiplier": 1.0, "epsilon_budget": 100.0,
                                  "ledger": str(tmp_path / "ledgers" / f"{name}.jsonl")}
        silo_configs.append(parse_config(silo))
    return aggregator, silo_configs


class Federation(TaskDriver):
    """The silos of these tests, driven task by task against the aggregator process."""

    def __init__(self, silo_configs: list[Config], aggregator: AggregatorProcess):
        super().__init__([SiloAgent(c) for c in silo_configs])
        self.aggregator = aggregator
        self.sessions: dict[int, set[int]] = {}  # TRAIN session -> the aggregator starts that handed it out
        self.ckks_key_requests: set[int] = set()  # aggregator starts that asked a silo for the CKKS key
        # (silo, round) -> how often the silo trained that round afresh after a sum holding its update was
        # unmasked or (ckks) sent for decryption (TrainedRound.retrain; 0: trained once, then resent)
        self.retrains: dict[tuple[str, int], int] = {}

    def handle(self, agent: SiloAgent, task: pb.Task) -> None:
        if task.kind == K.TRAIN:
            self.sessions.setdefault(task.train.session, set()).add(self.aggregator.starts)
        if task.kind == K.SHARE and task.share.want_ckks_context:
            self.ckks_key_requests.add(self.aggregator.starts)
        super().handle(agent, task)
        if task.kind == K.TRAIN and agent.state.trained is not None and agent.state.trained.round == task.round:
            self.retrains[(agent.silo.name, task.round)] = agent.state.trained.retrain

    def finish(self, timeout_s: float = 240) -> None:
        super().finish(lambda: self.aggregator.proc.poll() is None, timeout_s)
        assert self.aggregator.proc.wait(timeout=60) == 0, self.aggregator.log.read_text()[-3000:]


def aggregator_events(log: Path, name: str) -> list[dict[str, str]]:
    """The aggregator's one-line ``event=NAME k=v ...`` records of one kind (values unquoted as logged)."""
    out = []
    for line in log.read_text().splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if fields.get("event") == name:
            out.append(fields)
    return out


def metrics_rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(output_dir: Path) -> dict[int, dict[str, np.ndarray]]:
    """Every global model still on disk under ``output_dir``, by version."""
    root = output_dir / "checkpoints"
    return {int(path.parent.name.removeprefix("round-")): load_file(str(path))
            for path in sorted(root.glob("round-*/global.safetensors"))}


def uninterrupted(aggregator: Config, silos: list[Config], output_dir: Path, *, run_id: str | None = None,
                  run_secret: bytes | None = None):
    """The same federation run without a crash, in this process (fcmoe.launch.inprocess), its output in
    ``output_dir``; returns the finished coordinator.

    FC-MoE's keyed sketches in mode masking are keyed by the run id and by the run secret that one
    silo draws at random (silo_agent/secure_session.py): the same federation has the same two, so
    with ``run_secret`` every silo starts out holding it (none is dealt) and ``run_id`` names the run.
    """
    config = aggregator.model_copy(update={"run": aggregator.run.model_copy(update={"output_dir": output_dir})})
    return run_in_process(config, silos, run_id=run_id, run_secret=run_secret)


def assert_same_as_uninterrupted(aggregator: Config, silos: list[Config], tmp_path: Path, atol: float,
                                 **same) -> None:
    """The same federation without a crash, in process, ends with the same global model, and passes
    through the same global model at every version both runs still hold on disk (``same``: the run id
    and run secret of :func:`uninterrupted`)."""
    reference = uninterrupted(aggregator, silos, tmp_path / "reference", **same)
    assert reference.machine.succeeded, reference.machine.outcome
    out = aggregator.run.output_dir
    latest = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("round-"))
    assert latest == aggregator.federation.rounds
    crashed, expected = checkpoints(out), checkpoints(tmp_path / "reference")
    assert latest in set(crashed) & set(expected)
    for version in sorted(set(crashed) & set(expected)):
        assert list(crashed[version]) and set(crashed[version]) == set(expected[version])
        for unit, value in expected[version].items():
            np.testing.assert_allclose(crashed[version][unit], value, atol=atol, rtol=0,
                                       err_msg=f"global model version {version}, unit {unit}")
    for unit, value in reference.global_units.items():  # what the reference ended with, as held in memory
        np.testing.assert_allclose(crashed[latest][unit], value, atol=atol, rtol=0, err_msg=f"final unit {unit}")
