"""aggregator/round_mode.py: every mode answers the coordinator through one interface; mode none sums
in the clear and merges small update groups; a phase a mode has not is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.accumulate import Coefficients
from aggregator.ckks_round import CkksKeys, CkksRound
from aggregator.masked_round import MaskedRound
from aggregator.plain_round import PlainRound
from aggregator.round_mode import Next
from aggregator.rounds import Phase
from fcmoe.config import SecureAggregationConfig
from fcmoe.errors import ProtocolError
from protos import fcmoe_pb2 as pb

SIZES = {"u": 3, "v": 2}


def _plan(groups: dict[str, int]) -> Coefficients:
    return Coefficients({s: {u: 1.0 for u in SIZES} for s in groups},
                        {s: {u: g for u in SIZES} for s, g in groups.items()})


def test_mode_none_sums_in_the_clear_and_merges_a_small_update_group():
    mode = PlainRound(SIZES, min_group_size=2)
    assert not mode.has_sharing and mode.can_sketch and mode.threshold == 0
    mode.take_advert("a", pb.RoundReport())
    with pytest.raises(ProtocolError, match="no key advert was asked"):
        mode.take_advert("a", pb.RoundReport(advert=pb.KeyAdvert(silo="a")))
    asked, minimum = mode.start_stage("update", {"a", "b", "c"}, _plan({"a": 0, "b": 0, "c": 1}), 0.0, quorum=2)
    assert (asked, minimum, mode.stage) == ({"a", "b", "c"}, 2, "update")
    header = pb.UpdateHeader(units=["u", "v"])
    assert {u: s.shape for u, s in mode.payload_specs(Phase.UPLOADING, header).items()} == {"u": (3,), "v": (2,)}
    with pytest.raises(ProtocolError, match="differ from what this phase expects"):
        mode.payload_specs(Phase.UPLOADING, pb.UpdateHeader(units=["v", "u"]))
    for silo, value in (("a", 1.0), ("b", 2.0), ("c", 4.0)):
        mode.take_payload(Phase.UPLOADING, silo, {u: np.full(n, value, np.float32) for u, n in SIZES.items()}, header)
    assert mode.after_stage() == Next.SUMS and mode.members == {"a", "b", "c"}
    sums = mode.result()
    assert set(sums["u"]) == {0} and sums["u"][0].count == 3  # c alone in group 1: merged
    np.testing.assert_allclose(sums["u"][0].vector, [7.0, 7.0, 7.0])
    instructions = mode.upload_instructions("a")
    assert (list(instructions.units), instructions.stage, instructions.sketch_buckets) == (["u", "v"], "update", 0)


def test_mode_none_sketch_stage_has_bucket_sized_payloads_and_keeps_its_groups():
    mode = PlainRound(SIZES, min_group_size=2)
    mode.start_stage("sketch", {"a", "b"}, _plan({"a": 0, "b": 1}), 0.0, quorum=2, sketch_buckets=4)
    assert mode.upload_instructions("b").sketch_buckets == 4
    header = pb.UpdateHeader(units=["u", "v"], stage="sketch")
    assert {u: s.shape for u, s in mode.payload_specs(Phase.SKETCHING, header).items()} == {"u": (4,), "v": (4,)}
    for silo in ("a", "b"):
        mode.take_payload(Phase.SKETCHING, silo, {u: np.ones(4, np.float32) for u in SIZES}, header)
    assert set(mode.result()["u"]) == {0, 1}


@pytest.mark.parametrize("make, refused", [
    (lambda: PlainRound(SIZES, 2), ["sharing", "checking", "unmasking", "decrypting"]),
    (lambda: MaskedRound("run", 1, SIZES, SecureAggregationConfig(mode="masking"), 2, b""), ["decrypting"]),
    (lambda: CkksRound("run", 1, SIZES, SecureAggregationConfig(mode="ckks"), 2, b"", CkksKeys()),
     ["checking", "unmasking", "sketch stage"]),
])
def test_a_phase_the_mode_has_not_is_refused_in_one_line(make, refused):
    mode = make()
    calls = {"sharing": lambda: mode.add_shares("a", pb.ShareSubmission()),
             "checking": lambda: mode.add_check("a", pb.CheckSubmission()),
             "unmasking": lambda: mode.add_reveal("a", pb.UnmaskSubmission()),
             "decrypting": mode.decrypt_instructions,
             "sketch stage": lambda: mode.start_stage("sketch", {"a"}, _plan({"a": 0}), 1.0, 1, 4)}
    for what in refused:
        with pytest.raises(ProtocolError, match=f"^no {what} in mode {mode.mode}$"):
            calls[what]()
    with pytest.raises(ProtocolError, match="no encrypted sums to decrypt now"):
        PlainRound(SIZES, 2).encrypted_sums("a")
