"""10,000+ malformed messages to every RPC over real mutual TLS, while honest silo processes finish a
masked run beside them: each is refused with a clear status, the server keeps serving, memory stays bounded."""

from __future__ import annotations

import pytest
import os
import random
import subprocess
import sys

import grpc
from conftest import ROOT, silo_config, smoke_config

from crypto.pki import ensure_pki
from crypto.tls import channel_credentials
from fcmoe.config import dump_config
from protos import fcmoe_pb2 as pb

pytestmark = [pytest.mark.subprocess, pytest.mark.tls, pytest.mark.slow]

MESSAGES = 10_000
SERVICE = "/fcmoe.v1.Federation/"
UNARY = {"Join": pb.JoinRequest, "GetTask": pb.TaskRequest, "SubmitReport": pb.RoundReport,
         "ReportEvaluation": pb.EvalReport, "SubmitShares": pb.ShareSubmission, "SubmitUnmask": pb.UnmaskSubmission,
         "DeclineRound": pb.DeclineRequest, "UploadStatus": pb.UpdateHeader}
# what gRPC itself answers when bytes do not parse as the request type (before any handler runs)
GRPC_PARSE_FAILURE = "Exception deserializing request"


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _message(rng: random.Random, kind: type, run_id: str, layout: str, units: list[str]):
    """A message of ``kind`` that is valid on the wire but wrong: random or real ids, odd numbers."""
    rid = rng.choice([run_id, "", "x" * rng.randint(1, 300), run_id[:-1] + "z"])
    lay = rng.choice([layout, "", "0" * 64])
    rnd = rng.choice([0, 1, 2, 7, 2**32 - 1])
    num = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e300, 0.5])
    if kind is pb.JoinRequest:
        return pb.JoinRequest(layout_hash=lay, base_fingerprint="f" * rng.randint(0, 100), num_train_examples=rnd)
    if kind is pb.TaskRequest:
        return pb.TaskRequest(run_id=rid, wait_s=rng.choice([0.0, -5.0, float("nan")]))
    if kind is pb.RoundReport:
        return pb.RoundReport(run_id=rid, round=rnd, layout_hash=lay, num_examples=num, reliability=num,
                              units=rng.sample(units, rng.randint(0, len(units))),
                              routing_share=[num] * rng.randint(0, len(units) + 2),
                              advert=pb.KeyAdvert(silo="silo0", session=rnd, mask_public=os.urandom(32),
                                                  channel_public=os.urandom(rng.choice([0, 31, 32])),
                                                  signature=os.urandom(64), certificate_pem=os.urandom(100)))
    if kind is pb.EvalReport:
        return pb.EvalReport(run_id=rid, round=rnd, layout_hash=lay, evaluation=pb.Evaluation(
            global_model=[pb.DomainLoss(domain="d" * rng.randint(0, 80), loss_sum=num, tokens=rnd % 5)]))
    if kind is pb.ShareSubmission:
        share = pb.SealedShare(sender=rng.choice(["silo0", "silo3"]), recipient="silo1", ciphertext=os.urandom(160))
        return pb.ShareSubmission(run_id=rid, round=rnd, shares=[share] * rng.randint(0, 5), secrets=[share])
    if kind is pb.UnmaskSubmission:
        return pb.UnmaskSubmission(run_id=rid, round=rnd, shares=[
            pb.RevealedShare(owner=rng.choice(["silo0", "silo9"]), mask_key=rng.random() < 0.5, share=os.urandom(68))])
    if kind is pb.UpdateHeader:
        return pb.UpdateHeader(run_id=rid, round=rnd, layout_hash=lay, units=rng.sample(units, rng.randint(0, len(units))),
                               payload_sha256=os.urandom(rng.choice([0, 32])), resume_chunks=rng.choice([0, 1, 2**40]))
    return pb.DeclineRequest(run_id=rid, round=rnd, reason="r" * rng.randint(0, 2000))


def _mutated(rng: random.Random, raw: bytes) -> bytes:
    choice = rng.random()
    if choice < 0.3:
        return os.urandom(rng.randint(0, 2000))  # random bytes
    if choice < 0.5 and raw:
        return raw[: rng.randint(0, len(raw) - 1)]  # truncated
    if choice < 0.7 and raw:
        data = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)  # flipped bytes
        return bytes(data)
    return raw  # well-formed but wrong


def _update_stream(rng: random.Random, run_id: str, layout: str, units: list[str]) -> list[bytes]:
    header = pb.UpdateMessage(header=pb.UpdateHeader(run_id=run_id, round=rng.choice([1, 2, 9]), layout_hash=layout,
                                                     units=units, sizes=[rng.randint(0, 10**9)],
                                                     payload_sha256=os.urandom(rng.choice([0, 32])),
                                                     resume_chunks=rng.choice([0, 0, 3])))
    chunk = pb.UpdateMessage(chunk=pb.TensorChunk(name=rng.choice(units), dtype=rng.choice(["float32", "uint8", "x"]),
                                                  shape=[rng.randint(-5, 10**6)], total_bytes=rng.randint(0, 10**7),
                                                  sha256=os.urandom(rng.choice([0, 32])), offset=rng.randint(0, 99),
                                                  data=os.urandom(rng.randint(0, 4096))))
    messages = [header.SerializeToString(), chunk.SerializeToString()]
    return [_mutated(rng, m) for m in messages[: rng.randint(0, 2)]] + [chunk.SerializeToString()] * rng.randint(0, 3)


def _check(err: grpc.RpcError, rpc: str) -> str:
    code, details = err.code(), err.details() or ""
    assert details, f"{rpc}: refused without a reason ({code})"
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        assert GRPC_PARSE_FAILURE in details, f"{rpc}: {code} {details}"
    return code.name


def test_every_rpc_refuses_malformed_messages_while_honest_silos_finish(tmp_path, aggregator_factory):
    names = ["silo0", "silo1", "silo2", "fuzzer"]
    config = smoke_config(tmp_path, min_silos=3, rounds=2, min_group_size=2,
                          secure_aggregation={"mode": "masking"})
    pki = ensure_pki(config.aggregator.pki_dir, names)
    agg = aggregator_factory(config)
    coord = agg.coordinator
    procs = []
    try:
        for i in range(3):
            path = tmp_path / f"silo{i}.yaml"
            dump_config(silo_config(config, f"silo{i}", agg.port, index=i, num_silos=3), path)
            procs.append(subprocess.Popen([sys.executable, "-m", "fcmoe", "silo", str(path), "--no-progress"],
                                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          env=dict(os.environ, OMP_NUM_THREADS="1")))
        creds = channel_credentials(pki.ca_cert, pki.silo_cert("fuzzer"), pki.silo_key("fuzzer"))
        channel = grpc.secure_channel(f"127.0.0.1:{agg.port}", creds)
        rng = random.Random(1234)
        units = list(coord.unit_sizes)
        codes: dict[str, int] = {}
        rss_before = _rss_bytes()
        for n in range(MESSAGES):
            roll = rng.random()
            if roll < 0.1:
                call = channel.stream_unary(SERVICE + "SubmitUpdate")
                rpc, send = "SubmitUpdate", lambda: call(iter(_update_stream(rng, coord.run_id, coord.layout_hash,
                                                                                  units)), timeout=10)
            elif roll < 0.2:
                raw = pb.DownloadRequest(run_id=coord.run_id, round=rng.choice([0, 1, 5]), layout_hash=coord.layout_hash,
                                         encrypted_sums=rng.random() < 0.5).SerializeToString()
                call = channel.unary_stream(SERVICE + "DownloadGlobal")
                rpc, send = "DownloadGlobal", lambda: list(call(_mutated(rng, raw), timeout=10))
            else:
                rpc = rng.choice(sorted(UNARY))
                raw = _message(rng, UNARY[rpc], coord.run_id, coord.layout_hash, units).SerializeToString()
                call = channel.unary_unary(SERVICE + rpc)
                send = lambda: call(_mutated(rng, raw), timeout=10)  # noqa: E731
            try:
                reply = send()
            except grpc.RpcError as err:
                key = f"{rpc}:{_check(err, rpc)}"
                codes[key] = codes.get(key, 0) + 1
                continue
            # the only answers a non-participant may get: a task telling it to (re)join or wait, or an empty stream
            if rpc == "GetTask":
                assert pb.Task.FromString(reply).kind in (pb.Task.JOIN, pb.Task.WAIT, pb.Task.DONE), n
            else:
                assert rpc == "DownloadGlobal" and reply == [], (n, rpc)
            codes[f"{rpc}:OK"] = codes.get(f"{rpc}:OK", 0) + 1
        growth = _rss_bytes() - rss_before
        channel.close()
        for proc in procs:
            assert proc.wait(timeout=300) == 0
        assert coord.machine.succeeded and coord.metrics.rows()[-1]["updates"] == 3
        assert sum(codes.values()) == MESSAGES and len({k.split(":")[0] for k in codes}) == len(UNARY) + 2
        assert growth < 300 * 1024 * 1024, f"memory grew by {growth >> 20} MiB"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
