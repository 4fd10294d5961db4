"""Masked rounds end to end at the protocol level: silo sessions and the aggregator's MaskedRound,
real keys, signatures, Shamir shares and AES keystreams, with protobuf messages in between (no model)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from aggregator.accumulate import Coefficients
from aggregator.masked_round import MaskedRound
from crypto.pki import ensure_pki, read_pem
from crypto.secagg import SecAggError
from fcmoe.config import SecureAggregationConfig
from fcmoe.errors import ProtocolError
from protos import fcmoe_pb2 as pb
from silo_agent.masked_round import MaskingSession

RUN, SESSION, CLIP = "run42", (1 << 16) | 0, 1.0
NAMES = [f"silo{i}" for i in range(10)]


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    return ensure_pki(tmp_path_factory.mktemp("pki"), NAMES).directory


def wire(message):
    """Every message crosses a serialisation boundary, as on gRPC."""
    return type(message).FromString(message.SerializeToString())


@dataclass
class Federation:
    aggregator: MaskedRound
    sessions: dict[str, MaskingSession]
    deltas: dict[str, dict[str, np.ndarray]]
    plan: Coefficients


def federation(pki_dir, n: int, sizes: dict[str, int], groups=None, min_group_size: int = 2, seed: int = 0,
               threshold: float = 0.67, run_secrets: dict[str, bytes] | None = None) -> Federation:
    rng = np.random.default_rng(seed)
    silos = NAMES[:n]
    settings = SecureAggregationConfig(mode="masking", threshold=threshold)
    agg = MaskedRound(RUN, SESSION, sizes, settings, min_group_size, read_pem(pki_dir / "ca.pem"))
    sessions = {s: MaskingSession(RUN, SESSION, s, pki_dir, min_group_size, (run_secrets or {}).get(s))
                for s in silos}
    deltas = {}
    for s in silos:
        deltas[s] = {}
        for u, size in sizes.items():
            v = rng.standard_normal(size)
            deltas[s][u] = (v * (CLIP / np.linalg.norm(v)) * rng.uniform(0.2, 1.0)).astype(np.float32)
    alpha = {s: {u: float(rng.uniform(0.5, 2.0)) for u in sizes} for s in silos}
    group = {s: {u: (groups(i, u) if groups else 0) for u in sizes} for i, s in enumerate(silos)}
    return Federation(agg, sessions, deltas, Coefficients(alpha, group))


def share_phase(f: Federation, sharers=None) -> None:
    for s, session in f.sessions.items():
        advert = wire(session.advert())
        f.aggregator.check_advert(s, advert)
        f.aggregator.keep_advert(s, advert)
    f.aggregator.open_sharing(set(f.sessions))
    instructions = wire(f.aggregator.share_instructions())
    for s in sharers if sharers is not None else f.sessions:
        shares, secrets = f.sessions[s].make_shares(instructions)
        f.aggregator.add_shares(s, wire(pb.ShareSubmission(run_id=RUN, round=1, shares=shares, secrets=secrets)))


def upload_phase(f: Federation, uploaders) -> None:
    for s in uploaders:
        payload = f.sessions[s].masked_payload(wire(f.aggregator.upload_instructions(s)), f.deltas[s])
        f.aggregator.add(s, payload)


def unmask_phase(f: Federation):
    instructions = wire(f.aggregator.unmask_instructions())
    for s in instructions.survivors:
        shares = f.sessions[s].reveal(instructions)
        f.aggregator.add_reveal(s, wire(pb.UnmaskSubmission(run_id=RUN, round=1, shares=shares)))
    return f.aggregator.result()


def masked_round(f: Federation, sharers, uploaders):
    share_phase(f, sharers)
    f.aggregator.open_upload(set(sharers), f.plan, CLIP)
    upload_phase(f, uploaders)
    return unmask_phase(f)


def expected_sums(f: Federation, contributors):
    """Per (unit, group): the fixed-point sum of the contributors' encodings, decoded, and the float sum."""
    fixed, plan = f.aggregator.fixed, f.aggregator.plan
    out = {}
    for u in next(iter(f.deltas.values())):
        for s in contributors:
            key = (u, plan.group[s][u])
            encoded = fixed.encode(np.float64(plan.alpha[s][u]) * f.deltas[s][u].astype(np.float64))
            words, exact = out.get(key, (np.zeros_like(encoded), 0.0))
            out[key] = (words + encoded, exact + np.float64(plan.alpha[s][u]) * f.deltas[s][u].astype(np.float64))
    return {k: (fixed.decode(w).astype(np.float32), e) for k, (w, e) in out.items()}


@pytest.mark.parametrize("n", range(2, 11))
def test_unmasked_sum_equals_the_fixed_point_sum_exactly(pki_dir, n):
    f = federation(pki_dir, n, {"L0.E0": 300, "L0.shared": 50}, seed=n)
    sums = masked_round(f, NAMES[:n], NAMES[:n])
    fixed = f.aggregator.fixed
    for (unit, group), (words_sum, float_sum) in expected_sums(f, NAMES[:n]).items():
        got = sums[unit][group]
        assert np.array_equal(got.vector, words_sum)  # exact in fixed point
        err = np.abs(got.vector.astype(np.float64) - float_sum).max()
        assert err <= fixed.sum_error_bound(n) + 1e-6 * np.abs(float_sum).max()  # float32 rounding on top
        assert got.count == n and got.weight == pytest.approx(sum(f.plan.alpha[s][unit] for s in NAMES[:n]))


@pytest.mark.parametrize("drop", [1, 2])
def test_dropouts_after_the_share_phase_leave_the_survivors_exact_sum(pki_dir, drop):
    n = 7  # t = ceil(0.67 * 7) = 5: up to n - t = 2 may drop out
    f = federation(pki_dir, n, {"L0.E0": 200, "L0.E1": 64}, groups=lambda i, u: i % 2 if u == "L0.E1" else 0,
                   min_group_size=2, seed=drop)
    survivors = NAMES[drop:n]
    sums = masked_round(f, NAMES[:n], survivors)
    assert f.aggregator.threshold == 5
    for (unit, group), (words_sum, _) in expected_sums(f, survivors).items():
        assert np.array_equal(sums[unit][group].vector, words_sum)
        assert sums[unit][group].count == sum(1 for s in survivors if f.plan.group[s][unit] == group)


def test_below_threshold_the_round_is_not_unmasked(pki_dir):
    n = 7
    f = federation(pki_dir, n, {"L0.E0": 100})
    share_phase(f)
    f.aggregator.open_upload(set(NAMES[:n]), f.plan, CLIP)
    upload_phase(f, NAMES[3:n])  # 4 survivors < t = 5
    with pytest.raises(ProtocolError, match="4 survivors, threshold 5"):
        f.aggregator.unmask_instructions()
    # a silo asked to reveal anyway (a forged request) refuses as well
    forged = pb.UnmaskInstructions(survivors=NAMES[3:n], dropped=NAMES[:3])
    with pytest.raises(SecAggError, match="4 survivors, threshold is 5"):
        f.sessions["silo3"].reveal(forged)


def test_a_group_smaller_than_min_group_size_is_never_unmasked(pki_dir):
    n = 6  # unit L0.E0: groups {0, 2, 4} and {1, 3, 5}
    f = federation(pki_dir, n, {"L0.E0": 100}, groups=lambda i, u: i % 2, min_group_size=3, threshold=0.6)
    share_phase(f)
    f.aggregator.open_upload(set(NAMES[:n]), f.plan, CLIP)
    assert {f.aggregator.plan.group[s]["L0.E0"] for s in NAMES[:n]} == {0, 1}
    upload_phase(f, [s for s in NAMES[:n] if s != "silo1"])  # group 1 keeps 2 < 3 survivors
    with pytest.raises(ProtocolError, match="group 1: only 2 survivors, min_group_size 3; not unmasked"):
        f.aggregator.unmask_instructions()
    forged = pb.UnmaskInstructions(survivors=[s for s in NAMES[:n] if s != "silo1"], dropped=["silo1"])
    with pytest.raises(SecAggError, match="group 1 would sum only 2 silos"):
        f.sessions["silo0"].reveal(forged)


def test_groups_left_small_by_share_dropouts_are_merged_before_masking(pki_dir):
    n = 6
    f = federation(pki_dir, n, {"L0.E0": 64}, groups=lambda i, u: i % 2, min_group_size=3, threshold=0.6)
    sharers = [s for s in NAMES[:n] if s != "silo1"]  # silo1 never sent shares: group 1 would have 2
    share_phase(f, sharers)
    f.aggregator.open_upload(set(sharers), f.plan, CLIP)
    assert {f.aggregator.plan.group[s]["L0.E0"] for s in sharers} == {0}
    upload_phase(f, sharers)
    sums = unmask_phase(f)
    assert list(sums["L0.E0"]) == [0] and sums["L0.E0"][0].count == 5


def test_a_key_advert_altered_in_transit_is_refused(pki_dir):
    f = federation(pki_dir, 3, {"L0.E0": 16})
    adverts = {s: wire(sess.advert()) for s, sess in f.sessions.items()}
    for s, a in adverts.items():
        f.aggregator.keep_advert(s, a)
    f.aggregator.open_sharing(set(adverts))
    instructions = wire(f.aggregator.share_instructions())
    tampered = bytearray(instructions.adverts[1].mask_public)
    tampered[0] ^= 1  # the relaying aggregator swaps in another key
    instructions.adverts[1].mask_public = bytes(tampered)
    with pytest.raises(SecAggError, match="advert of silo 'silo1': signature does not verify"):
        f.sessions["silo0"].make_shares(instructions)
    with pytest.raises(ProtocolError, match="signature does not verify"):
        f.aggregator.check_advert("silo1", instructions.adverts[1])
    # an advert of another attempt (replay) and one naming another silo are refused too
    other = MaskingSession(RUN, SESSION + 1, "silo1", pki_dir, 2)
    with pytest.raises(ProtocolError, match="session"):
        f.aggregator.check_advert("silo1", other.advert())
    with pytest.raises(ProtocolError, match="expected 'silo2'"):
        f.aggregator.check_advert("silo2", adverts["silo1"])


def test_a_silo_refuses_a_substituted_own_advert_or_a_minority_threshold(pki_dir):
    f = federation(pki_dir, 4, {"L0.E0": 16})
    for s, sess in f.sessions.items():
        f.aggregator.keep_advert(s, wire(sess.advert()))
    f.aggregator.open_sharing(set(f.sessions))
    instructions = wire(f.aggregator.share_instructions())
    low = wire(instructions)
    low.threshold = 2  # 2 of 4 is not a majority
    with pytest.raises(SecAggError, match="need a majority"):
        f.sessions["silo0"].make_shares(low)
    swapped = wire(instructions)
    swapped.adverts[0].CopyFrom(MaskingSession(RUN, SESSION, "silo0", pki_dir, 2).advert())
    with pytest.raises(SecAggError, match="not the one it sent"):
        f.sessions["silo0"].make_shares(swapped)


def test_a_tampered_sealed_share_is_refused_by_its_recipient(pki_dir):
    f = federation(pki_dir, 3, {"L0.E0": 16})
    share_phase(f)
    f.aggregator.open_upload(set(NAMES[:3]), f.plan, CLIP)
    instructions = wire(f.aggregator.upload_instructions("silo0"))
    blob = bytearray(instructions.shares[0].ciphertext)
    blob[20] ^= 1
    instructions.shares[0].ciphertext = bytes(blob)
    with pytest.raises(SecAggError, match="does not open"):
        f.sessions["silo0"].masked_payload(instructions, f.deltas["silo0"])


def test_a_silo_reveals_once_and_never_both_shares_of_a_peer(pki_dir):
    f = federation(pki_dir, 4, {"L0.E0": 16}, threshold=0.75)
    share_phase(f)
    f.aggregator.open_upload(set(NAMES[:4]), f.plan, CLIP)
    upload_phase(f, NAMES[:4])
    first = pb.UnmaskInstructions(survivors=NAMES[:4], dropped=[])
    shares = f.sessions["silo0"].reveal(first)
    assert all(not r.mask_key for r in shares)
    with pytest.raises(SecAggError, match="already revealed"):
        f.sessions["silo0"].reveal(pb.UnmaskInstructions(survivors=NAMES[:3], dropped=["silo3"]))


def test_nothing_the_aggregator_holds_before_unmasking_correlates_with_a_delta(pki_dir):
    size = 1_000_000
    f = federation(pki_dir, 3, {"L0.E0": size}, seed=7)
    share_phase(f)
    f.aggregator.open_upload(set(NAMES[:3]), f.plan, CLIP)
    fixed = f.aggregator.fixed
    held = []
    for s in NAMES[:3]:
        payload = f.sessions[s].masked_payload(wire(f.aggregator.upload_instructions(s)), f.deltas[s])
        held.append(payload["L0.E0"])  # what arrives on the wire
        f.aggregator.add(s, payload)
        held.append(f.aggregator._sums[("L0.E0", 0)].copy())  # the running masked sum it stores
    for words in held:
        signed = fixed.decode(words)
        for s in NAMES[:3]:
            r = np.corrcoef(signed, f.deltas[s]["L0.E0"].astype(np.float64))[0, 1]
            assert abs(r) < 0.01, (s, r)


def test_the_run_secret_is_dealt_to_those_that_lack_it_and_the_aggregator_never_sees_it(pki_dir):
    f = federation(pki_dir, 4, {"L0.E0": 32})
    masked_round(f, NAMES[:4], NAMES[:4])
    assert f.aggregator.dealer == "silo0"  # nobody held one: the first reporter drew it
    secret = f.sessions["silo0"].run_secret
    assert secret is not None and all(s.run_secret == secret for s in f.sessions.values())
    held = [m.SerializeToString() for m in f.aggregator._secrets.values()]
    held += [a.SerializeToString() for a in f.aggregator._adverts.values()]
    assert not any(secret in blob for blob in held)
    # next attempt: silo2 restarted (lost it), the others hold it -> the first holder deals to silo2 only
    again = federation(pki_dir, 4, {"L0.E0": 32}, run_secrets={s: secret for s in ("silo0", "silo1", "silo3")})
    share_phase(again)
    assert again.aggregator.dealer == "silo0" and again.aggregator.share_instructions().secret_recipients == ["silo2"]
    again.aggregator.open_upload(set(NAMES[:4]), again.plan, CLIP)
    upload_phase(again, NAMES[:4])
    assert again.sessions["silo2"].run_secret == secret
    # everyone holds the same: nothing is dealt
    same = federation(pki_dir, 3, {"L0.E0": 8}, run_secrets={s: secret for s in NAMES[:3]})
    share_phase(same)
    assert same.aggregator.dealer == "" and not same.aggregator._secrets


def test_a_run_secret_from_anyone_but_the_dealer_is_refused(pki_dir):
    f = federation(pki_dir, 3, {"L0.E0": 8})
    share_phase(f)
    f.aggregator.open_upload(set(NAMES[:3]), f.plan, CLIP)
    instructions = wire(f.aggregator.upload_instructions("silo2"))
    instructions.run_secret.sender = "silo1"  # relabelled by the relay
    with pytest.raises(SecAggError, match="the dealer is 'silo0'"):
        f.sessions["silo2"].masked_payload(instructions, f.deltas["silo2"])
    forged = wire(f.aggregator.upload_instructions("silo2"))
    forged.run_secret.ciphertext = bytes(len(forged.run_secret.ciphertext))
    with pytest.raises(SecAggError, match="run secret from 'silo0' does not open"):
        f.sessions["silo2"].masked_payload(forged, f.deltas["silo2"])
