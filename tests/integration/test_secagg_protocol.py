"""Masked rounds end to end at the protocol level: silo sessions and the aggregator's MaskedRound,
real keys, signatures, Shamir shares and AES keystreams, with protobuf messages in between (no model)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from aggregator.accumulate import Coefficients
from aggregator.masked_round import MaskedRound
from crypto.pki import ensure_pki, read_pem
from crypto import masking
from crypto.secagg import SecAggError, mask_label, mask_seed
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
        submission = f.sessions[s].make_shares(instructions)
        submission.run_id, submission.round = RUN, 1
        f.aggregator.add_shares(s, wire(submission))


def upload_phase(f: Federation, uploaders) -> None:
    for s in uploaders:
        payload = f.sessions[s].update_payload(wire(f.aggregator.upload_instructions(s)), f.deltas[s])
        f.aggregator.add(s, payload)


def check_phase(f: Federation) -> None:
    """Every survivor signs the view and survivor list (the consistency check)."""
    check = wire(f.aggregator.check_instructions())
    for s in check.survivors:
        signature = f.sessions[s].sign_view(check)
        f.aggregator.add_check(s, wire(pb.CheckSubmission(run_id=RUN, round=1, signature=signature)))


def unmask_phase(f: Federation):
    check_phase(f)
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
    with pytest.raises(ProtocolError, match="4 survivors of the update stage, threshold 5"):
        f.aggregator.check_instructions()
    # a silo asked to sign or reveal anyway (a forged request) refuses as well
    forged = pb.CheckInstructions(survivors=NAMES[3:n], dropped=NAMES[:3], stage="update")
    with pytest.raises(SecAggError, match="4 survivors, threshold is 5"):
        f.sessions["silo3"].sign_view(forged)
    with pytest.raises(SecAggError, match="before this silo signed"):
        f.sessions["silo3"].reveal(pb.UnmaskInstructions(survivors=NAMES[3:n], dropped=NAMES[:3], stage="update"))


def test_a_group_smaller_than_min_group_size_is_never_unmasked(pki_dir):
    n = 6  # unit L0.E0: groups {0, 2, 4} and {1, 3, 5}
    f = federation(pki_dir, n, {"L0.E0": 100}, groups=lambda i, u: i % 2, min_group_size=3, threshold=0.6)
    share_phase(f)
    f.aggregator.open_upload(set(NAMES[:n]), f.plan, CLIP)
    assert {f.aggregator.plan.group[s]["L0.E0"] for s in NAMES[:n]} == {0, 1}
    upload_phase(f, [s for s in NAMES[:n] if s != "silo1"])  # group 1 keeps 2 < 3 survivors
    with pytest.raises(ProtocolError, match="group 1: only 2 survivors, min_group_size 3; not unmasked"):
        f.aggregator.check_instructions()
    forged = pb.CheckInstructions(survivors=[s for s in NAMES[:n] if s != "silo1"], dropped=["silo1"], stage="update")
    with pytest.raises(SecAggError, match="group 1 would sum only 2 silos"):
        f.sessions["silo0"].sign_view(forged)


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
        f.sessions["silo0"].update_payload(instructions, f.deltas["silo0"])


def test_attack_a_second_unmask_of_the_same_stage_is_refused(pki_dir):
    """After revealing for a stage, a silo reveals nothing more in this attempt, and signs no other
    survivor list: never both shares of a peer."""
    f = federation(pki_dir, 4, {"L0.E0": 16}, threshold=0.75)
    share_phase(f)
    f.aggregator.open_upload(set(NAMES[:4]), f.plan, CLIP)
    upload_phase(f, NAMES[:4])
    check_phase(f)
    first = wire(f.aggregator.unmask_instructions())
    shares = f.sessions["silo0"].reveal(first)
    assert all(not r.mask_key for r in shares)
    with pytest.raises(SecAggError, match="already revealed"):
        f.sessions["silo0"].reveal(first)
    with pytest.raises(SecAggError, match="already signed"):
        f.sessions["silo0"].sign_view(pb.CheckInstructions(survivors=NAMES[:3], dropped=["silo3"], stage="update"))


def test_nothing_the_aggregator_holds_before_unmasking_correlates_with_a_delta(pki_dir):
    size = 1_000_000
    f = federation(pki_dir, 3, {"L0.E0": size}, seed=7)
    share_phase(f)
    f.aggregator.open_upload(set(NAMES[:3]), f.plan, CLIP)
    fixed = f.aggregator.fixed
    held = []
    for s in NAMES[:3]:
        payload = f.sessions[s].update_payload(wire(f.aggregator.upload_instructions(s)), f.deltas[s])
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
        f.sessions["silo2"].update_payload(instructions, f.deltas["silo2"])
    forged = wire(f.aggregator.upload_instructions("silo2"))
    forged.run_secret.ciphertext = bytes(len(forged.run_secret.ciphertext))
    with pytest.raises(SecAggError, match="run secret from 'silo0' does not open"):
        f.sessions["silo2"].update_payload(forged, f.deltas["silo2"])


# -- attacks by a malicious aggregator (docs/threat-model.md, table of attacks) ----------------------


def _sign_all(f: Federation, check: pb.CheckInstructions, silos) -> list[pb.ViewSignature]:
    return [f.sessions[s].sign_view(wire(check)) for s in silos]


def test_attack_split_views_of_the_groups_never_unmask(pki_dir):
    """The aggregator shows silo0 a group list in which its unit's group is {silo0, silo1, silo2} and the
    others a list with silo0 alone in its group's sum partner set, hoping to unmask silo0 with the keys of
    its 'group mates'. Every silo signs what it saw; nobody gets t matching signatures: nothing revealed."""
    n = 5
    f = federation(pki_dir, n, {"L0.E0": 32}, groups=lambda i, u: 0, min_group_size=2, threshold=0.6)
    share_phase(f)
    f.aggregator.open_upload(set(NAMES[:n]), f.plan, CLIP)
    honest = {s: wire(f.aggregator.upload_instructions(s)) for s in NAMES[:n]}
    lied = wire(honest["silo0"])  # silo0 is told the others are split into two groups
    lied.groups[:] = [0, 0, 0, 1, 1]
    f.aggregator.add("silo0", f.sessions["silo0"].update_payload(lied, f.deltas["silo0"]))
    for s in NAMES[1:n]:
        f.aggregator.add(s, f.sessions[s].update_payload(honest[s], f.deltas[s]))
    check = f.aggregator.check_instructions()
    signatures = _sign_all(f, check, NAMES[:n])
    unmask = pb.UnmaskInstructions(survivors=check.survivors, dropped=check.dropped, stage="update",
                                   signatures=signatures)
    # silo0's view differs from the other four: it sees one matching signature (its own) of t = 3
    with pytest.raises(SecAggError, match="only 1 peers signed the same view"):
        f.sessions["silo0"].reveal(wire(unmask))
    # the aggregator's own check refuses silo0's signature too (it saw another view)
    with pytest.raises(ProtocolError, match="does not verify"):
        f.aggregator.add_check("silo0", wire(pb.CheckSubmission(run_id=RUN, round=1, signature=signatures[0])))


def test_attack_split_survivor_stories_never_unmask_both_secrets_of_a_silo(pki_dir):
    """Tell silo1, silo2 that silo0 dropped out (to get silo0's mask-key shares) and silo3, silo4 that it
    survived (to get its self-seed shares): each half signs a different survivor list, neither reaches t."""
    n = 5
    f = federation(pki_dir, n, {"L0.E0": 32}, min_group_size=2, threshold=0.6)
    share_phase(f)
    f.aggregator.open_upload(set(NAMES[:n]), f.plan, CLIP)
    upload_phase(f, NAMES[:n])
    says_dropped = pb.CheckInstructions(survivors=NAMES[1:n], dropped=["silo0"], stage="update")
    says_survived = pb.CheckInstructions(survivors=NAMES[:n], dropped=[], stage="update")
    signatures = _sign_all(f, says_dropped, ["silo1", "silo2"]) + _sign_all(f, says_survived, ["silo3", "silo4"])
    for silo, story in (("silo1", says_dropped), ("silo3", says_survived)):
        unmask = pb.UnmaskInstructions(survivors=story.survivors, dropped=story.dropped, stage="update",
                                       signatures=signatures)
        with pytest.raises(SecAggError, match="only 2 peers signed the same view and survivor list, threshold is 3"):
            f.sessions[silo].reveal(wire(unmask))
    # and a silo never reveals under a survivor list other than the one it signed
    with pytest.raises(SecAggError, match="other survivors than this silo signed"):
        f.sessions["silo1"].reveal(wire(pb.UnmaskInstructions(survivors=NAMES[:n], dropped=[], stage="update",
                                                              signatures=signatures)))


def test_attack_isolating_weights_are_refused_before_masking(pki_dir):
    """alpha = (1, 0, 0): the 'group sum' would be silo0's delta. Every silo refuses to mask, whatever
    the aggregator's plan; a silo also refuses a coefficient table whose row for it is not what it is
    asked to multiply by."""
    f = federation(pki_dir, 3, {"L0.E0": 16})
    share_phase(f)
    f.aggregator.open_upload(set(NAMES[:3]), f.plan, CLIP)
    for s in NAMES[:3]:
        forged = wire(f.aggregator.upload_instructions(s))
        forged.peer_coefficients[:] = [1.0, 0.0, 0.0]
        forged.coefficients[:] = [forged.peer_coefficients[NAMES.index(s)]]
        with pytest.raises(SecAggError, match="a member weighs 0 of the largest coefficient, under the minimum ratio 0.1"):
            f.sessions[s].update_payload(forged, f.deltas[s])
    other = federation(pki_dir, 3, {"L0.E0": 16})
    share_phase(other)
    other.aggregator.open_upload(set(NAMES[:3]), other.plan, CLIP)
    mismatch = wire(other.aggregator.upload_instructions("silo1"))
    mismatch.coefficients[:] = [5.0]
    with pytest.raises(SecAggError, match="coefficients differ from its row"):
        other.sessions["silo1"].update_payload(mismatch, other.deltas["silo1"])


def test_honest_plans_are_floored_so_the_weight_policy_never_trips(pki_dir):
    f = federation(pki_dir, 4, {"L0.E0": 16})
    f.plan.alpha["silo0"]["L0.E0"] = 0.0  # e.g. a silo that routes nothing to this expert
    share_phase(f)
    f.aggregator.open_upload(set(NAMES[:4]), f.plan, CLIP)
    alphas = [f.aggregator.plan.alpha[s]["L0.E0"] for s in NAMES[:4]]
    assert min(alphas) == pytest.approx(0.1 * max(alphas))
    upload_phase(f, NAMES[:4])
    sums = unmask_phase(f)
    assert sums["L0.E0"][0].weight == pytest.approx(sum(alphas))


def test_attack_a_silo_that_survives_the_sketch_stage_and_drops_out_later_stays_hidden(pki_dir):
    """A silo that survives the sketch stage and drops out of the update stage: the aggregator then holds
    its sketch-stage self seed and its update-stage mask key, which together open neither stage."""
    n = 5
    f = federation(pki_dir, n, {"L0.E0": 64}, min_group_size=2, threshold=0.6)
    share_phase(f)
    rng = np.random.default_rng(1)
    sketches = {s: {"L0.E0": (rng.standard_normal(16) * 0.1).astype(np.float32)} for s in NAMES[:n]}
    weights = Coefficients({s: {"L0.E0": 0.2} for s in NAMES[:n]}, {s: {"L0.E0": 0} for s in NAMES[:n]})
    f.aggregator.open_stage("sketch", set(NAMES[:n]), weights, CLIP, sketch_buckets=16)
    held = {}
    for s in NAMES[:n]:
        payload = f.sessions[s].update_payload(wire(f.aggregator.upload_instructions(s)), sketches[s])
        held[s] = payload["L0.E0"]  # what a malicious aggregator keeps
        f.aggregator.add(s, payload)
    sketch_sums = unmask_phase(f)
    expected = sum(0.2 * sketches[s]["L0.E0"].astype(np.float64) for s in NAMES[:n])
    np.testing.assert_allclose(sketch_sums["L0.E0"][0].vector, expected, atol=1e-5)
    sketch_seed, sketch_fixed = f.aggregator._secret("silo0"), f.aggregator.fixed  # silo0 survived: its seed
    f.aggregator.open_stage("update", set(NAMES[:n]), f.plan, CLIP)
    upload_phase(f, NAMES[1:n])  # silo0 drops out of the update stage
    update_sums = unmask_phase(f)
    assert update_sums["L0.E0"][0].count == n - 1
    update_key = f.aggregator._secret("silo0")  # silo0 dropped: the update stage's mask key is revealed

    def strip(mask_key: bytes) -> np.ndarray:
        """The attacker removes silo0's self mask and its pairwise masks (computed from a mask key and the
        peers' sketch-stage public keys) from the masked sketch it kept."""
        pairs = {p: mask_seed(mask_key, bytes(f.aggregator._adverts[p].sketch_mask_public), RUN, SESSION, "silo0", p)
                 for p in NAMES[1:n]}
        words = held["silo0"] - masking.mask(np.zeros_like(held["silo0"]), "silo0", sketch_seed, pairs,
                                             mask_label(RUN, SESSION, "L0.E0", 0, "sketch"))
        return sketch_fixed.decode(words)

    truth = 0.2 * sketches["silo0"]["L0.E0"].astype(np.float64)
    # control: with the sketch stage's own mask key the attack reads silo0's sketch exactly ...
    np.testing.assert_allclose(strip(f.sessions["silo0"]._keys.mask_private_bytes("sketch")), truth, atol=1e-6)
    # ... but the aggregator holds only the update stage's key, which leaves it padded: uniform words
    # over the whole fixed-point range (hundreds), where the sketch's values are about 0.01
    assert np.median(np.abs(strip(update_key) - truth)) > 1.0
