"""The round state machine: who may do what, when. Pure logic; time is passed in, no I/O.

Phases: WAITING (for ``min_silos`` to join) -> TRAINING round r (participants train and *report*:
importance, key adverts) -> [SHARING: silos send sealed Shamir shares, secure modes] -> [SKETCHING:
FC-MoE's weighted keyed sketches, masked or plain -> (CHECKING -> UNMASKING, mode masking) ->
AGREEING: each silo scores itself against the sketch sums] -> UPLOADING (``alpha * delta``, masked,
encrypted or plain) -> [CHECKING: survivors sign the round view and survivor list -> UNMASKING:
survivors reveal shares, mode masking | DECRYPTING: the key holder decrypts group sums, mode ckks] ->
next round ... -> EVALUATING (every silo evaluates the final global model; nobody with
``final_evaluation`` off) -> DONE.

Every collecting phase closes when everyone expected has answered, or at its deadline if at least
its ``minimum`` did; the machine then sits in PLANNING and the caller decides what comes next
(:meth:`open_phase`, :meth:`complete_round` or :meth:`fail_round`). Below the minimum the round is
redone from the same global model (at most ``max_retries`` times, each a new ``attempt`` with fresh
keys), so a failed round never changes the model. Messages for a closed phase, from an outsider or
sent twice are refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from fcmoe.errors import ProtocolError


class Phase(str, Enum):
    WAITING = "waiting"
    TRAINING = "training"
    PLANNING = "planning"  # a collecting phase closed; the caller plans the next step
    SHARING = "sharing"
    SKETCHING = "sketching"
    CHECKING = "checking"
    AGREEING = "agreeing"
    UPLOADING = "uploading"
    UNMASKING = "unmasking"
    DECRYPTING = "decrypting"
    EVALUATING = "evaluating"
    DONE = "done"


class Event(str, Enum):
    ROUND_STARTED = "round_started"
    REPORTS_CLOSED = "reports_closed"  # the caller plans coefficients, then opens the next phase
    SHARES_CLOSED = "shares_closed"
    SKETCHES_CLOSED = "sketches_closed"
    CHECK_CLOSED = "check_closed"
    AGREEMENT_CLOSED = "agreement_closed"
    UPLOADS_CLOSED = "uploads_closed"
    UNMASK_CLOSED = "unmask_closed"
    DECRYPT_CLOSED = "decrypt_closed"
    ROUND_RETRY = "round_retry"  # a phase missed its minimum: the caller discards the round's partial state
    EVALUATION_STARTED = "final_evaluation_started"  # from WAITING only when resumed after the last round
    FINISHED = "finished"
    ABORTED = "aborted"


# collecting phase -> (what a silo sends in it, the task that asks for it, the event that closes it)
COLLECTING = {
    Phase.TRAINING: ("report", "TRAIN", Event.REPORTS_CLOSED),
    Phase.SHARING: ("shares", "SHARE", Event.SHARES_CLOSED),
    Phase.SKETCHING: ("sketch", "SKETCH", Event.SKETCHES_CLOSED),
    Phase.CHECKING: ("consistency signature", "CHECK", Event.CHECK_CLOSED),
    Phase.AGREEING: ("agreement", "AGREE", Event.AGREEMENT_CLOSED),
    Phase.UPLOADING: ("upload", "UPLOAD", Event.UPLOADS_CLOSED),
    Phase.UNMASKING: ("unmask", "UNMASK", Event.UNMASK_CLOSED),
    Phase.DECRYPTING: ("decryption", "DECRYPT", Event.DECRYPT_CLOSED),
}
ATTEMPT_BITS = 16  # session = round << ATTEMPT_BITS | attempt
# A silo process heard from this recently is live: a second process joining under its name is refused.
# Idle silos long-poll every 5 s and are marked seen at both ends of a poll, so 3 polls' worth; capped
# by the lease, so a crashed silo's restart is let in no later than it would be left out of rounds.
DUPLICATE_WINDOW_S = 15.0
MAX_ATTEMPTS = 1 << ATTEMPT_BITS


@dataclass(frozen=True)
class TaskView:
    kind: str  # "JOIN" | "WAIT" | "EVALUATE" | "DONE" or the task of a collecting phase (COLLECTING)
    round: int = 0
    deadline: float = 0.0
    message: str = ""


@dataclass
class RoundMachine:
    total_rounds: int
    min_silos: int
    quorum: int
    round_timeout_s: float
    join_timeout_s: float
    max_retries: int
    created_at: float
    upload_timeout_s: float = 300.0
    lease_s: float = float("inf")  # a joined silo not heard from for longer is left out of new rounds
    final_evaluation: bool = True  # False: nobody is asked to evaluate the final model; the run finishes
    phase: Phase = Phase.WAITING
    round: int = 0  # current (or last) round, 1-based
    version: int = 0  # completed rounds = version of the global model
    joined: set[str] = field(default_factory=set)
    last_seen: dict[str, float] = field(default_factory=dict)
    instances: dict[str, str] = field(default_factory=dict)  # silo -> the process id of its accepted Join
    participants: frozenset[str] = frozenset()
    expected: frozenset[str] = frozenset()  # who must answer the current collecting phase
    minimum: int = 0  # answers needed to close it at its deadline
    answered: dict[Phase, set[str]] = field(default_factory=dict)  # per collecting phase of this round
    declined: set[str] = field(default_factory=set)  # participants that declined this round (e.g. budget)
    evaluated: set[str] = field(default_factory=set)
    deadline: float = 0.0
    retries: int = 0
    first_attempt: int = 0  # attempts of this round begun before a restart (sessions never repeat)
    outcome: str = ""
    missing: frozenset[str] = frozenset()  # who the last phase to close at its deadline waited for in vain
    missing_phase: str = ""

    @property
    def reported(self) -> set[str]:
        return self.answered.get(Phase.TRAINING, set())

    @property
    def uploaded(self) -> set[str]:
        return self.answered.get(Phase.UPLOADING, set())

    @property
    def attempt(self) -> int:
        """This round's attempt number, counted across restarts of the aggregator."""
        return self.first_attempt + self.retries

    @property
    def session(self) -> int:
        """Binds keys, shares and masks to one attempt of one round (a retried or resumed round gets fresh ones)."""
        if self.attempt >= MAX_ATTEMPTS:
            raise ProtocolError(f"round {self.round}: {self.attempt} attempts, the session space is spent")
        return self.round << ATTEMPT_BITS | self.attempt

    def resume(self, version: int, first_attempt: int) -> None:
        """Restarted from the checkpoint of ``version``: the next round (or the final evaluation) starts
        once enough silos have joined again; its attempts continue after ``first_attempt - 1``."""
        if self.phase != Phase.WAITING:
            raise ProtocolError(f"resume in phase {self.phase.value}")
        self.version = self.round = version
        self.first_attempt = first_attempt

    @property
    def duplicate_window_s(self) -> float:
        return min(DUPLICATE_WINDOW_S, self.lease_s)

    # -- silo actions -------------------------------------------------------------------------
    def join(self, silo: str, now: float | None = None, instance: str = "") -> None:
        """``silo`` joins from process ``instance`` (empty: a client that does not say; not checked).
        Refused (ALREADY_EXISTS) while another process of that name is live: the first keeps its place."""
        if self.phase == Phase.DONE:
            raise ProtocolError("the run is over", "FAILED_PRECONDITION")
        at = self.created_at if now is None else now
        held = self.instances.get(silo, "")
        if instance and held and held != instance and silo in self.joined:
            silent = at - self.last_seen.get(silo, at)
            if silent <= self.duplicate_window_s:
                raise ProtocolError(
                    f"silo {silo!r} is already joined from another live process (heard from {silent:.1f} s ago); "
                    f"a restarted silo is let in after {self.duplicate_window_s:g} s of silence", "ALREADY_EXISTS")
        if instance:
            self.instances[silo] = instance
        self.joined.add(silo)
        self.seen(silo, at)

    def stale_instance(self, silo: str, instance: str) -> bool:
        """Whether ``instance`` is a process of ``silo`` that another process has replaced since."""
        held = self.instances.get(silo, "")
        return bool(instance and held and instance != held)

    def seen(self, silo: str, now: float) -> None:
        """``silo`` is alive (it asked for a task or sent something)."""
        if silo in self.joined:
            self.last_seen[silo] = max(now, self.last_seen.get(silo, now))

    def live(self, now: float) -> frozenset[str]:
        """Joined silos heard from within the lease: who a new round or the final evaluation waits for."""
        return frozenset(s for s in self.joined if now - self.last_seen.get(s, now) <= self.lease_s)

    def task(self, silo: str) -> TaskView:
        if self.phase == Phase.DONE:
            return TaskView("DONE", self.round, message=self.outcome)
        if silo not in self.joined:  # e.g. the aggregator restarted since this silo joined
            return TaskView("JOIN", message="join first")
        if (self.phase in COLLECTING and silo in self.expected and silo not in self.answered[self.phase]
                and silo not in self.declined):
            return TaskView(COLLECTING[self.phase][1], self.round, self.deadline)
        if self.phase == Phase.EVALUATING and silo in self.participants and silo not in self.evaluated:
            return TaskView("EVALUATE", self.version, self.deadline)
        return TaskView("WAIT", self.round, message=f"phase {self.phase.value}")

    def check(self, phase: Phase, silo: str, round_: int, now: float) -> None:
        """Refuse (ProtocolError) unless ``silo`` may answer ``phase`` of ``round_`` now."""
        what = COLLECTING[phase][0]
        if self.phase != phase or round_ != self.round:
            raise ProtocolError(f"no {what} for round {round_} is open (phase {self.phase.value}, round {self.round})")
        if silo not in self.joined:  # e.g. the aggregator restarted while this silo was training
            raise ProtocolError(f"silo {silo!r} has not joined this run (join first)")
        if silo not in self.expected:
            raise ProtocolError(f"silo {silo!r} is not expected to send {what} in round {round_}", "PERMISSION_DENIED")
        if silo in self.answered[phase] or (phase == Phase.TRAINING and silo in self.declined):
            raise ProtocolError(f"silo {silo!r} already sent its {what} for round {round_}", "ALREADY_EXISTS")
        if now > self.deadline:
            raise ProtocolError(f"round {round_} {what} deadline passed", "DEADLINE_EXCEEDED")

    def record(self, phase: Phase, silo: str, round_: int, now: float) -> None:
        self.check(phase, silo, round_, now)
        self.answered[phase].add(silo)

    def decline(self, silo: str, round_: int, now: float) -> None:
        """``silo`` will not train this round: the training phase no longer waits for it."""
        self.check(Phase.TRAINING, silo, round_, now)
        self.declined.add(silo)

    def record_evaluation(self, silo: str, version: int) -> None:
        if self.phase != Phase.EVALUATING or version != self.version or silo not in self.participants:
            raise ProtocolError(f"no evaluation of model version {version} is expected from {silo!r}")
        if silo in self.evaluated:
            raise ProtocolError(f"silo {silo!r} already reported version {version}", "ALREADY_EXISTS")
        self.evaluated.add(silo)

    # -- time ---------------------------------------------------------------------------------
    def poll(self, now: float) -> Event | None:
        if self.phase == Phase.WAITING:
            if len(self.live(now)) >= self.min_silos:
                if self.version >= self.total_rounds:
                    self._start_evaluation(now)
                    return Event.EVALUATION_STARTED
                self._start_round(self.version + 1, now)
                return Event.ROUND_STARTED
            if now > self.created_at + self.join_timeout_s:
                return self._abort(f"only {len(self.joined)} of {self.min_silos} silos joined in time")
        elif self.phase in COLLECTING:
            got = self.answered[self.phase]
            over = got | self.declined >= self.expected or now > self.deadline  # nothing more will come
            if over:
                self.missing, self.missing_phase = frozenset(self.expected - got - self.declined), self.phase.value
            if over and len(got) >= self.minimum:
                event = COLLECTING[self.phase][2]
                self.phase = Phase.PLANNING
                return event
            if over:
                declined = f", {len(self.declined)} declined" if self.declined else ""
                return self._retry_or_abort(now, f"{len(got)} of {len(self.expected)} answered in "
                                                 f"{self.phase.value}{declined}, {self.minimum} needed")
        elif self.phase == Phase.EVALUATING:
            if self.evaluated >= self.participants or now > self.deadline:
                self.phase = Phase.DONE
                self.outcome = f"completed {self.version} rounds"
                return Event.FINISHED
        return None

    def fail_round(self, now: float, reason: str) -> Event:
        """The caller cannot go on with this attempt (e.g. a non-finite aggregate): redo the round or give up."""
        if self.phase != Phase.PLANNING:
            raise ProtocolError(f"fail_round in phase {self.phase.value}")
        return self._retry_or_abort(now, reason)

    def _retry_or_abort(self, now: float, reason: str) -> Event:
        if self.retries >= self.max_retries:
            return self._abort(f"round {self.round}: {reason}, after {self.attempt + 1} attempts")
        self.retries += 1
        self._start_round(self.round, now)
        return Event.ROUND_RETRY

    def open_phase(self, phase: Phase, expected: Iterable[str], minimum: int, now: float, timeout_s: float) -> None:
        """The caller planned the next step of this round: collect ``phase`` from ``expected``."""
        if self.phase != Phase.PLANNING or phase not in COLLECTING or phase == Phase.TRAINING:
            raise ProtocolError(f"open {phase.value} in phase {self.phase.value}")
        self.phase = phase
        self.expected = frozenset(expected)
        self.minimum = minimum
        self.answered[phase] = set()
        self.deadline = now + timeout_s

    def open_upload(self, now: float) -> None:
        """Plaintext rounds: every reporter uploads; the round needs ``quorum`` of them."""
        self.open_phase(Phase.UPLOADING, self.reported, self.quorum, now, self.upload_timeout_s)

    def complete_round(self, now: float) -> None:
        """The caller applied the round's aggregate: advance the model version."""
        if self.phase != Phase.PLANNING:
            raise ProtocolError(f"complete_round in phase {self.phase.value}")
        self.version = self.round
        self.retries = self.first_attempt = 0
        if self.version >= self.total_rounds:
            self._start_evaluation(now)
        else:
            self._start_round(self.version + 1, now)

    def _start_evaluation(self, now: float) -> None:
        self.phase = Phase.EVALUATING
        self.participants = self.live(now) if self.final_evaluation else frozenset()  # none: FINISHED at next poll
        self.evaluated = set()
        self.deadline = now + self.round_timeout_s

    def _start_round(self, round_: int, now: float) -> None:
        self.phase = Phase.TRAINING
        self.round = round_
        self.participants = self.expected = self.live(now)
        self.minimum = self.quorum
        self.answered = {Phase.TRAINING: set()}
        self.declined = set()
        self.deadline = now + self.round_timeout_s

    def _abort(self, reason: str) -> Event:
        self.phase = Phase.DONE
        self.outcome = f"aborted: {reason}"
        return Event.ABORTED

    @property
    def succeeded(self) -> bool:
        return self.phase == Phase.DONE and not self.outcome.startswith("aborted")
