"""silo_agent/round_mode.py: a silo answers every mode's tasks through one interface; mode none sends
``coefficient * delta`` and its weighted sketches; a task of a phase the attempt's mode has not is
refused in one line, and the agent then stays out of that round instead of answering it."""

from __future__ import annotations

import typing

import numpy as np
import pytest
from conftest import TaskDriver, silo_config, smoke_config

from crypto.pki import ensure_pki
from crypto.secagg import SecAggError
from fcmoe.config import SecureAggregationConfig
from protos import fcmoe_pb2 as pb
from silo_agent.agent import ROUND_MODES, SiloAgent
from silo_agent.ckks_round import CkksSession
from silo_agent.masked_round import MaskingSession
from silo_agent.round_mode import PlainRound, RunKeys

K = pb.Task.Kind


def test_every_configurable_mode_has_a_silo_side_and_says_its_name():
    modes = typing.get_args(SecureAggregationConfig.model_fields["mode"].annotation)
    assert set(ROUND_MODES) == set(modes)
    assert all(cls.mode == name for name, cls in ROUND_MODES.items())


def test_mode_none_sends_the_weighted_delta_and_the_weighted_sketches():
    mode = PlainRound(session=7)
    assert mode.advert() is None and mode.kept(RunKeys(b"s")) == RunKeys(b"s")
    instructions = pb.UploadInstructions(units=["u", "v"], coefficients=[0.5, 2.0])
    deltas = {"u": np.array([1.0, -2.0], np.float32), "v": np.array([3.0], np.float32)}
    payload = mode.update_payload(instructions, deltas)
    np.testing.assert_array_equal(payload["u"], [0.5, -1.0])
    np.testing.assert_array_equal(payload["v"], [6.0])
    assert mode.open_sketch_stage(instructions) is None  # plaintext sketches use the configured key
    weighted = {"u": np.array([0.25, 1.5], np.float64)}
    sent = mode.sketch_payload({"u": np.ones(2, np.float32)}, weighted)
    assert sent["u"].dtype == np.float32 and sent["u"].tolist() == [0.25, 1.5]


@pytest.mark.parametrize("make, refused", [
    (lambda pki: PlainRound(1), ["share phase", "consistency check", "unmask", "decryption"]),
    (lambda pki: MaskingSession("run", 1, "silo0", pki.directory, 2), ["decryption"]),
    (lambda pki: CkksSession("run", 1, "silo0", pki.directory, 2), ["sketch stage", "consistency check", "unmask"]),
])
def test_a_phase_the_mode_has_not_is_refused_in_one_line(pki, make, refused):
    mode = make(pki)
    calls = {"share phase": lambda: mode.make_shares(pb.ShareInstructions()),
             "sketch stage": lambda: mode.open_sketch_stage(pb.UploadInstructions(stage="sketch")),
             "consistency check": lambda: mode.sign_view(pb.CheckInstructions()),
             "unmask": lambda: mode.reveal(pb.UnmaskInstructions()),
             "decryption": lambda: mode.sum_specs(pb.DecryptInstructions())}
    for what in refused:
        with pytest.raises(SecAggError, match=f"^no {what} in mode {mode.mode}$"):
            calls[what]()


def test_attack_a_decrypt_task_sent_to_a_masking_silo_gets_nothing_and_it_leaves_the_round(
        tmp_path, aggregator_factory, caplog):
    """The aggregator hands a silo of a masked round the task of another mode (it would have the silo
    decrypt what it names): the silo answers nothing, leaves the attempt and sends nothing more in it."""
    config = smoke_config(tmp_path, rounds=1, secure_aggregation={"mode": "masking"})
    names = ["silo0", "silo1", "silo2"]
    ensure_pki(config.aggregator.pki_dir, names)
    agg = aggregator_factory(config)
    driver = TaskDriver([SiloAgent(silo_config(config, n, agg.port, i)) for i, n in enumerate(names)])
    try:
        driver.run_until(K.UPLOAD, 1)  # every silo trained, reported and shared; uploads are open
        victim = driver.agents[0]
        session = victim.secure.session
        sent: list[str] = []
        victim.client.submit = lambda *a, **k: sent.append("submit")
        victim.client.download = lambda *a, **k: sent.append("download")
        victim.handle(pb.Task(kind=K.DECRYPT, round=1, decrypt=pb.DecryptInstructions(
            sums=[pb.EncryptedSum(unit=next(iter(victim.specs)), group=0, length=8, chunk_bytes=[64])])))
        assert victim.secure is None and victim.pending is None and victim.refused_session == session
        assert any("no decryption in mode masking" in r.getMessage() for r in caplog.records)
        victim.handle(victim.client.get_task(victim.run_id, wait_s=0.5))  # its UPLOAD task: waited out
        assert sent == []
    finally:
        driver.close()
