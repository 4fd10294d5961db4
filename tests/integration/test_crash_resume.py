"""The aggregator killed with SIGKILL in every phase and restarted with the same command.

The aggregator runs as a real process (``fcmoe aggregator``) serving mutual TLS on a fixed port; the
silos are real agents over real gRPC, driven here task by task so that the kill lands in a known
phase: a phase cannot move on while the silos it waits for hold their task. Each restart must go on
from the last completed round with fresh sessions, the silos rejoin on their own (the aggregator
answers their next poll with JOIN), and the run must end with the global model an uninterrupted run

pytestmark = [pytest.mark.subprocess, pytest.mark.tls, pytest.mark.slow]
computes; under DP no ledger may record a round twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, kill_process_groups, silo_config, smoke_config
from restarts import aggregator_process  # noqa: F401 (a fixture)
from restarts import K, Federation, aggregator_events, assert_same_as_uninterrupted, federation_configs, metrics_rows

from crypto.pki import ensure_pki
from fcmoe.launch.audit import audit
from fcmoe.config import dump_config, parse_config
from silo_agent.agent import SiloAgent


def test_killed_in_every_phase_the_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path, aggregator_process):
    aggregator, silos = federation_configs(tmp_path, 3, dp=False)
    agg = aggregator_process(aggregator)
    fed = Federation(silos, agg)
    try:
        agg.start()
        fed.agents[0].join()  # WAITING: one of three has joined
        agg.restart()
        fed.run_until(K.TRAIN, 1, answered=1)  # TRAINING, one report in
        agg.restart()
        fed.run_until(K.SHARE, 1)  # SHARING, nothing in
        agg.restart()
        fed.run_until(K.UPLOAD, 1, answered=2)  # UPLOADING, two masked updates in
        agg.restart()
        # CHECKING of round 2, one signature in: nothing revealed yet, so the silos may resend their
        # updates and the run ends as an uninterrupted one (after a reveal they would train afresh:
        # tests/integration/test_attack_aggregator.py)
        fed.run_until(K.CHECK, 2, answered=1)
        agg.restart()
        fed.run_until(K.EVALUATE, 3, answered=1)  # final EVALUATING, one evaluation in
        agg.restart()
        fed.finish()
    finally:
        fed.close()

    assert fed.statuses == {"silo0": 0, "silo1": 0, "silo2": 0}
    out = aggregator.run.output_dir
    resumed = aggregator_events(agg.log, "run_resumed")
    assert [e["version"] for e in resumed] == ["0", "0", "0", "0", "1", "3"]
    assert all(len(starts) == 1 for starts in fed.sessions.values()), "a restart reused a session (keys, masks)"
    assert {s >> 16 for s in fed.sessions} == {1, 2, 3}
    record = json.loads((out / "checkpoints" / "run.json").read_text())
    assert record["finished"] and record["run_id"] == resumed[0]["run_id"]
    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and all(r["updates"] == 3 for r in rows[1:])
    assert rows[-1]["global_loss"] is not None  # the final evaluation was redone and pooled once

    assert_same_as_uninterrupted(aggregator, silos, tmp_path, atol=1e-5)


def test_ckks_killed_while_the_key_holder_decrypts_resumes_with_the_run_key(tmp_path, aggregator_process):
    """The CKKS key is dealt in round 1; killed in round 2's DECRYPT phase, the aggregator reloads the
    run's public context and sealed key from disk, so the silos' key still matches."""
    aggregator, silos = federation_configs(tmp_path, 3, dp=False, mode="ckks")
    aggregator = aggregator.model_copy(update={"federation": aggregator.federation.model_copy(update={"rounds": 2})})
    agg = aggregator_process(aggregator)
    fed = Federation(silos, agg)
    try:
        agg.start()
        fed.run_until(K.DECRYPT, 2, holders=1)  # the key holder alone gets DECRYPT
        agg.restart()
        fed.finish()
    finally:
        fed.close()
    assert fed.statuses == {"silo0": 0, "silo1": 0, "silo2": 0}
    assert [e["version"] for e in aggregator_events(agg.log, "run_resumed")] == ["1"]
    assert fed.ckks_key_requests == {1}  # dealt once; the restarted aggregator read it from disk
    # the redone round 2 is trained afresh (its uploads may have been decrypted before the crash, so
    # resending them would let a difference of two sums expose one silo): completed, not identical
    rows = metrics_rows(aggregator.run.output_dir)
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["updates"] == 3
    assert json.loads((aggregator.run.output_dir / "checkpoints" / "run.json").read_text())["finished"]


def test_under_dp_a_redone_round_is_never_released_twice(tmp_path, aggregator_process):
    """Killed after uploads (every silo has released round 1) and again in round 2; one silo also
    restarts: it declines the round its ledger already holds instead of training it again."""
    aggregator, silos = federation_configs(tmp_path, 4, dp=True)
    aggregator = aggregator.model_copy(update={"federation": aggregator.federation.model_copy(
        update={"rounds": 2, "quorum": 3})})
    agg = aggregator_process(aggregator)
    fed = Federation(silos, agg)
    try:
        agg.start()
        fed.run_until(K.UPLOAD, 1, answered=1)
        agg.kill()
        fed.agents[3].client.close()
        fed.agents[3] = SiloAgent(silos[3])  # silo3 restarted too: its round-1 update is gone
        agg.start()
        fed.run_until(K.TRAIN, 2, answered=2)
        agg.restart()
        fed.finish()
    finally:
        fed.close()

    assert fed.statuses == {f"silo{i}": 0 for i in range(4)}
    out = aggregator.run.output_dir
    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["updates"] == 3 and "declined" in rows[1]["silos"]["silo3"]
    assert rows[2]["updates"] == 4
    for config in silos:
        name = config.silo.name
        rows = audit(config.silo.dp.ledger, (tmp_path / "certs" / f"silo-{name}.pem").read_bytes())  # verifies
        assert [r.round for r in rows] == [1, 2], name


@pytest.mark.ci_only  # make test kills the aggregator in every phase (the first test here)
def test_silos_left_to_themselves_ride_out_a_kill_mid_round(tmp_path, aggregator_process):
    """No test driver: each silo is its own ``fcmoe silo`` process, the aggregator is killed while
    updates are arriving and restarted; every silo finishes the run on its own with status 0."""
    aggregator, silos = federation_configs(tmp_path, 3, dp=False)
    aggregator = aggregator.model_copy(update={"federation": aggregator.federation.model_copy(update={"rounds": 2})})
    agg = aggregator_process(aggregator)
    agg.start()
    procs = []
    try:
        for config in silos:
            path = tmp_path / f"{config.silo.name}.yaml"
            dump_config(config, path)
            with open(tmp_path / f"{config.silo.name}.log", "ab") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "fcmoe", "silo", str(path), "--no-progress"],
                                              cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        end = time.monotonic() + 240
        while not aggregator_events(agg.log, "update_accepted"):
            assert time.monotonic() < end and agg.proc.poll() is None, "no update arrived"
            time.sleep(0.02)
        agg.restart()
        statuses = [proc.wait(timeout=240) for proc in procs]
    finally:
        kill_process_groups(procs)
    assert statuses == [0, 0, 0], [(tmp_path / f"{c.silo.name}.log").read_text()[-2000:] for c in silos]
    assert agg.proc.wait(timeout=60) == 0
    rows = metrics_rows(aggregator.run.output_dir)
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["updates"] == 3 for r in rows[1:])


@pytest.mark.parametrize("strategy", ["fedavg", "fcmoe"])
def test_a_run_with_a_trained_router_resumes_with_units_in_layout_order(tmp_path, strategy):
    """The demos train the router, so every layer has a shared unit ("L0.shared"), which the layout
    lists before the experts and a checkpoint file alphabetically after them: a resumed run must still
    stream the global model in layout order (silos decode it in that order and refuse any other)."""
    from aggregator.server import build_coordinator

    data = smoke_config(tmp_path, min_silos=3, rounds=1, strategy={"name": strategy}).model_dump(mode="json")
    data["model"]["trainable"] = {"mode": "lora", "lora_rank": 4, "lora_alpha": 8, "router": True}
    config = parse_config(data)
    ensure_pki(config.aggregator.pki_dir, ["silo0", "silo1", "silo2"])
    first = build_coordinator(config)  # a new run: its round-0 checkpoint is on disk, the run unfinished
    units = list(first.unit_sizes)
    assert units[0] == "L0.shared" and sorted(units) != units
    resumed = build_coordinator(config)  # what a restarted aggregator builds
    assert resumed.run_id == first.run_id and list(resumed.global_units) == units
    silos = []
    for i in range(3):
        silo = silo_config(config, f"silo{i}", 0, i, 3).model_dump(mode="json")
        silo["silo"]["sketch_key"] = "cd" * 32
        silos.append(parse_config(silo))
    from fcmoe.launch.inprocess import InProcessTransport

    agents = [SiloAgent(c, transport=InProcessTransport(resumed, c.silo.name)) for c in silos]
    for agent in agents:
        agent.join()
    done: set[str] = set()
    while len(done) < len(agents):  # silos download the resumed global model, train and upload
        resumed.step()
        for agent in agents:
            if agent.silo.name not in done and agent.handle(agent.client.get_task(agent.run_id, wait_s=0.0)) == 0:
                done.add(agent.silo.name)
    assert resumed.machine.succeeded and resumed.metrics.rows()[1]["updates"] == 3
