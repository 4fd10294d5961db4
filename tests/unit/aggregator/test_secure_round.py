"""aggregator/secure_round.py on its own: who deals the run secret, what the dealer must send, and
the upload plan (groups merged below min_group_size, coefficients floored, too few silos refused)."""

from __future__ import annotations

import pytest

from aggregator.accumulate import Coefficients
from aggregator.secure_round import SEALED_SECRET_BYTES, SecureRound
from fcmoe.config import SecureAggregationConfig
from fcmoe.errors import ProtocolError
from protos import fcmoe_pb2 as pb


class _Shared(SecureRound):
    """SecureRound's own logic, shared by the masking and CKKS rounds; their stage methods are not used here."""

    mode = "test"

    def _stage(self, *args, **kwargs):
        raise NotImplementedError

    start_stage = payload_specs = take_payload = after_stage = result = _stage


def _round(digests: dict[str, bytes], min_group_size: int = 2) -> SecureRound:
    secure = _Shared("run", 7, {"u": 4, "v": 2}, SecureAggregationConfig(mode="masking", min_weight_ratio=0.25),
                         min_group_size, b"")
    for silo, digest in digests.items():
        secure.keep_advert(silo, pb.KeyAdvert(silo=silo, session=7, secret_digest=digest))
    return secure


@pytest.mark.parametrize("digests, force, dealer, recipients", [
    ({"a": b"", "b": b"", "c": b""}, False, "a", ["b", "c"]),  # nobody holds it: the first reporter draws it
    ({"a": b"", "b": b"x", "c": b""}, False, "b", ["a", "c"]),  # the first holder deals
    ({"a": b"x", "b": b"y", "c": b"x"}, False, "a", ["b"]),  # a different secret is replaced by the dealer's
    ({"a": b"x", "b": b"x", "c": b"x"}, False, "", []),  # all agree: nobody deals
    ({"a": b"x", "b": b"x", "c": b"x"}, True, "a", []),
])
def test_the_dealer_and_the_recipients_of_the_run_secret(digests, force, dealer, recipients):
    secure = _round(digests)
    secure.open_sharing(set(digests), force_dealer=force)
    instructions = secure.share_instructions()
    assert (instructions.dealer, list(instructions.secret_recipients)) == (dealer, recipients)
    assert [a.silo for a in instructions.adverts] == ["a", "b", "c"] and instructions.min_group_size == 2


def test_only_the_dealer_sends_exactly_one_sealed_secret_per_recipient():
    secure = _round({"a": b"", "b": b"", "c": b""})
    secure.open_sharing({"a", "b", "c"})

    def sealed(sender, *recipients, size=SEALED_SECRET_BYTES):
        return pb.ShareSubmission(secrets=[pb.SealedShare(sender=sender, recipient=r, ciphertext=bytes(size))
                                           for r in recipients])
    for silo, submission in [("a", sealed("a", "b")), ("a", sealed("a", "b", "c", "c")), ("b", sealed("b", "c")),
                             ("a", sealed("b", "b", "c")), ("a", sealed("a", "b", "c", size=SEALED_SECRET_BYTES - 1))]:
        with pytest.raises(ProtocolError, match="run secrets: expected one sealed secret"):
            secure.add_dealt_secrets(silo, submission)
    secure.add_dealt_secrets("b", pb.ShareSubmission())  # not the dealer: nothing to send
    secure.add_dealt_secrets("a", sealed("a", "c", "b"))
    secure.plan_groups({"a", "b", "c"}, Coefficients({s: {"u": 1.0, "v": 1.0} for s in "abc"},
                                                     {s: {"u": 0, "v": 0} for s in "abc"}), 2)
    assert secure.upload_instructions("b").run_secret.recipient == "b"
    assert not secure.upload_instructions("a").HasField("run_secret")


def test_the_upload_plan_merges_small_groups_floors_weights_and_refuses_too_few_silos():
    secure = _round({s: b"" for s in "abcd"})
    plan = Coefficients({"a": {"u": 4.0, "v": 1.0}, "b": {"u": 0.1, "v": 1.0}, "c": {"u": 2.0, "v": 1.0},
                         "d": {"u": 1.0, "v": 1.0}},
                        {"a": {"u": 0, "v": 0}, "b": {"u": 0, "v": 1}, "c": {"u": 1, "v": 1}, "d": {"u": 1, "v": 0}})
    secure.plan_groups({"a", "b", "c"}, plan, 2)  # d dropped out
    assert secure.peers == ["a", "b", "c"] and set(secure.plan.alpha) == {"a", "b", "c"}
    assert {secure.plan.group[s]["u"] for s in "abc"} == {0}  # group 1 would hold c alone: merged
    assert {secure.plan.group[s]["v"] for s in "abc"} == {0}  # a alone in v's group 0: merged too
    assert secure.plan.alpha["b"]["u"] == pytest.approx(1.0)  # floored to 0.25 of the group's largest (4)
    instructions = secure.upload_instructions("b")
    assert list(instructions.units) == ["u", "v"] and list(instructions.peers) == ["a", "b", "c"]
    with pytest.raises(ProtocolError, match="silo 'd' did not answer the share phase"):
        secure.check_member("d")
    everyone = _round({s: b"" for s in "abcd"})
    everyone.plan_groups({"a", "b", "c", "d"}, plan, 2)  # groups of two stand
    assert [everyone.plan.group[s]["u"] for s in "abcd"] == [0, 0, 1, 1]
    with pytest.raises(ProtocolError, match="1 silos are left in the round; need 2"):
        _round({}).plan_groups({"a"}, plan, 2)
