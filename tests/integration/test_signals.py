"""SIGTERM and SIGINT as operators send them (systemd, docker stop, Ctrl-C) to real processes in a
real masked run: each process logs one ``event=stopping`` line, stops at a safe point with 128 + the
signal's number, and the same commands finish the run with every silo exiting 0."""

from __future__ import annotations

import pytest
import os
import signal
import subprocess
import time

from conftest import kill_process_groups
from restarts import (aggregator_events, aggregator_process, federation_configs, metrics_rows,  # noqa: F401
                      start_silo_process)

pytestmark = [pytest.mark.subprocess, pytest.mark.tls, pytest.mark.slow]


def _wait_for(condition, what: str, timeout_s: float = 240) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigterm_to_the_aggregator_and_sigint_to_a_silo_mid_run_lose_nothing(tmp_path, aggregator_process):
    aggregator, silos = federation_configs(tmp_path, 3, rounds=2)
    agg = aggregator_process(aggregator)
    agg.start()
    procs: dict[str, subprocess.Popen] = {}
    try:
        for config in silos:
            procs[config.silo.name] = start_silo_process(config, tmp_path)
        _wait_for(lambda: aggregator_events(agg.log, "update_accepted"), "a first update")

        os.killpg(agg.proc.pid, signal.SIGTERM)  # mid-round, while updates arrive
        assert agg.proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert [e["signal"] for e in aggregator_events(agg.log, "stopping")] == ["SIGTERM"]
        assert len(aggregator_events(agg.log, "stopped")) == 1

        # while the aggregator is down silo1 retries; Ctrl-C ends that at once, not after connect_timeout_s
        os.killpg(procs["silo1"].pid, signal.SIGINT)
        assert procs["silo1"].wait(timeout=60) == 128 + signal.SIGINT
        silo1_log = (tmp_path / "silo1.log").read_text()
        assert silo1_log.count("event=stopping signal=SIGINT") == 1 and "event=silo_stopped" in silo1_log
        assert "Traceback" not in silo1_log

        agg.start()  # the same commands again
        procs["silo1"] = start_silo_process(silos[1], tmp_path)
        statuses = {name: proc.wait(timeout=300) for name, proc in procs.items()}
    finally:
        kill_process_groups(procs.values())
    assert statuses == {"silo0": 0, "silo1": 0, "silo2": 0}, {
        name: (tmp_path / f"{name}.log").read_text()[-2000:] for name in statuses}
    assert agg.proc.wait(timeout=60) == 0
    assert len(aggregator_events(agg.log, "run_resumed")) == 1
    rows = metrics_rows(aggregator.run.output_dir)
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["updates"] == 3 for r in rows[1:])
