"""crypto/secagg.py: what silos and the aggregator must agree on in a masked round, without a network."""

from __future__ import annotations

import dataclasses
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from crypto import shamir
from crypto.secagg import (PACKED_SHARES_BYTES, STAGES, RoundView, SecAggError, cells, check_bytes, mask_seed,
                           open_with_run_secret, pack_shares, seal_with_run_secret, share_x, threshold_for,
                           unpack_shares, weight_policy_violation)

PEERS = ("a", "b", "c")
UNITS = ("l0.e0", "l0.e1")
GROUP = {"a": {"l0.e0": 0, "l0.e1": 0}, "b": {"l0.e0": 0, "l0.e1": 1}, "c": {"l0.e0": 0, "l0.e1": 1}}
ALPHA = {"a": {"l0.e0": 0.5, "l0.e1": 0.25}, "b": {"l0.e0": 0.3, "l0.e1": 0.4}, "c": {"l0.e0": 0.2, "l0.e1": 0.35}}


def _view(group=GROUP, alpha=ALPHA, **changes) -> RoundView:
    view = RoundView("run", 3, "update", PEERS, UNITS, cells(group, PEERS, UNITS), cells(alpha, PEERS, UNITS), 32, 16)
    return dataclasses.replace(view, **changes)


def test_cells_are_unit_major_and_the_table_reads_them_back():
    assert cells(GROUP, PEERS, UNITS) == (0, 0, 0, 0, 1, 1)  # [u * len(peers) + p]
    view = _view()
    assert view.table(view.groups) == {u: {p: GROUP[p][u] for p in PEERS} for u in UNITS}
    assert view.table(view.coefficients) == {u: {p: ALPHA[p][u] for p in PEERS} for u in UNITS}


def test_the_view_digest_binds_every_field():
    """Two silos shown views that differ anywhere sign different bytes: the consistency check fails."""
    base = _view().digest()
    assert _view().digest() == base
    moved = {**ALPHA, "a": {**ALPHA["a"], "l0.e1": 0.26}}
    regrouped = {**GROUP, "a": {**GROUP["a"], "l0.e1": 1}}
    others = [_view(alpha=moved), _view(group=regrouped), _view(run_id="run2"), _view(session=4),
              _view(stage="sketch"), _view(peers=("a", "c", "b")), _view(units=UNITS[::-1]),
              _view(fixed_point_bits=64), _view(fixed_point_frac_bits=17), _view(sketch_buckets=8)]
    digests = {v.digest() for v in others}
    assert base not in digests and len(digests) == len(others)


def test_what_a_survivor_signs_names_the_survivors_whatever_their_order():
    digest = _view().digest()
    assert check_bytes(digest, ["b", "a"], ["c"]) == check_bytes(digest, ["a", "b"], ["c"])
    assert check_bytes(digest, ["a", "b"], ["c"]) != check_bytes(digest, ["a", "b", "c"], [])


def test_weight_policy_passes_an_honest_plan_and_names_what_would_expose_a_silo():
    assert weight_policy_violation(_view(), set(PEERS), 1, 0.1) is None
    # unit l0.e1: a alone in group 0
    assert weight_policy_violation(_view(), set(PEERS), 2, 0.0) == ("unit l0.e1 group 0 would sum only 1 silos "
                                                                     "(minimum 2)")
    one_group = {p: {u: 0 for u in UNITS} for p in PEERS}  # the peers present are what counts
    assert weight_policy_violation(_view(group=one_group), set(PEERS), 3, 0.0) is None
    assert "group 0 would sum only 2 silos (minimum 3)" in weight_policy_violation(_view(group=one_group),
                                                                                   {"a", "b"}, 3, 0.0)
    negative = {**ALPHA, "c": {"l0.e0": -0.2, "l0.e1": 0.35}}
    assert "negative or non-finite" in weight_policy_violation(_view(alpha=negative), set(PEERS), 1, 0.0)
    nan = {**ALPHA, "c": {"l0.e0": float("nan"), "l0.e1": 0.35}}
    assert "negative or non-finite" in weight_policy_violation(_view(alpha=nan), set(PEERS), 1, 0.0)
    tiny = {**ALPHA, "c": {"l0.e0": 0.001, "l0.e1": 0.35}}  # the others weigh nothing next to a
    assert "under the minimum ratio 0.1" in weight_policy_violation(_view(alpha=tiny), set(PEERS), 1, 0.1)


def test_shares_pack_per_stage_and_refuse_mixed_x_or_a_wrong_length():
    split = {stage: (shamir.split(os.urandom(32), 3, 2), shamir.split(os.urandom(32), 3, 2)) for stage in STAGES}
    for i in range(3):
        mine = {stage: (seeds[i], keys[i]) for stage, (seeds, keys) in split.items()}
        packed = pack_shares(mine)
        assert len(packed) == PACKED_SHARES_BYTES and unpack_shares(packed) == mine
    mixed = {stage: (seeds[0], keys[1]) for stage, (seeds, keys) in split.items()}
    with pytest.raises(SecAggError, match="same x"):
        pack_shares(mixed)
    with pytest.raises(SecAggError, match=f"must be {PACKED_SHARES_BYTES} bytes"):
        unpack_shares(packed[:-1])


def test_share_x_threshold_and_the_pairwise_seed():
    assert [share_x(["c", "a", "b"], s) for s in "abc"] == [1, 2, 3]
    with pytest.raises(SecAggError, match="at least 2 silos"):
        threshold_for(1, 0.5)
    keys = {s: X25519PrivateKey.generate() for s in "ab"}
    raw = {s: k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()) for s, k in keys.items()}
    public = {s: k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) for s, k in keys.items()}
    seed = mask_seed(raw["a"], public["b"], "run", 1, "a", "b")
    assert seed == mask_seed(raw["b"], public["a"], "run", 1, "b", "a")  # both ends of the pair agree
    assert seed != mask_seed(raw["a"], public["b"], "run", 2, "a", "b")  # a new attempt, new masks
    with pytest.raises(SecAggError, match="not a 32-byte X25519 key"):
        mask_seed(raw["a"][:31], public["b"], "run", 1, "a", "b")


def test_data_sealed_under_the_run_secret_opens_only_for_its_run_and_purpose():
    secret = os.urandom(32)
    blob = seal_with_run_secret(secret, "run", "ckks-key", b"the key")
    assert open_with_run_secret(secret, "run", "ckks-key", blob) == b"the key"
    for args in [(os.urandom(32), "run", "ckks-key"), (secret, "run2", "ckks-key"), (secret, "run", "other")]:
        with pytest.raises(SecAggError, match="does not open"):
            open_with_run_secret(*args, blob)
