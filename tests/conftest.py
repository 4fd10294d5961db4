"""Shared fixtures: tiny configs, certificates, an in-process aggregator over real mutual TLS."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from crypto.pki import PkiPaths, ensure_pki
from fcmoe.config import Config, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
# .ci/run sets it: the whole of each slow matrix; plain pytest (make test) runs a representative slice
FULL_MATRIX = os.environ.get("FCMOE_FULL_MATRIX") == "1"
SMOKE = ROOT / "configs" / "smoke.yaml"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Cases marked ``ci_only`` run in .ci/run (``FCMOE_FULL_MATRIX=1 pytest -m ci_only``), after ``make
    test``, which runs a like case of each: the rest of a slow matrix, a second variant of a scenario."""
    if FULL_MATRIX:
        return
    skip = pytest.mark.skip(reason="runs in .ci/run (FCMOE_FULL_MATRIX=1 -m ci_only); make test runs a like case")
    for item in items:
        if item.get_closest_marker("ci_only") is not None:
            item.add_marker(skip)


def kill_process_groups(procs: Iterable[subprocess.Popen | None]) -> None:
    """SIGKILL what is still running of each process's group (tests start theirs in new sessions) and reap it."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def smoke_config(tmp_path: Path, strategy: dict | None = None, **federation) -> Config:
    """configs/smoke.yaml with its output under tmp_path and federation fields overridden."""
    data = load_config(SMOKE).model_dump(mode="json")
    data["run"]["output_dir"] = str(tmp_path / "run")
    data["federation"].update(federation)
    if strategy:
        data["federation"]["strategy"] = strategy
    data["aggregator"].update({"port": 0, "pki_dir": str(tmp_path / "certs")})
    data.pop("simulation", None)
    return parse_config(data)


def jsonl_config(tmp_path: Path) -> Config:
    """configs/smoke.yaml for one silo reading two small JSONL files (two domains) written under tmp_path."""
    from silo_agent.data import Example, write_jsonl

    train = [Example("", "the quick brown fox", "prose"), Example("2+2=", "4", "maths")] * 8
    held_out = [Example("", "jumps over the dog", "prose"), Example("3+3=", "6", "maths")] * 2
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "eval.jsonl", held_out)
    data = smoke_config(tmp_path).model_dump(mode="json")
    data["data"] = {"builtin": None, "train_file": str(tmp_path / "train.jsonl"),
                    "eval_file": str(tmp_path / "eval.jsonl"), "max_length": 32}
    data["silo"] = {"name": "silo0"}
    return parse_config(data)


def as_local_checkpoint(config: Config, folder: Path) -> Config:
    """``config`` with its built-in model saved to ``folder`` (safetensors, byte tokenizer) and read from there:
    the same weights, loaded as a real checkpoint is (a sharded silo reads it layer by layer)."""
    from fcmoe.model.build import build_base_model
    from fcmoe.model.tokenizer import byte_tokenizer

    build_base_model(config.model).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    data = config.model_dump(mode="json")
    data["model"].update(source="local", path=str(folder))
    return parse_config(data)


def silo_config(config: Config, name: str, port: int, index: int = 0, num_silos: int = 3) -> Config:
    data = config.model_dump(mode="json")
    data["silo"] = {"name": name, "aggregator": f"127.0.0.1:{port}", "pki_dir": data["aggregator"]["pki_dir"],
                    "index": index, "num_silos": num_silos, "threads": 1, "connect_timeout_s": 20,
                    "accept_modes": [config.federation.secure_aggregation.mode],
                    "min_group_size": max(2, config.federation.min_group_size)}
    return parse_config(data)


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    return ensure_pki(tmp_path / "certs", ["silo0", "silo1", "silo2"])


class InProcessAggregator:
    def __init__(self, config: Config):
        from aggregator.server import drive, start_aggregator

        self.running = start_aggregator(config)
        self.port = self.running.port
        self.coordinator = self.running.coordinator
        self.stop = threading.Event()
        self.thread = threading.Thread(target=drive, args=(self.coordinator, self.stop), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.running.stop(0)


@pytest.fixture
def aggregator_factory() -> Iterator:
    started: list[InProcessAggregator] = []

    def start(config: Config) -> InProcessAggregator:
        agg = InProcessAggregator(config)
        started.append(agg)
        return agg

    yield start
    for agg in started:
        agg.close()


class TaskDriver:
    """Real silo agents driven one task at a time, so that a test knows the aggregator's phase: a
    phase cannot move on while the silos it waits for hold their task."""

    def __init__(self, agents: list):
        from silo_agent.agent import SiloAgent

        self.agents: list[SiloAgent] = agents
        self.done: set[str] = set()
        self.statuses: dict[str, int] = {}  # silo -> the exit status its agent returned when told the run is over

    def handle(self, agent, task) -> None:
        status = agent.handle(task)
        if status is not None:
            self.done.add(agent.silo.name)
            self.statuses[agent.silo.name] = status

    @staticmethod
    def stage(task) -> str:
        """Mode masking: the stage ("sketch" or "update") a SKETCH, UPLOAD, CHECK or UNMASK task is of."""
        from protos import fcmoe_pb2 as pb

        return {pb.Task.CHECK: task.check.stage, pb.Task.UNMASK: task.unmask.stage,
                pb.Task.UPLOAD: task.upload.stage, pb.Task.SKETCH: task.upload.stage}.get(task.kind, "")

    def run_until(self, kind: int, round_: int, answered: int = 0, timeout_s: float = 240, *, stage: str = "",
                  holders: int | None = None) -> None:
        """Handle tasks until every silo (or ``holders`` of them: DECRYPT goes to the key holder alone)
        holds a ``kind`` task of ``round_`` (and of ``stage``, if given); then let ``answered`` of them
        do theirs. The aggregator is then in that phase, and stays there."""
        wanted = len(self.agents) if holders is None else holders
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            polled = [(a, a.client.get_task(a.run_id, wait_s=0.5)) for a in self.agents]
            hits = [(a, t) for a, t in polled
                    if t.kind == kind and t.round == round_ and (not stage or self.stage(t) == stage)]
            if len(hits) >= wanted:
                for agent, task in hits[:answered]:
                    self.handle(agent, task)
                return
            for agent, task in polled:
                if (agent, task) not in hits:
                    self.handle(agent, task)
        raise AssertionError(f"not every silo got task kind {kind} of round {round_}"
                             f"{f' (stage {stage})' if stage else ''} within {timeout_s} s")

    def finish(self, serving: Callable[[], bool] = lambda: True, timeout_s: float = 240) -> None:
        """Handle tasks until every silo is told the run is over (or the aggregator stops serving)."""
        end = time.monotonic() + timeout_s
        while len(self.done) < len(self.agents) and serving():
            assert time.monotonic() < end, "the run did not finish"
            for agent in self.agents:
                if agent.silo.name not in self.done and serving():
                    self.handle(agent, agent.client.get_task(agent.run_id, wait_s=0.5))

    def close(self) -> None:
        for agent in self.agents:
            agent.client.close()
