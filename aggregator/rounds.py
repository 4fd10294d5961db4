"""The round state machine: who may do what, when. Pure logic; time is passed in, no I/O.

Phases: WAITING (for ``min_silos`` to join) -> TRAINING round r (participants train and *report*:
importance and sketches) -> PLANNING (the caller computes coefficients) -> UPLOADING (reporters send
``alpha * delta``) -> AGGREGATING -> next round ... -> EVALUATING (every silo evaluates the final
global model) -> DONE. Each of the two collecting phases closes when everyone expected has answered,
or at its deadline if at least ``quorum`` did; below quorum the round is redone from the same global
model (at most ``max_retries`` times), so a failed round never changes the model. Messages for a
closed phase, from an outsider or sent twice are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from fcmoe.errors import ProtocolError


class Phase(str, Enum):
    WAITING = "waiting"
    TRAINING = "training"
    PLANNING = "planning"
    UPLOADING = "uploading"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"
    DONE = "done"


class Event(str, Enum):
    ROUND_STARTED = "round_started"
    REPORTS_CLOSED = "reports_closed"  # the caller plans coefficients, then calls open_upload()
    CLOSE_ROUND = "close_round"  # the caller aggregates, then calls complete_round()
    ROUND_RETRY = "round_retry"  # quorum missed: the caller discards the round's partial state
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(frozen=True)
class TaskView:
    kind: str  # "WAIT" | "TRAIN" | "UPLOAD" | "EVALUATE" | "DONE"
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
    phase: Phase = Phase.WAITING
    round: int = 0  # current (or last) round, 1-based
    version: int = 0  # completed rounds = version of the global model
    joined: set[str] = field(default_factory=set)
    participants: frozenset[str] = frozenset()
    reported: set[str] = field(default_factory=set)
    uploaders: frozenset[str] = frozenset()
    uploaded: set[str] = field(default_factory=set)
    evaluated: set[str] = field(default_factory=set)
    deadline: float = 0.0
    retries: int = 0
    outcome: str = ""

    # -- silo actions -------------------------------------------------------------------------
    def join(self, silo: str) -> None:
        if self.phase == Phase.DONE:
            raise ProtocolError("the run is over", "FAILED_PRECONDITION")
        self.joined.add(silo)

    def task(self, silo: str) -> TaskView:
        if self.phase == Phase.DONE:
            return TaskView("DONE", self.round, message=self.outcome)
        if silo not in self.joined:
            return TaskView("WAIT", message="join first")
        if self.phase == Phase.TRAINING and silo in self.participants and silo not in self.reported:
            return TaskView("TRAIN", self.round, self.deadline)
        if self.phase == Phase.UPLOADING and silo in self.uploaders and silo not in self.uploaded:
            return TaskView("UPLOAD", self.round, self.deadline)
        if self.phase == Phase.EVALUATING and silo in self.participants and silo not in self.evaluated:
            return TaskView("EVALUATE", self.version, self.deadline)
        return TaskView("WAIT", self.round, message=f"phase {self.phase.value}")

    def check_report(self, silo: str, round_: int, now: float) -> None:
        self._check(Phase.TRAINING, self.participants, self.reported, "report", silo, round_, now)

    def record_report(self, silo: str, round_: int, now: float) -> None:
        self.check_report(silo, round_, now)
        self.reported.add(silo)

    def check_upload(self, silo: str, round_: int, now: float) -> None:
        self._check(Phase.UPLOADING, self.uploaders, self.uploaded, "upload", silo, round_, now)

    def record_upload(self, silo: str, round_: int, now: float) -> None:
        self.check_upload(silo, round_, now)
        self.uploaded.add(silo)

    def record_evaluation(self, silo: str, version: int) -> None:
        if self.phase != Phase.EVALUATING or version != self.version or silo not in self.participants:
            raise ProtocolError(f"no evaluation of model version {version} is expected from {silo!r}")
        if silo in self.evaluated:
            raise ProtocolError(f"silo {silo!r} already reported version {version}", "ALREADY_EXISTS")
        self.evaluated.add(silo)

    def _check(self, phase: Phase, expected: frozenset[str], done: set[str], what: str,
               silo: str, round_: int, now: float) -> None:
        if self.phase != phase or round_ != self.round:
            raise ProtocolError(f"no {what} for round {round_} is open (phase {self.phase.value}, round {self.round})")
        if silo not in expected:
            raise ProtocolError(f"silo {silo!r} is not expected to {what} in round {round_}", "PERMISSION_DENIED")
        if silo in done:
            raise ProtocolError(f"silo {silo!r} already sent its {what} for round {round_}", "ALREADY_EXISTS")
        if now > self.deadline:
            raise ProtocolError(f"round {round_} {what} deadline passed", "DEADLINE_EXCEEDED")

    # -- time ---------------------------------------------------------------------------------
    def poll(self, now: float) -> Event | None:
        if self.phase == Phase.WAITING:
            if len(self.joined) >= self.min_silos:
                self._start_round(self.version + 1, now)
                return Event.ROUND_STARTED
            if now > self.created_at + self.join_timeout_s:
                return self._abort(f"only {len(self.joined)} of {self.min_silos} silos joined in time")
        elif self.phase == Phase.TRAINING:
            return self._collecting(self.reported, self.participants, now, Phase.PLANNING, Event.REPORTS_CLOSED)
        elif self.phase == Phase.UPLOADING:
            return self._collecting(self.uploaded, self.uploaders, now, Phase.AGGREGATING, Event.CLOSE_ROUND)
        elif self.phase == Phase.EVALUATING:
            if self.evaluated >= self.participants or now > self.deadline:
                self.phase = Phase.DONE
                self.outcome = f"completed {self.version} rounds"
                return Event.FINISHED
        return None

    def _collecting(self, got: set[str], expected: frozenset[str], now: float, next_phase: Phase,
                    event: Event) -> Event | None:
        if got >= expected or (now > self.deadline and len(got) >= self.quorum):
            self.phase = next_phase
            return event
        if now <= self.deadline:
            return None
        return self._retry_or_abort(now, f"{len(got)} of {len(expected)} answered in {self.phase.value}, "
                                         f"quorum {self.quorum}")

    def fail_round(self, now: float, reason: str) -> Event:
        """The caller could not aggregate (e.g. a non-finite result): redo the round or give up."""
        if self.phase != Phase.AGGREGATING:
            raise ProtocolError(f"fail_round in phase {self.phase.value}")
        return self._retry_or_abort(now, reason)

    def _retry_or_abort(self, now: float, reason: str) -> Event:
        if self.retries >= self.max_retries:
            return self._abort(f"round {self.round}: {reason}, after {self.retries + 1} attempts")
        self.retries += 1
        self._start_round(self.round, now)
        return Event.ROUND_RETRY

    def open_upload(self, now: float) -> None:
        """The caller planned coefficients for every reporter: collect their uploads."""
        if self.phase != Phase.PLANNING:
            raise ProtocolError(f"open_upload in phase {self.phase.value}")
        self.phase = Phase.UPLOADING
        self.uploaders = frozenset(self.reported)
        self.uploaded = set()
        self.deadline = now + self.upload_timeout_s

    def complete_round(self, now: float) -> None:
        """The caller applied the round's aggregate: advance the model version."""
        if self.phase != Phase.AGGREGATING:
            raise ProtocolError(f"complete_round in phase {self.phase.value}")
        self.version = self.round
        self.retries = 0
        if self.version >= self.total_rounds:
            self.phase = Phase.EVALUATING
            self.participants = frozenset(self.joined)
            self.evaluated = set()
            self.deadline = now + self.round_timeout_s
        else:
            self._start_round(self.version + 1, now)

    def _start_round(self, round_: int, now: float) -> None:
        self.phase = Phase.TRAINING
        self.round = round_
        self.participants = frozenset(self.joined)
        self.reported, self.uploaders, self.uploaded = set(), frozenset(), set()
        self.deadline = now + self.round_timeout_s

    def _abort(self, reason: str) -> Event:
        self.phase = Phase.DONE
        self.outcome = f"aborted: {reason}"
        return Event.ABORTED

    @property
    def succeeded(self) -> bool:
        return self.phase == Phase.DONE and not self.outcome.startswith("aborted")
