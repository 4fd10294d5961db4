"""The round state machine, with a fake clock (pure logic, no network)."""

import pytest

from aggregator.rounds import Event, Phase, RoundMachine
from fcmoe.errors import ProtocolError


def machine(**kw):
    args = dict(total_rounds=2, min_silos=3, quorum=2, round_timeout_s=10, join_timeout_s=30, max_retries=1,
                created_at=0.0, upload_timeout_s=5)
    args.update(kw)
    return RoundMachine(**args)


def started(**kw):
    m = machine(**kw)
    for s in "abc":
        m.join(s)
    assert m.poll(0) == Event.ROUND_STARTED
    return m


def run_round(m, now, silos="abc"):
    for s in silos:
        m.record(Phase.TRAINING, s, m.round, now)
    assert m.poll(now) == Event.REPORTS_CLOSED
    m.open_upload(now)
    for s in silos:
        assert m.task(s).kind == "UPLOAD"
        m.record(Phase.UPLOADING, s, m.round, now)
    assert m.poll(now) == Event.UPLOADS_CLOSED
    m.complete_round(now)


def test_waits_for_min_silos_then_runs_all_rounds_and_final_evaluation():
    m = machine()
    m.join("a"), m.join("b")
    assert m.poll(1) is None and m.task("a").kind == "WAIT" and m.task("stranger").kind == "JOIN"
    m.join("c")
    assert m.poll(2) == Event.ROUND_STARTED and m.task("a").kind == "TRAIN" and m.round == 1
    m.record(Phase.TRAINING, "a", 1, 3)
    assert m.task("a").kind == "WAIT" and m.task("b").kind == "TRAIN"
    for s in "bc":
        m.record(Phase.TRAINING, s, 1, 3)
    assert m.poll(3) == Event.REPORTS_CLOSED and m.phase == Phase.PLANNING and m.task("a").kind == "WAIT"
    m.open_upload(3)
    for s in "abc":
        m.record(Phase.UPLOADING, s, 1, 4)
    assert m.poll(4) == Event.UPLOADS_CLOSED
    m.complete_round(4)
    assert m.version == 1 and m.round == 2 and m.task("b").kind == "TRAIN"
    run_round(m, 5)
    assert m.phase == Phase.EVALUATING and m.task("c").kind == "EVALUATE" and m.task("c").round == 2
    for s in "abc":
        m.record_evaluation(s, 2)
    assert m.poll(7) == Event.FINISHED and m.task("a").kind == "DONE" and m.succeeded


def test_deadlines_with_quorum_close_each_phase_and_late_messages_are_refused():
    m = started()
    m.record(Phase.TRAINING, "a", 1, 1)
    m.record(Phase.TRAINING, "b", 1, 2)
    assert m.poll(5) is None
    assert m.poll(11) == Event.REPORTS_CLOSED
    with pytest.raises(ProtocolError, match="no report for round 1 is open"):
        m.record(Phase.TRAINING, "c", 1, 11.5)
    m.open_upload(11)
    assert m.task("c").kind == "WAIT"  # c did not report: it has nothing to upload
    with pytest.raises(ProtocolError) as exc:
        m.record(Phase.UPLOADING, "c", 1, 12)
    assert exc.value.status == "PERMISSION_DENIED"
    m.record(Phase.UPLOADING, "a", 1, 12)
    m.record(Phase.UPLOADING, "b", 1, 12)
    assert m.poll(12) == Event.UPLOADS_CLOSED
    m.complete_round(12)
    with pytest.raises(ProtocolError, match="no upload for round 1"):
        m.check(Phase.UPLOADING, "a", 1, 12.5)  # an update for an old round
    with pytest.raises(ProtocolError) as exc:
        m.record(Phase.TRAINING, "a", 2, 30)  # past round 2's deadline (12 + 10)
    assert exc.value.status == "DEADLINE_EXCEEDED"


def test_upload_quorum_after_a_dropout():
    m = started()
    for s in "abc":
        m.record(Phase.TRAINING, s, 1, 1)
    m.poll(1)
    m.open_upload(1)
    m.record(Phase.UPLOADING, "a", 1, 2)
    m.record(Phase.UPLOADING, "b", 1, 2)  # c dropped after reporting
    assert m.poll(3) is None
    assert m.poll(7) == Event.UPLOADS_CLOSED and m.uploaded == {"a", "b"}


def test_duplicate_and_outsider_refused():
    m = machine(min_silos=2)
    m.join("a"), m.join("b")
    m.poll(0)
    m.join("late")
    m.record(Phase.TRAINING, "a", 1, 1)
    with pytest.raises(ProtocolError, match="already") as exc:
        m.record(Phase.TRAINING, "a", 1, 1)
    assert exc.value.status == "ALREADY_EXISTS"
    with pytest.raises(ProtocolError, match="not expected"):
        m.record(Phase.TRAINING, "late", 1, 1)
    assert m.task("late").kind == "WAIT"


def test_below_quorum_retries_same_round_then_aborts():
    m = started()
    m.record(Phase.TRAINING, "a", 1, 1)
    assert m.poll(11) == Event.ROUND_RETRY and m.round == 1 and m.version == 0 and not m.reported
    assert m.task("a").kind == "TRAIN"  # everyone trains the round again
    for s in "ab":
        m.record(Phase.TRAINING, s, 1, 12)
    m.poll(22)
    m.open_upload(22)
    m.record(Phase.UPLOADING, "a", 1, 23)  # one upload < quorum at the upload deadline
    assert m.poll(28) == Event.ABORTED and m.phase == Phase.DONE and not m.succeeded
    assert "1 of 2 answered in uploading, 2 needed" in m.outcome and m.version == 0


def test_failed_aggregation_redoes_the_round_then_aborts():
    m = started(max_retries=1)
    run = lambda: [m.record(Phase.TRAINING, s, m.round, 1) for s in "abc"]  # noqa: E731
    run()
    m.poll(1)
    m.open_upload(1)
    for s in "abc":
        m.record(Phase.UPLOADING, s, 1, 1)
    assert m.poll(1) == Event.UPLOADS_CLOSED
    assert m.fail_round(2, "not finite") == Event.ROUND_RETRY and m.round == 1 and m.version == 0
    run()
    m.poll(2)
    m.open_upload(2)
    for s in "abc":
        m.record(Phase.UPLOADING, s, 1, 2)
    m.poll(2)
    assert m.fail_round(3, "not finite") == Event.ABORTED and "not finite" in m.outcome


def test_join_timeout_aborts():
    m = machine()
    m.join("a")
    assert m.poll(31) == Event.ABORTED and "1 of 3" in m.outcome


def test_secure_phases_in_order_and_each_attempt_has_its_own_session():
    m = started(max_retries=2)
    first = m.session
    for s in "abc":
        m.record(Phase.TRAINING, s, 1, 1)
    assert m.poll(1) == Event.REPORTS_CLOSED
    m.open_phase(Phase.SHARING, "abc", 2, 1, 5)
    assert m.task("a").kind == "SHARE"
    for s in "ab":
        m.record(Phase.SHARING, s, 1, 2)
    assert m.poll(7) == Event.SHARES_CLOSED  # c dropped; 2 >= minimum at the deadline
    m.open_phase(Phase.UPLOADING, "ab", 2, 7, 5)
    assert m.task("c").kind == "WAIT" and m.task("a").kind == "UPLOAD"
    for s in "ab":
        m.record(Phase.UPLOADING, s, 1, 8)
    assert m.poll(8) == Event.UPLOADS_CLOSED
    m.open_phase(Phase.UNMASKING, "ab", 2, 8, 5)
    assert m.task("b").kind == "UNMASK"
    m.record(Phase.UNMASKING, "a", 1, 9)
    assert m.poll(14) == Event.ROUND_RETRY  # one of two unmasked: below t, nothing applied
    assert m.version == 0 and m.round == 1 and m.session != first
    with pytest.raises(ProtocolError, match="open unmasking in phase training"):
        m.open_phase(Phase.UNMASKING, "ab", 2, 14, 5)


def test_a_silo_not_heard_from_within_the_lease_is_left_out_of_new_rounds_until_it_is_back():
    m = machine(lease_s=15, max_retries=0)
    for s in "abc":
        m.join(s, 0)
    assert m.poll(0) == Event.ROUND_STARTED and m.participants == frozenset("abc")
    m.seen("a", 9), m.seen("b", 9)  # c died after joining
    for s in "ab":
        m.record(Phase.TRAINING, s, 1, 9)
    assert m.poll(11) == Event.REPORTS_CLOSED  # deadline, quorum 2
    m.open_upload(11)
    for s in "ab":
        m.record(Phase.UPLOADING, s, 1, 12)
    m.poll(20)
    m.complete_round(20)
    assert m.participants == frozenset("ab")  # round 2 does not wait for c
    m.seen("c", 21)
    assert m.live(21) == frozenset("abc")


def test_a_resumed_round_continues_its_attempt_count_so_no_session_repeats():
    m = machine(max_retries=1)
    m.resume(version=1, first_attempt=3)  # attempts 0..2 of round 2 went out before the restart
    assert m.task("a").kind == "JOIN"
    for s in "abc":
        m.join(s)
    assert m.poll(0) == Event.ROUND_STARTED and m.round == 2 and m.session == 2 << 16 | 3
    assert m.poll(11) == Event.ROUND_RETRY and m.session == 2 << 16 | 4  # retries count on from there
    run_round(m, 12)
    assert m.version == 2 and m.first_attempt == 0 and m.phase == Phase.EVALUATING


def test_resumed_after_the_last_round_only_the_final_evaluation_is_left():
    m = machine(total_rounds=2)
    m.resume(version=2, first_attempt=0)
    for s in "abc":
        m.join(s)
    assert m.poll(0) == Event.EVALUATION_STARTED and m.phase == Phase.EVALUATING
    assert m.task("a").kind == "EVALUATE" and m.task("a").round == 2


def test_resume_only_before_anything_started():
    m = started()
    with pytest.raises(ProtocolError, match="resume in phase training"):
        m.resume(version=1, first_attempt=0)


def test_a_silo_the_machine_does_not_know_is_told_to_join_not_refused_for_good():
    """After a restart a silo may still be training: its report is a precondition failure (join
    first, then resend), not a permission refusal that would stop it."""
    m = machine(min_silos=2)
    m.resume(version=0, first_attempt=1)
    for s in "ab":
        m.join(s)
    assert m.poll(0) == Event.ROUND_STARTED
    with pytest.raises(ProtocolError, match="has not joined this run") as exc:
        m.record(Phase.TRAINING, "c", 1, 0)
    assert exc.value.status == "FAILED_PRECONDITION"


def test_a_phase_closed_at_its_deadline_names_the_silos_it_waited_for():
    m = started()
    m.record(Phase.TRAINING, "a", 1, 1)
    m.record(Phase.TRAINING, "b", 1, 1)
    assert m.poll(5) is None and not m.missing  # still waiting for c
    assert m.poll(11) == Event.REPORTS_CLOSED
    assert m.missing == {"c"} and m.missing_phase == "training"
    m.open_upload(11)
    m.record(Phase.UPLOADING, "a", 1, 12)
    assert m.poll(17) == Event.ROUND_RETRY  # below quorum: redone, and b is named
    assert m.missing == {"b"} and m.missing_phase == "uploading"
