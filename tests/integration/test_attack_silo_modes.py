"""A silo answers a round's tasks only through its attempt's mode: a task of another mode, from a real
aggregator over mutual TLS, gets nothing and the silo leaves that round."""

from __future__ import annotations

import pytest
from conftest import TaskDriver, silo_config, smoke_config

from crypto.pki import ensure_pki
from protos import fcmoe_pb2 as pb
from silo_agent.agent import SiloAgent

pytestmark = [pytest.mark.tls]

K = pb.Task.Kind


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
        session = victim.state.secure.session
        sent: list[str] = []
        victim.client.submit = lambda *a, **k: sent.append("submit")
        victim.client.download = lambda *a, **k: sent.append("download")
        victim.handle(pb.Task(kind=K.DECRYPT, round=1, decrypt=pb.DecryptInstructions(
            sums=[pb.EncryptedSum(unit=next(iter(victim.specs)), group=0, length=8, chunk_bytes=[64])])))
        assert victim.state.secure is None and victim.state.pending is None and victim.state.refused_session == session
        assert any("no decryption in mode masking" in r.getMessage() for r in caplog.records)
        victim.handle(victim.client.get_task(victim.run_id, wait_s=0.5))  # its UPLOAD task: waited out
        assert sent == []
    finally:
        driver.close()
