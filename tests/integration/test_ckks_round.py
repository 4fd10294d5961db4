"""Mode ckks at the protocol level: silo sessions and the aggregator's CkksRound with real TenSEAL
keys, real signatures and sealed channels, protobuf messages in between (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.accumulate import Coefficients
from aggregator.ckks_round import CkksKeys, CkksRound
from crypto.pki import ensure_pki, read_pem
from crypto.secagg import SecAggError
from fcmoe.config import SecureAggregationConfig
from fcmoe.errors import ProtocolError
from protos import fcmoe_pb2 as pb
from silo_agent.ckks_round import CkksSession

RUN, SESSION, CLIP = "run7", 1 << 16, 1.0
NAMES = ["silo0", "silo1", "silo2", "silo3"]
SIZES = {"L0.E0": 5000, "L0.shared": 300}


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    return ensure_pki(tmp_path_factory.mktemp("pki"), NAMES).directory


def wire(message):
    return type(message).FromString(message.SerializeToString())


def setup(pki_dir, keys=None, contexts=None, secrets=None):
    settings = SecureAggregationConfig(mode="ckks")
    agg = CkksRound(RUN, SESSION, SIZES, settings, 2, read_pem(pki_dir / "ca.pem"), keys or CkksKeys())
    sessions = {s: CkksSession(RUN, SESSION, s, pki_dir, 2, (secrets or {}).get(s), (contexts or {}).get(s))
                for s in NAMES}
    for s, session in sessions.items():
        advert = wire(session.advert())
        agg.check_advert(s, advert)
        agg.keep_advert(s, advert)
    agg.open_sharing(set(NAMES))
    instructions = wire(agg.share_instructions())
    for s, session in sessions.items():
        submission = session.make_shares(instructions)
        submission.run_id, submission.round = RUN, 1
        agg.add_shares(s, wire(submission))
    rng = np.random.default_rng(0)
    alpha = {s: {u: float(rng.uniform(0.5, 2)) for u in SIZES} for s in NAMES}
    agg.open_upload(set(NAMES), Coefficients(alpha, {s: {u: 0 for u in SIZES} for s in NAMES}), CLIP)
    deltas = {s: {u: (rng.standard_normal(n) * 0.2 / np.sqrt(n)).astype(np.float32) for u, n in SIZES.items()}
              for s in NAMES}
    return agg, sessions, deltas, alpha


def upload(agg, sessions, deltas, silos):
    for s in silos:
        payload = sessions[s].update_payload(wire(agg.upload_instructions(s)), deltas[s])
        agg.add(s, payload, wire(pb.UpdateHeader(contributions=sessions[s].contributions)).contributions)


def test_ckks_round_sums_within_ckks_error_and_the_aggregator_holds_no_secret_key(pki_dir):
    agg, sessions, deltas, alpha = setup(pki_dir)
    assert agg.dealer == "silo0" and not agg.keys.public.is_private()
    upload(agg, sessions, deltas, NAMES[:3])  # silo3 drops out
    instructions = wire(agg.decrypt_instructions())
    holder = sessions[agg.key_holder]
    fetched = agg.encrypted_sums(agg.key_holder)
    assert set(fetched) == set(holder.sum_specs(instructions))
    agg.add_decryption(agg.key_holder, holder.decrypt(instructions, fetched))
    sums = agg.result()
    for unit in SIZES:
        expected = sum(alpha[s][unit] * deltas[s][unit].astype(np.float64) for s in NAMES[:3])
        got = sums[unit][0]
        # the flooding noise: sigma = 2**-18 * sqrt(sum max(1, alpha)**2) per coordinate (crypto/ckks.py)
        sigma = 2.0**-18 * np.sqrt(sum(max(1.0, alpha[s][unit]) ** 2 for s in NAMES[:3]))
        assert got.count == 3 and np.abs(got.vector - expected).max() < 6 * sigma
    # every silo got the same key through the sealed channel; the aggregator's blob needs the run secret
    secret = sessions["silo0"].run_secret
    assert all(s.run_secret == secret for s in list(sessions.values())[:3])
    assert secret not in agg.keys.sealed_secret
    with pytest.raises(ProtocolError, match="not this round's key holder"):
        agg.encrypted_sums("silo2")


def test_the_key_holder_refuses_a_sum_claiming_too_few_or_too_many_contributors(pki_dir):
    agg, sessions, deltas, _ = setup(pki_dir)
    upload(agg, sessions, deltas, NAMES)
    instructions = wire(agg.decrypt_instructions())
    holder, fetched = sessions[agg.key_holder], agg.encrypted_sums(agg.key_holder)
    lie = wire(instructions)
    lie.sums[0].contributors = 1  # one silo's ciphertext passed off as a sum
    with pytest.raises(SecAggError, match="claims 1 contributors but carries 4 signatures"):
        holder.decrypt(lie, fetched)
    del lie.sums[0].signed_contributions[1:]
    with pytest.raises(SecAggError, match="carries 1 contributor signatures; this silo's min_group_size is 2"):
        holder.decrypt(lie, fetched)
    lie.sums[0].contributors = 5
    with pytest.raises(SecAggError, match="claims 5 contributors; the group has 4"):
        holder.decrypt(lie, fetched)


def test_a_bad_ciphertext_is_refused_and_adds_nothing(pki_dir):
    agg, sessions, deltas, _ = setup(pki_dir)
    payload = sessions["silo1"].update_payload(wire(agg.upload_instructions("silo1")), deltas["silo1"])
    payload["L0.shared#0"] = np.frombuffer(b"\x00" * 64, dtype=np.uint8)
    with pytest.raises(ProtocolError, match="encrypted update refused"):
        agg.add("silo1", payload, sessions["silo1"].contributions)
    assert not agg.members and not agg._sums


def test_a_group_too_small_is_never_sent_for_decryption(pki_dir):
    agg, sessions, deltas, _ = setup(pki_dir)
    upload(agg, sessions, deltas, NAMES[:1])
    with pytest.raises(ProtocolError, match="only 1 survivors, min_group_size 2"):
        agg.decrypt_instructions()
