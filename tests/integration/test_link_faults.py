"""Cut links and dead silos mid-upload, through a real TCP pass-through in front of a live aggregator.

TLS stays end to end (the proxy forwards bytes); cutting the proxy's connections is what a dropped
link looks like to both sides.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from conftest import TaskDriver, silo_config, smoke_config

from crypto.pki import ensure_pki
from fcmoe.config import Config, parse_config
from fcmoe.launch.inprocess import run_in_process
from protos import codec
from protos import fcmoe_pb2 as pb
from silo_agent.agent import SiloAgent
from silo_agent.client import RpcFailure

pytestmark = [pytest.mark.tls, pytest.mark.slow]

K = pb.Task.Kind
CHUNK = 4096


class CuttingProxy:
    """Forwards TCP to the aggregator; once armed, cuts every connection after ``n`` more client bytes
    (and with ``refuse_after``, accepts none afterwards: the silo is gone)."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream = 0  # client -> aggregator bytes forwarded
        self.cut_at: int | None = None
        self.refuse_after = False
        self.before_cut: Callable[[], bool] | None = None
        self.cuts = 0
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, after_bytes: int, refuse_after: bool = False,
            before_cut: Callable[[], bool] | None = None) -> None:
        """``before_cut``: once the bytes are through, hold the link (nothing more forwarded) until it
        holds, then cut; e.g. until the aggregator is reading the stream, which on a loaded machine may
        start after the bytes arrived (a stream cut before its handler runs is simply never seen)."""
        with self._lock:
            self.cut_at, self.refuse_after, self.before_cut = self.upstream + after_bytes, refuse_after, before_cut

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refuse_after and self.cuts:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, outbound: bool) -> None:
        try:
            while data := src.recv(4096):
                if outbound and self.cut_at is not None:
                    time.sleep(0.05)  # armed: a slow link, so the receiver consumes chunks as they come
                dst.sendall(data)
                if outbound:
                    with self._lock:
                        self.upstream += len(data)
                        cut = self.cut_at is not None and self.upstream >= self.cut_at
                    if cut:
                        end = time.monotonic() + 30
                        while self.before_cut is not None and not self.before_cut() and time.monotonic() < end:
                            time.sleep(0.01)
                        self._cut()
                        return
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def _cut(self) -> None:
        with self._lock:
            socks, self._socks, self.cut_at = self._socks, [], None
            self.cuts += 1
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        self._cut()


@pytest.fixture
def proxy_factory():
    made: list[CuttingProxy] = []

    def make(port: int) -> CuttingProxy:
        made.append(CuttingProxy(port))
        return made[-1]

    yield make
    for p in made:
        p.close()


def _setup(tmp_path, silos: int, **federation) -> tuple[Config, list[Config]]:
    names = [f"silo{i}" for i in range(silos)]
    ensure_pki(tmp_path / "certs", names)
    config = smoke_config(tmp_path, rounds=federation.pop("rounds", 1), min_silos=silos, min_group_size=3,
                          secure_aggregation={"mode": "masking", "phase_timeout_s": 120}, **federation)
    return config, names


def _silo(config: Config, name: str, port: int, index: int, n: int, **silo) -> Config:
    data = silo_config(config, name, port, index, n).model_dump(mode="json")
    data["silo"].update({"upload_chunk_bytes": CHUNK, **silo})
    return parse_config(data)


def _payload_bytes(agent: SiloAgent) -> int:
    return sum(spec.nbytes for spec in agent.specs.values())


def test_an_upload_cut_mid_stream_resumes_after_the_last_chunk_the_aggregator_holds(
        tmp_path, aggregator_factory, proxy_factory, caplog):
    config, names = _setup(tmp_path, 3)
    agg = aggregator_factory(config)
    proxy = proxy_factory(agg.port)
    silos = [_silo(config, n, proxy.port if i == 0 else agg.port, i, 3) for i, n in enumerate(names)]
    driver = TaskDriver([SiloAgent(c) for c in silos])
    caplog.set_level(logging.INFO)
    try:
        driver.run_until(K.UPLOAD, 1)
        payload = _payload_bytes(driver.agents[0])
        chunks = len(list(codec.encode({u: np.zeros(s.shape, np.float32) for u, s in driver.agents[0].specs.items()},
                                       CHUNK)))
        assert chunks >= 8
        # cut once the aggregator reads silo0's stream (it then holds some chunks to resume after)
        proxy.arm(after_bytes=payload * 3 // 4, before_cut=lambda: agg.coordinator.uploads.is_open("silo0"))
        driver.run_until(K.UPLOAD, 1, answered=1)  # silo0's upload: cut halfway, then resumed
        driver.finish()
    finally:
        driver.close()

    assert proxy.cuts == 1
    events = {r.getMessage().split()[0]: r.getMessage() for r in caplog.records if r.getMessage().startswith("event=")}
    assert "event=update_interrupted" in events and "event=update_resumed" in events
    resumed_at = int(events["event=update_resumed"].split("chunk=")[1].split()[0])
    assert 0 < resumed_at < chunks
    coordinator = agg.coordinator
    assert coordinator.machine.succeeded and coordinator.metrics.records[1].stats["updates"] == 3
    # the resumed upload reassembled exactly: the same global model as a run without the cut
    reference = run_in_process(config.model_copy(update={"run": config.run.model_copy(
        update={"output_dir": tmp_path / "reference"})}), silos)
    for unit, value in reference.global_units.items():
        np.testing.assert_allclose(coordinator.global_units[unit], value, atol=1e-5, rtol=0)


@pytest.mark.ci_only  # make test cuts an upload mid-stream (the other test here)
def test_a_silo_that_dies_mid_upload_is_dropped_at_the_deadline_and_rejoins_next_round(
        tmp_path, aggregator_factory, proxy_factory):
    config, names = _setup(tmp_path, 4, rounds=2, quorum=3, upload_timeout_s=8)
    agg = aggregator_factory(config)
    proxy = proxy_factory(agg.port)
    silos = [_silo(config, n, proxy.port if i == 3 else agg.port, i, 4,
                   **({"connect_timeout_s": 2} if i == 3 else {})) for i, n in enumerate(names)]
    driver = TaskDriver([SiloAgent(c) for c in silos])
    try:
        driver.run_until(K.UPLOAD, 1, answered=3)  # three uploads in; silo3's next
        dying = driver.agents[3]
        proxy.arm(after_bytes=_payload_bytes(dying) // 2, refuse_after=True)
        task = dying.client.get_task(dying.run_id, wait_s=0.5)
        assert task.kind == K.UPLOAD
        with pytest.raises(RpcFailure, match="SubmitUpdate"):
            dying.handle(task)  # the link is cut mid-stream and never comes back: the process dies
        dying.client.close()
        driver.agents.pop()
        driver.run_until(K.TRAIN, 2)  # the round completed without silo3, at the upload deadline
        rec = agg.coordinator.metrics.records[1]
        assert rec.stats["updates"] == 3
        restarted = SiloAgent(_silo(config, "silo3", agg.port, 3, 4))  # silo3's process restarts
        driver.agents.append(restarted)
        driver.finish()
    finally:
        driver.close()
    assert agg.coordinator.machine.succeeded
    assert agg.coordinator.metrics.records[2].stats["updates"] == 4
