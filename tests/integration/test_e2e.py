"""End to end over real gRPC + mutual TLS on loopback, with real tiny HF MoE models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ROOT, SMOKE, silo_config, smoke_config

from crypto.pki import PkiPaths, ensure_pki
from crypto.tls import channel_credentials, parse_handshake_failure
from fcmoe.config import FCMOE_SKETCH_VARIANT, dump_config, load_config
from protos import codec
from protos import fcmoe_pb2 as pb
from protos import fcmoe_pb2_grpc as pb_grpc
from silo_agent.agent import SiloAgent

pytestmark = [pytest.mark.subprocess, pytest.mark.tls, pytest.mark.slow]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("GRPC_VERBOSITY", None)  # gRPC core then logs refused TLS handshakes on stderr
    return env


@pytest.mark.parametrize("strategy,mode", [pytest.param("fedavg", "none", marks=pytest.mark.ci_only),
                                           pytest.param("fcmoe_sketch", "none", marks=pytest.mark.ci_only),
                                           ("fcmoe_sketch", "masking"), ("fcmoe", "masking"), ("fedavg", "ckks")])
def test_simulate_three_silos_two_rounds(tmp_path, strategy, mode):
    data = load_config(SMOKE).model_dump(mode="json")
    out = tmp_path / "run"
    data["run"]["output_dir"] = str(out)
    data["federation"]["strategy"] = ({"name": "fcmoe", "fcmoe": FCMOE_SKETCH_VARIANT} if strategy == "fcmoe_sketch"
                                      else {"name": strategy})
    data["federation"]["secure_aggregation"] = {"mode": mode}
    cfg = tmp_path / "smoke.yaml"
    from fcmoe.config import parse_config

    dump_config(parse_config(data), cfg)
    proc = subprocess.run([sys.executable, "-m", "fcmoe", "simulate", str(cfg), "--no-progress"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(mean)" in proc.stdout and "report:" in proc.stdout

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    domains = ["copy", "shift_down", "shift_up"]
    for d in domains:
        assert rows[2][f"global_loss/{d}"] < rows[0][f"global_loss/{d}"]
    for r in rows[1:]:
        assert r["updates"] == 3 and set(r["silos"]) == {"silo0", "silo1", "silo2"}
        assert r["local_loss"] is not None and 0 <= r["overhead"] < 1
    assert (out / "checkpoints" / "latest").read_text().strip() == "round-0002"
    assert (out / "checkpoints" / "round-0002" / "global.safetensors").exists()
    assert (out / "loss.png").stat().st_size > 1000 and (out / "metrics.csv").exists()
    assert {p.name for p in (out / "roles").iterdir()} == {"aggregator.yaml", "silo0.yaml", "silo1.yaml", "silo2.yaml"}
    agg_log = (out / "logs" / "aggregator.log").read_text()
    assert agg_log.count("event=round_closed") == 2 and agg_log.count("event=update_accepted") == 6
    assert agg_log.count("event=report_accepted") == 6
    secure_events = {e: agg_log.count(f"event={e}") for e in ("shares_accepted", "unmask_shares_accepted",
                                                               "consistency_signature_accepted", "decryption_accepted",
                                                               "sketch_accepted", "agreement_accepted")}
    sketch = 6 if strategy == "fcmoe_sketch" and mode != "ckks" else 0  # the sketch stage (not in mode ckks)
    stages = 1 + (sketch > 0)  # masking: each stage is checked and unmasked
    assert secure_events == {
        "none": {"shares_accepted": 0, "unmask_shares_accepted": 0, "consistency_signature_accepted": 0,
                 "decryption_accepted": 0, "sketch_accepted": sketch, "agreement_accepted": sketch},
        "masking": {"shares_accepted": 6, "unmask_shares_accepted": 6 * stages,
                    "consistency_signature_accepted": 6 * stages, "decryption_accepted": 0,
                    "sketch_accepted": sketch, "agreement_accepted": sketch},
        "ckks": {"shares_accepted": 6, "unmask_shares_accepted": 0, "consistency_signature_accepted": 0,
                 "decryption_accepted": 2, "sketch_accepted": 0, "agreement_accepted": 0},
    }[mode]
    aggregator_role = (out / "roles" / "aggregator.yaml").read_text()
    assert "sketch_key" not in aggregator_role  # the silos' shared secret never reaches the aggregator
    assert all("sketch_key" in (out / "roles" / f"silo{i}.yaml").read_text() for i in range(3))


# -- protocol refusals against a live in-process aggregator ---------------------------------------

def _stub(pki: PkiPaths, port: int, name: str = "silo0"):
    creds = channel_credentials(pki.ca_cert, pki.silo_cert(name), pki.silo_key(name))
    channel = grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[
        ("grpc.max_send_message_length", 16 * 1024 * 1024), ("grpc.max_receive_message_length", 16 * 1024 * 1024)])
    return channel, pb_grpc.FederationStub(channel)


def _submit(stub, header, chunks):
    msgs = [pb.UpdateMessage(header=header)] + [pb.UpdateMessage(chunk=c) for c in chunks]
    return _refused(lambda: stub.SubmitUpdate(iter(msgs), timeout=30))


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value


def test_bad_messages_refused_and_server_keeps_serving(tmp_path, pki, aggregator_factory):
    """A raw client (silo1) sends bad messages in every phase; an honest silo0 runs beside it."""
    config = smoke_config(tmp_path, min_silos=2, quorum=2, rounds=1)
    agg = aggregator_factory(config)
    coord = agg.coordinator
    channel, stub = _stub(pki, agg.port, "silo1")
    err = _refused(lambda: stub.Join(pb.JoinRequest(layout_hash="0" * 32, base_fingerprint=coord.base_fingerprint),
                                     timeout=10))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "layout hash" in err.details()
    run_id = stub.Join(pb.JoinRequest(layout_hash=coord.layout_hash, base_fingerprint=coord.base_fingerprint),
                       timeout=10).run_id

    agent = SiloAgent(silo_config(config, "silo0", agg.port, index=0, num_silos=3))
    outcome: list[int] = []
    honest = threading.Thread(target=lambda: outcome.append(agent.run()), daemon=True)
    honest.start()

    task = stub.GetTask(pb.TaskRequest(run_id=run_id, wait_s=20), timeout=40)
    assert task.kind == pb.Task.TRAIN and task.round == 1
    # another run's id: told to join this run (what a silo of an earlier run needs), given nothing else
    other = stub.GetTask(pb.TaskRequest(run_id="forged", wait_s=0), timeout=10)
    assert other.kind == pb.Task.JOIN and not other.HasField("train") and "join again" in other.message

    units = list(coord.unit_sizes)

    def report(**change):
        fields = dict(run_id=run_id, round=1, layout_hash=coord.layout_hash, num_examples=10.0, reliability=0.5,
                      units=units, routing_share=[1.0 if u.endswith("shared") else 0.1 for u in units])
        fields.update(change)
        return pb.RoundReport(**fields)

    for bad, status, words in [
        (report(num_examples=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
        (report(routing_share=[1.0]), grpc.StatusCode.INVALID_ARGUMENT, "routing shares"),
        (report(round=2), grpc.StatusCode.FAILED_PRECONDITION, "round 2"),
        (report(evaluation=pb.Evaluation(global_model=[pb.DomainLoss(domain="d", loss_sum=float("nan"), tokens=3)])),
         grpc.StatusCode.INVALID_ARGUMENT, "bad entry"),
        (report(evaluation=pb.Evaluation(local_model=[pb.DomainLoss(domain=str(i), loss_sum=1.0, tokens=1)
                                                      for i in range(300)])),
         grpc.StatusCode.INVALID_ARGUMENT, "at most 256"),
        (report(sketches=list(codec.encode({units[0]: np.ones(4, np.float32)}))), grpc.StatusCode.INVALID_ARGUMENT,
         "sketches never travel in a report"),
        # reports that would steer the weights (docs/threat-model.md, attacks)
        (report(routing_share=[1e6] * len(units)), grpc.StatusCode.INVALID_ARGUMENT, "outside [0, 1]"),
        (report(routing_share=[1.0] * len(units)), grpc.StatusCode.INVALID_ARGUMENT, "sum to"),
        (report(reliability=7.0), grpc.StatusCode.INVALID_ARGUMENT, "reliability 7 outside [0, 1]"),
        (report(privacy=pb.PrivacySpent(epsilon=float("nan"), epsilon_budget=8.0, delta=1e-5)),
         grpc.StatusCode.INVALID_ARGUMENT, "report.privacy"),
    ]:
        err = _refused(lambda: stub.SubmitReport(bad, timeout=10))
        assert err.code() == status and words in err.details(), err.details()
    refused = {(r["rpc"], r["code"]): r["count"] for r in coord.status()["refused"]}  # the status endpoint's count
    assert refused[("SubmitReport", "INVALID_ARGUMENT")] == 9 and refused[("SubmitReport", "FAILED_PRECONDITION")] == 1
    stub.SubmitReport(report(), timeout=10)
    err = _refused(lambda: stub.SubmitReport(report(), timeout=10))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS

    task = stub.GetTask(pb.TaskRequest(run_id=run_id, wait_s=25), timeout=40)
    assert task.kind == pb.Task.UPLOAD and list(task.upload.units) == units

    header = pb.UpdateHeader(run_id=run_id, round=1, layout_hash=coord.layout_hash, units=units)
    payload = {k: np.zeros(n, np.float32) for k, n in coord.unit_sizes.items()}
    good = list(codec.encode(payload))
    bad_digest = [pb.TensorChunk() for _ in good]
    for src, dst in zip(good, bad_digest):
        dst.CopyFrom(src)
    bad_digest[0].data = b"\x01" + bad_digest[0].data[1:]
    wrong_shape = list(codec.encode({units[0]: np.zeros(coord.unit_sizes[units[0]] + 1, np.float32)}))
    huge = pb.TensorChunk(name=units[0], dtype="float32", shape=[1 << 21], total_bytes=1 << 23,
                          sha256=b"0" * 32, offset=0, data=bytes(5 * 1024 * 1024))
    nan = dict(payload)
    nan[units[0]] = np.full(coord.unit_sizes[units[0]], np.nan, np.float32)
    wrong_round = pb.UpdateHeader(run_id=run_id, round=7, layout_hash=coord.layout_hash, units=units)
    # a stream whose chunks are each intact but whose header names another payload (what a resumed upload
    # mixing two payloads would be): the aggregator rebuilds the payload digest from the chunks it checked
    other = {k: np.ones(n, np.float32) for k, n in coord.unit_sizes.items()}
    named_other = pb.UpdateHeader(run_id=run_id, round=1, layout_hash=coord.layout_hash, units=units,
                                  payload_sha256=codec.payload_digest(other))
    for hdr, chunks, status, words in [
        (header, bad_digest, grpc.StatusCode.INVALID_ARGUMENT, "SHA-256"),
        (header, wrong_shape, grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        (header, good[:-1], grpc.StatusCode.INVALID_ARGUMENT, "missing"),
        (header, [huge], grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        (header, list(codec.encode(nan)), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        (wrong_round, good, grpc.StatusCode.FAILED_PRECONDITION, "round 7"),
        (named_other, good, grpc.StatusCode.INVALID_ARGUMENT, "update does not match its payload_sha256"),
    ]:
        err = _submit(stub, hdr, chunks)
        assert err.code() == status and words in (err.details() or ""), err.details()
    assert coord.machine.version == 0 and "silo1" not in coord.machine.uploaded  # nothing of that counted

    msgs = [pb.UpdateMessage(header=header)] + [pb.UpdateMessage(chunk=c) for c in good]
    release = threading.Event()

    def slow():  # an honest but slow stream: a second one from the same silo must wait its turn
        yield from msgs[:2]
        release.wait(30)
        yield from msgs[2:]

    first = stub.SubmitUpdate.future(slow(), timeout=60)
    deadline = time.monotonic() + 20
    while not coord.uploads.is_open("silo1") and time.monotonic() < deadline:
        time.sleep(0.05)
    err = _submit(stub, header, good)
    # retryable: a silo whose link broke retries until this end notices and keeps the cut stream
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "still has an update stream open" in err.details()
    release.set()
    assert first.result().accepted and not coord.uploads.is_open("silo1")
    task = stub.GetTask(pb.TaskRequest(run_id=run_id, wait_s=25), timeout=40)
    assert task.kind == pb.Task.EVALUATE and task.round == 1
    stub.ReportEvaluation(pb.EvalReport(run_id=run_id, round=1, layout_hash=coord.layout_hash), timeout=10)
    channel.close()

    honest.join(timeout=60)
    assert outcome == [0]
    assert coord.machine.succeeded and coord.machine.version == 1
    rows = coord.metrics.rows()
    assert rows[-1]["round"] == 1 and rows[-1]["global_loss"] is not None and rows[-1]["updates"] == 2


def test_unknown_silo_name_refused_when_allowlist_set(tmp_path, pki, aggregator_factory):
    config = smoke_config(tmp_path, min_silos=1, quorum=1)
    data = config.model_dump(mode="json")
    data["aggregator"]["allowed_silos"] = ["silo1", "silo2"]
    from fcmoe.config import parse_config

    agg = aggregator_factory(parse_config(data))
    channel, stub = _stub(pki, agg.port, "silo0")
    with pytest.raises(grpc.RpcError) as exc:
        stub.Join(pb.JoinRequest(layout_hash=agg.coordinator.layout_hash,
                                 base_fingerprint=agg.coordinator.base_fingerprint), timeout=10)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED and "allowed_silos" in exc.value.details()
    channel.close()


# -- certificates from another CA -----------------------------------------------------------------

def test_silo_with_foreign_ca_certificate_is_refused_and_both_sides_log_why(tmp_path, pki):
    config = smoke_config(tmp_path, min_silos=1)
    data = config.model_dump(mode="json")
    data["aggregator"]["port_file"] = str(tmp_path / "port")
    from fcmoe.config import parse_config

    agg_cfg = tmp_path / "aggregator.yaml"
    dump_config(parse_config(data), agg_cfg)
    agg_log = open(tmp_path / "aggregator.log", "wb")
    aggregator = subprocess.Popen([sys.executable, "-m", "fcmoe", "aggregator", str(agg_cfg), "--no-progress"],
                                  stdout=agg_log, stderr=subprocess.STDOUT, cwd=ROOT, env=_env())
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "port").exists():
            assert aggregator.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        port = int((tmp_path / "port").read_text())
        rogue_dir = tmp_path / "rogue"
        ensure_pki(rogue_dir, ["silo0"])  # a different CA issues a certificate with a legitimate name
        shutil.copy(pki.ca_cert, rogue_dir / "ca.pem")  # the rogue silo trusts the real aggregator
        rogue = silo_config(config, "silo0", port).model_dump(mode="json")
        rogue["silo"]["pki_dir"] = str(rogue_dir)
        rogue_cfg = tmp_path / "rogue.yaml"
        dump_config(parse_config(rogue), rogue_cfg)
        silo = subprocess.run([sys.executable, "-m", "fcmoe", "silo", str(rogue_cfg), "--no-progress"],
                              capture_output=True, text=True, timeout=120, cwd=ROOT, env=_env())
        assert silo.returncode != 0
        stopped = [line for line in silo.stderr.splitlines() if "event=silo_stopped" in line]
        assert len(stopped) == 1 and "TLS setup" in stopped[0] and "does not verify against CA" in stopped[0], silo.stderr
        assert "event=rpc_retry" not in silo.stderr  # refused, not unreachable: no retrying for connect_timeout_s
        time.sleep(0.5)
        assert aggregator.poll() is None  # still serving
        lines = (tmp_path / "aggregator.log").read_text().splitlines()
        reasons = [parse_handshake_failure(line) for line in lines if parse_handshake_failure(line)]
        assert len(reasons) == 1 and "CERTIFICATE_VERIFY_FAILED" in reasons[0], lines[-5:]
    finally:
        aggregator.terminate()
        aggregator.wait(timeout=20)
        agg_log.close()


def test_simulate_stops_at_once_when_a_silo_dies(tmp_path):
    data = load_config(SMOKE).model_dump(mode="json")
    data["run"]["output_dir"] = str(tmp_path / "run")
    # present (the launcher checks that before starting anything) but unreadable as records: each silo
    # process dies on it while loading its data
    (tmp_path / "broken.jsonl").write_text("this is not JSON\n")
    data["data"] = {"builtin": None, "train_file": str(tmp_path / "broken.jsonl"),
                    "eval_file": str(tmp_path / "broken.jsonl")}
    cfg = tmp_path / "broken.yaml"
    from fcmoe.config import parse_config

    dump_config(parse_config(data), cfg)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fcmoe", "simulate", str(cfg), "--no-progress"],
                          capture_output=True, text=True, timeout=200, cwd=ROOT, env=_env())
    assert proc.returncode == 2 and time.monotonic() - start < 100  # not the 180 s join timeout
    error = [line for line in proc.stderr.splitlines() if line.startswith("fcmoe: error:")]
    assert len(error) == 1 and "exited with status" in error[0] and ".log" in error[0]
    log_name = error[0].split("see ")[-1]
    assert "broken.jsonl:1" in Path(log_name).read_text()


def test_a_second_aggregator_on_a_taken_port_stops_with_one_line_and_touches_nothing(tmp_path, pki,
                                                                                      aggregator_factory):
    """Two aggregators must never share a port (silos would be split between two runs): the second
    exits 2 with one line naming the port, before it archives or writes anything."""
    config = smoke_config(tmp_path)
    first = aggregator_factory(config)
    data = config.model_dump(mode="json")
    data["aggregator"]["port"] = first.port
    data["run"]["output_dir"] = str(tmp_path / "second")
    cfg = tmp_path / "second.yaml"
    from fcmoe.config import parse_config

    dump_config(parse_config(data), cfg)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fcmoe", "aggregator", str(cfg), "--no-progress"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=_env())
    elapsed = time.monotonic() - started
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fcmoe: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert f"aggregator.port = {first.port}: cannot listen" in errors[0]
    assert not (tmp_path / "second" / "checkpoints").exists()  # nothing written, nothing archived
    print(f"second aggregator exited after {elapsed:.2f} s")  # reported, not asserted (shared machine)
    assert first.coordinator.machine.phase.value == "waiting"  # the first one is untouched


def test_a_silo_that_does_not_trust_the_aggregators_certificate_stops_at_once(tmp_path, pki, aggregator_factory):
    """Wrong ca.pem at the silo: not a network fault, so no retrying for connect_timeout_s — one line
    naming the CA file, exit 2."""
    config = smoke_config(tmp_path)
    agg = aggregator_factory(config)
    other = ensure_pki(tmp_path / "other", ["silo0"])  # another CA: the aggregator's certificate won't verify
    confused = tmp_path / "confused"
    confused.mkdir()
    for name in ("silo-silo0.pem", "silo-silo0.key"):
        shutil.copy(pki.directory / name, confused / name)  # the silo's own (valid) identity
    shutil.copy(other.ca_cert, confused / "ca.pem")
    silo = silo_config(config, "silo0", agg.port).model_dump(mode="json")
    silo["silo"].update({"pki_dir": str(confused), "connect_timeout_s": 600})
    cfg = tmp_path / "silo.yaml"
    from fcmoe.config import parse_config

    dump_config(parse_config(silo), cfg)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fcmoe", "silo", str(cfg), "--no-progress"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())
    print(f"stopped after {time.monotonic() - started:.1f} s (connect_timeout_s 600)")
    stopped = [line for line in proc.stderr.splitlines() if "event=silo_stopped" in line]
    assert proc.returncode == 2 and len(stopped) == 1, proc.stderr[-2000:]
    assert "server certificate not trusted" in stopped[0] and str(confused / "ca.pem") in stopped[0]
    assert "event=rpc_retry" not in proc.stderr  # stopped at the first refusal
