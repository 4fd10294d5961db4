"""The round state machine: who may do what, when. Pure logic; time is passed in, no I/O.

Phases: WAITING (for ``min_silos`` to join) -> TRAINING round r -> AGGREGATING -> ... -> EVALUATING
(every silo evaluates the final global model) -> DONE. A round closes when every participant has
submitted, or at its deadline if at least ``quorum`` did; below quorum it is redone from the same global
model (at most ``max_retries`` times), so a failed round never changes the model. Updates that arrive
for a closed round, from a non-participant or twice are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from fcmoe.errors import ProtocolError


class Phase(str, Enum):
    WAITING = "waiting"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"
    DONE = "done"


class Event(str, Enum):
    ROUND_STARTED = "round_started"
    CLOSE_ROUND = "close_round"  # the caller aggregates, then calls complete_round()
    ROUND_RETRY = "round_retry"  # quorum missed: the caller discards the partial sums
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(frozen=True)
class TaskView:
    kind: str  # "WAIT" | "TRAIN" | "EVALUATE" | "DONE"
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
    phase: Phase = Phase.WAITING
    round: int = 0  # current (or last) round, 1-based
    version: int = 0  # completed rounds = version of the global model
    joined: set[str] = field(default_factory=set)
    participants: frozenset[str] = frozenset()
    submitted: set[str] = field(default_factory=set)
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
        if self.phase == Phase.TRAINING and silo in self.participants and silo not in self.submitted:
            return TaskView("TRAIN", self.round, self.deadline)
        if self.phase == Phase.EVALUATING and silo in self.participants and silo not in self.evaluated:
            return TaskView("EVALUATE", self.version, self.deadline)
        return TaskView("WAIT", self.round, message=f"phase {self.phase.value}")

    def check_update(self, silo: str, round_: int, now: float) -> None:
        if self.phase != Phase.TRAINING or round_ != self.round:
            raise ProtocolError(f"round {round_} is not open (phase {self.phase.value}, round {self.round})")
        if silo not in self.participants:
            raise ProtocolError(f"silo {silo!r} is not a participant of round {round_}", "PERMISSION_DENIED")
        if silo in self.submitted:
            raise ProtocolError(f"silo {silo!r} already submitted round {round_}", "ALREADY_EXISTS")
        if now > self.deadline:
            raise ProtocolError(f"round {round_} deadline passed", "DEADLINE_EXCEEDED")

    def record_update(self, silo: str, round_: int, now: float) -> None:
        self.check_update(silo, round_, now)
        self.submitted.add(silo)

    def record_evaluation(self, silo: str, version: int) -> None:
        if self.phase != Phase.EVALUATING or version != self.version or silo not in self.participants:
            raise ProtocolError(f"no evaluation of model version {version} is expected from {silo!r}")
        if silo in self.evaluated:
            raise ProtocolError(f"silo {silo!r} already reported version {version}", "ALREADY_EXISTS")
        self.evaluated.add(silo)

    # -- time ---------------------------------------------------------------------------------
    def poll(self, now: float) -> Event | None:
        if self.phase == Phase.WAITING:
            if len(self.joined) >= self.min_silos:
                self._start_round(self.version + 1, now)
                return Event.ROUND_STARTED
            if now > self.created_at + self.join_timeout_s:
                return self._abort(f"only {len(self.joined)} of {self.min_silos} silos joined in time")
        elif self.phase == Phase.TRAINING:
            if self.submitted >= self.participants:
                self.phase = Phase.AGGREGATING
                return Event.CLOSE_ROUND
            if now > self.deadline:
                if len(self.submitted) >= self.quorum:
                    self.phase = Phase.AGGREGATING
                    return Event.CLOSE_ROUND
                if self.retries >= self.max_retries:
                    return self._abort(
                        f"round {self.round}: {len(self.submitted)} updates < quorum {self.quorum} "
                        f"after {self.retries + 1} attempts"
                    )
                self.retries += 1
                self._start_round(self.round, now)
                return Event.ROUND_RETRY
        elif self.phase == Phase.EVALUATING:
            if self.evaluated >= self.participants or now > self.deadline:
                self.phase = Phase.DONE
                self.outcome = f"completed {self.version} rounds"
                return Event.FINISHED
        return None

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
        self.submitted = set()
        self.deadline = now + self.round_timeout_s

    def _abort(self, reason: str) -> Event:
        self.phase = Phase.DONE
        self.outcome = f"aborted: {reason}"
        return Event.ABORTED

    @property
    def succeeded(self) -> bool:
        return self.phase == Phase.DONE and not self.outcome.startswith("aborted")
