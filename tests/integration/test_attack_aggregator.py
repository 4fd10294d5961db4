"""What a curious aggregator holds after a real masked FC-MoE run, and attacks through the real round code.

The end-to-end test runs 5 silo agents against the aggregator over gRPC and mutual TLS; a hook in the
test writes every message and array the aggregator's coordinator receives to a file, and the test
then plays the aggregator that reads that file looking for any silo's delta or sketch.
"""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

from aggregator.accumulate import PlaintextAccumulator, Coefficients
from aggregator.coordinator import Coordinator
from aggregator.masked_round import MaskedRound
from crypto.pki import ensure_pki
from fcmoe.config import FCMOE_SKETCH_VARIANT, parse_config
from fcmoe.errors import ProtocolError
from conftest import TaskDriver, silo_config, smoke_config

pytestmark = [pytest.mark.tls]

SILOS = [f"silo{i}" for i in range(5)]


def _signed(words: np.ndarray) -> np.ndarray:
    """Masked words read as the signed integers a fixed-point sum lives in (the attacker's best view)."""
    return words.view(np.int32 if words.dtype == np.uint32 else np.int64).astype(np.float64)


def test_attack_the_aggregators_entire_input_reveals_no_silo_delta_or_sketch(tmp_path, aggregator_factory,
                                                                              monkeypatch):
    from silo_agent.agent import SiloAgent

    config = smoke_config(tmp_path, strategy={"name": "fcmoe", "fcmoe": {**FCMOE_SKETCH_VARIANT, "sketch_buckets": 16384}},
                          min_silos=5, rounds=1, secure_aggregation={"mode": "masking"})
    data = config.model_dump(mode="json")
    data["model"]["trainable"] = {"mode": "full"}  # ~200k trainable numbers: correlations resolve to < 0.01
    data["model"]["builtin"].update({"hidden_size": 64, "intermediate_size": 128})
    config = parse_config(data)
    ensure_pki(config.aggregator.pki_dir, SILOS)
    log_dir = tmp_path / "aggregator-input"
    log_dir.mkdir()
    received: list[tuple[str, str, str]] = []  # (what, silo, file)
    lock = threading.Lock()

    def record(what: str, silo: str, arrays: dict[str, np.ndarray] | None = None, message=None) -> None:
        with lock:
            path = log_dir / f"{len(received):04d}-{what}-{silo}"
            if arrays is not None:
                np.savez(path.with_suffix(".npz"), **{k.replace(".", "_"): v for k, v in arrays.items()})
                received.append((what, silo, str(path.with_suffix(".npz"))))
            else:
                path.with_suffix(".pb").write_bytes(message.SerializeToString())
                received.append((what, silo, str(path.with_suffix(".pb"))))

    def hook(name: str):
        original = getattr(Coordinator, name)

        def logged(self, silo, message, *rest):
            if name == "add_update":
                record(f"stream-{message.stage}", silo, dict(rest[0]))
            else:
                record(name, silo, message=message)
            return original(self, silo, message, *rest)
        monkeypatch.setattr(Coordinator, name, logged)

    for name in ("add_report", "add_update", "add_shares", "add_check", "add_unmask", "add_agreement"):
        hook(name)
    sums: list = []
    result = MaskedRound.result

    def kept(self):
        out = result(self)
        sums.append((self.stage, out, self.plan))
        return out
    monkeypatch.setattr(MaskedRound, "result", kept)

    agg = aggregator_factory(config)
    agents = [SiloAgent(silo_config(config, s, agg.port, index=i, num_silos=5)) for i, s in enumerate(SILOS)]
    driver = TaskDriver(agents)  # the silos take turns in one thread (PEFT's experts are not thread-safe)
    try:
        driver.finish(timeout_s=300)
    finally:
        driver.close()
    assert driver.statuses == {s: 0 for s in SILOS} and agg.coordinator.machine.succeeded

    # what the aggregator decoded: two stages, each sum over >= 3 silos, no member under 0.1 of the largest
    assert [stage for stage, _, _ in sums] == ["sketch", "update"]
    for _, out, plan in sums:
        for unit, groups in out.items():
            for group, total in groups.items():
                members = [s for s in SILOS if plan.group[s][unit] == group]
                alphas = [plan.alpha[s][unit] for s in members]
                assert total.count >= 3 and min(alphas) >= 0.1 * max(alphas) * (1 - 1e-9)

    # every array the aggregator received, against every silo's delta and weighted sketch
    secrets = {a.silo.name: {"update": a.state.trained.deltas, "sketch": a.state.weighted_sketches} for a in agents}
    kinds = {what for what, _, _ in received}
    assert {"stream-sketch", "stream-update", "add_report", "add_check", "add_unmask", "add_agreement"} <= kinds
    checked = coincidences = compared = 0
    for what, sender, path in received:
        if not what.startswith("stream-"):
            continue
        stage = what.removeprefix("stream-")
        with np.load(path) as held:
            arrays = {k: held[k] for k in held.files}
        words = np.concatenate([_signed(arrays[k]) for k in sorted(arrays)])
        for silo, vectors in secrets.items():
            target = np.concatenate([np.asarray(vectors[stage][k.replace("_", ".")], np.float64).ravel()
                                     for k in sorted(arrays)])
            assert words.size == target.size > 100_000
            r = np.corrcoef(words, target)[0, 1]
            assert abs(r) < 0.01, (what, sender, silo, r)
            # nor does any received word carry a coordinate as it is: its float32 bits at the same place
            raw = np.concatenate([arrays[k].view(np.float32 if arrays[k].dtype == np.uint32 else np.float64)
                                  .astype(np.float32) for k in sorted(arrays)])
            coincidences += int(np.count_nonzero((raw == target.astype(np.float32)) & (target != 0)))
            compared += raw.size
            checked += 1
    assert checked == 2 * 5 * 5  # two stages x five uploads x five silos
    # A uniform 32-bit word equals a given float32's bits with chance 2**-32, so ~6.5M comparisons expect
    # ~0.0015 coincidences (P(>= 3) ~ 5e-10); a word that carried its coordinate would give ~10**5.
    assert coincidences <= 2, (coincidences, compared)
    # reports carry no sketch; agreements are scalars in [-1, 1]
    from protos import fcmoe_pb2 as pb
    for what, _, path in received:
        if what == "add_report":
            report = pb.RoundReport.FromString(open(path, "rb").read())
            assert not len(report.sketches)
        if what == "add_agreement":
            agreement = pb.AgreementSubmission.FromString(open(path, "rb").read())
            assert all(-1 <= z <= 1 for z in agreement.agreement)


def test_attack_an_unclipped_update_is_refused_in_mode_none():
    """Poisoning: the default clip is on in every mode, and the plaintext accumulator refuses a payload
    over alpha * C (a 1e30-norm update used to be accepted)."""
    config = parse_config({"run": {"name": "x"}, "model": {"source": "builtin"}})
    assert config.federation.local.clip_norm > 0
    plan = Coefficients({s: {"u": 1.0} for s in SILOS[:3]}, {s: {"u": 0} for s in SILOS[:3]})
    acc = PlaintextAccumulator({"u": 4}, plan, config.federation.local.clip_norm)
    acc.add("silo0", {"u": np.full(4, 0.1, np.float32)})
    with pytest.raises(ProtocolError, match="exceeds alpha \\* clip_norm"):
        acc.add("silo1", {"u": np.full(4, 1e30, np.float32)})


@pytest.mark.parametrize("dp", [False, True])
def test_attack_a_round_redone_after_its_unmask_gets_fresh_updates(tmp_path, monkeypatch, dp):
    """The aggregator decodes the update sums, claims the round failed and redoes it (without one silo,
    to read that silo's update from the difference of the two sums). Silos whose contribution was in an
    unmasked sum train afresh for the redo instead of resending: the difference is two different
    trainings, never one silo's update. Under DP the fresh training is a second release, in the ledger."""
    from fcmoe.launch.audit import audit
    from fcmoe.launch.inprocess import run_in_process
    from silo_agent.masked_round import MaskingSession

    config = smoke_config(tmp_path, min_silos=3, rounds=1, min_group_size=3, strategy={"name": "fedavg"},
                          secure_aggregation={"mode": "masking"})
    ensure_pki(config.aggregator.pki_dir, SILOS[:3])
    silos = []
    for i, name in enumerate(SILOS[:3]):
        data = silo_config(config, name, 0, index=i, num_silos=3).model_dump(mode="json")
        if dp:
            data["silo"]["dp"] = {"enabled": True, "noise_multiplier": 1.0, "epsilon_budget": 100.0,
                                  "ledger": str(tmp_path / "ledgers" / f"{name}.jsonl")}
        silos.append(parse_config(data))
    masked: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    mask = MaskingSession.mask

    def spy(self, view, vectors):
        if view.stage == "update":
            masked[(self.silo, self.session & 0xFFFF)] = {u: np.array(v) for u, v in vectors.items()}
        return mask(self, view, vectors)
    monkeypatch.setattr(MaskingSession, "mask", spy)
    close = Coordinator._close_round
    failed = []

    def claim_failure(self, sums, contributors):
        if not failed:  # the sums are decoded; the malicious aggregator now says the round failed
            failed.append(sums)
            raise ProtocolError("claimed failure after unmasking")
        return close(self, sums, contributors)
    monkeypatch.setattr(Coordinator, "_close_round", claim_failure)
    coord = run_in_process(config, silos)
    assert failed and coord.machine.succeeded
    for i, silo in enumerate(SILOS[:3]):
        first, redo = masked[(silo, 0)], masked[(silo, 1)]
        assert any(not np.array_equal(first[u], redo[u]) for u in first), silo  # trained afresh
        if dp:  # both trainings are releases of round 1, both in the ledger (and in its epsilon)
            rows = audit(silos[i].silo.dp.ledger, (config.aggregator.pki_dir / f"silo-{silo}.pem").read_bytes())
            assert [r.round for r in rows] == [1, 1]


def test_attack_a_silo_inflating_its_sample_count_is_left_out(tmp_path, monkeypatch):
    """A silo reporting 1e9 training examples would take all of FedAvg's weight: over 10x the round's
    median (no operator cap set), its report is left out of the round with one log line."""
    from fcmoe.launch.inprocess import run_in_process
    from silo_agent.agent import SiloAgent

    config = smoke_config(tmp_path, min_silos=4, quorum=3, rounds=1, min_group_size=3, strategy={"name": "fedavg"},
                          secure_aggregation={"mode": "masking"})
    ensure_pki(config.aggregator.pki_dir, SILOS[:4])
    silos = [silo_config(config, s, 0, index=i, num_silos=4) for i, s in enumerate(SILOS[:4])]
    train = SiloAgent._train

    def inflated(self, task, *rest):
        trained = train(self, task, *rest)
        if self.silo.name == "silo3" and trained is not None:
            trained.report.num_examples = 1e9
        return trained
    monkeypatch.setattr(SiloAgent, "_train", inflated)
    refused: list[str] = []
    import aggregator.coordinator as coordinator_module
    log_event = coordinator_module.log_event

    def spy(logger, event, **fields):
        if event == "report_refused":
            refused.append(fields["silo"] + ": " + fields["reason"])
        return log_event(logger, event, **fields)
    monkeypatch.setattr(coordinator_module, "log_event", spy)
    coord = run_in_process(config, silos)
    assert coord.machine.succeeded
    assert len(refused) == 1 and refused[0].startswith("silo3: num_examples 1e+09 is over 10x the round's median")
    assert coord.metrics.rows()[1]["updates"] == 3


@pytest.mark.parametrize("field,value,reason", [
    ("routing_share", 1e6, "routing share 1e+06 of unit L0.E0 outside [0, 1]"),
    ("routing_share", 0.9, "routing shares of layer 0 sum to 1.8, over 1"),
    ("reliability", 7.0, "reliability 7 outside [0, 1]"),
    ("num_examples", 1e9, "num_examples 1e+09 outside (0, 1000]"),
    ("num_examples", -1.0, "num_examples -1 outside (0, 1000]"),
])
def test_attack_reports_that_steer_the_weights_are_refused(tmp_path, field, value, reason):
    """A silo's report numbers set its weight: each is held to what an honest silo can report, and a
    refused report says why in one line (operator cap ``aggregator.max_examples`` set here)."""
    from aggregator.strategies import build_strategy
    from protos import fcmoe_pb2 as pb

    data = smoke_config(tmp_path).model_dump(mode="json")
    data["aggregator"]["max_examples"] = 1000
    config = parse_config(data)
    units = {"L0.E0": 4, "L0.E1": 4, "L0.shared": 4}
    coord = Coordinator(config, "h", "f", units, {u: np.zeros(4, np.float32) for u in units},
                        build_strategy(config.federation.strategy), tmp_path / "out")
    for s in SILOS[:3]:
        coord.join(s, pb.JoinRequest(layout_hash="h", base_fingerprint="f"))
    coord.step()
    honest = dict(run_id=coord.run_id, round=1, layout_hash="h", num_examples=10.0, reliability=0.5,
                  units=list(units), routing_share=[0.5, 0.5, 1.0])
    forged = dict(honest)
    forged[field] = [value, value, 1.0] if field == "routing_share" else value
    with pytest.raises(ProtocolError, match=re.escape(f"report refused: {reason}")):
        coord.add_report("silo0", pb.RoundReport(**forged))
    coord.add_report("silo0", pb.RoundReport(**honest))  # the same silo, honest: accepted
