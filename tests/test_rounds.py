"""The round state machine, with a fake clock (pure logic, no network)."""

import pytest

from aggregator.rounds import Event, Phase, RoundMachine
from fcmoe.errors import ProtocolError


def machine(**kw):
    args = dict(total_rounds=2, min_silos=3, quorum=2, round_timeout_s=10, join_timeout_s=30, max_retries=1,
                created_at=0.0)
    args.update(kw)
    return RoundMachine(**args)


def test_waits_for_min_silos_then_runs_all_rounds_and_final_evaluation():
    m = machine()
    m.join("a"), m.join("b")
    assert m.poll(1) is None and m.task("a").kind == "WAIT"
    m.join("c")
    assert m.poll(2) == Event.ROUND_STARTED and m.task("a").kind == "TRAIN" and m.round == 1
    for s in "abc":
        m.record_update(s, 1, 3)
    assert m.task("a").kind == "WAIT"  # already submitted
    assert m.poll(3) == Event.CLOSE_ROUND
    m.complete_round(4)
    assert m.version == 1 and m.round == 2 and m.task("b").kind == "TRAIN"
    for s in "abc":
        m.record_update(s, 2, 5)
    assert m.poll(5) == Event.CLOSE_ROUND
    m.complete_round(6)
    assert m.phase == Phase.EVALUATING and m.task("c").kind == "EVALUATE" and m.task("c").round == 2
    for s in "abc":
        m.record_evaluation(s, 2)
    assert m.poll(7) == Event.FINISHED and m.task("a").kind == "DONE" and m.succeeded


def test_deadline_with_quorum_closes_and_late_update_is_refused():
    m = machine()
    for s in "abc":
        m.join(s)
    m.poll(0)
    m.record_update("a", 1, 1)
    m.record_update("b", 1, 2)
    assert m.poll(5) is None
    assert m.poll(11) == Event.CLOSE_ROUND
    with pytest.raises(ProtocolError, match="not open"):
        m.record_update("c", 1, 11.5)
    m.complete_round(12)
    with pytest.raises(ProtocolError, match="not open"):
        m.check_update("c", 1, 12.5)  # an update for an old round
    with pytest.raises(ProtocolError) as exc:
        m.record_update("a", 2, 30)  # past round 2's deadline (12 + 10)
    assert exc.value.status == "DEADLINE_EXCEEDED"


def test_duplicate_and_outsider_refused():
    m = machine(min_silos=2)
    m.join("a"), m.join("b")
    m.poll(0)
    m.join("late")
    m.record_update("a", 1, 1)
    with pytest.raises(ProtocolError, match="already") as exc:
        m.record_update("a", 1, 1)
    assert exc.value.status == "ALREADY_EXISTS"
    with pytest.raises(ProtocolError, match="not a participant"):
        m.record_update("late", 1, 1)
    assert m.task("late").kind == "WAIT"


def test_below_quorum_retries_same_round_then_aborts():
    m = machine()
    for s in "abc":
        m.join(s)
    m.poll(0)
    m.record_update("a", 1, 1)
    assert m.poll(11) == Event.ROUND_RETRY and m.round == 1 and m.version == 0 and not m.submitted
    assert m.task("a").kind == "TRAIN"  # everyone trains the round again
    assert m.poll(22) == Event.ABORTED and m.phase == Phase.DONE and not m.succeeded
    assert "quorum" in m.outcome and m.version == 0


def test_join_timeout_aborts():
    m = machine()
    m.join("a")
    assert m.poll(31) == Event.ABORTED and "1 of 3" in m.outcome
