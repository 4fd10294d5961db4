"""What an operator may see of a running federation, as plain data: round, phase and deadline, each
silo's state and liveness, pooled losses per model version, traffic and refusals.

Pure functions of the round machine and the metrics rows (no I/O, no locking: the coordinator calls
:func:`run_status` under its lock), so the status endpoint (aggregator/monitor.py) and its tests share
one definition of "late". Nothing here is any silo's data or update: only what the aggregator's log
lines already say, gathered in one place.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aggregator.rounds import COLLECTING, Phase, RoundMachine

# Idle silos long-poll every 5 s and are marked seen at both ends of a poll: three polls' silence
# means the silo is gone or cut off, unless it is working on a task whose deadline is still ahead.
LATE_AFTER_S = 15.0

SILO_STATES = ("answered", "working", "declined", "idle", "late")


@dataclass
class Traffic:
    """Counters the aggregator's handlers add to from their threads: bytes received per silo, RPCs
    refused per (rpc, gRPC status). Totals since this process started, as Prometheus counters are."""

    received: dict[str, int] = field(default_factory=dict)
    refused: dict[tuple[str, str], int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_received(self, silo: str, nbytes: int) -> None:
        with self._lock:
            self.received[silo] = self.received.get(silo, 0) + int(nbytes)

    def add_refused(self, rpc: str, code: str) -> None:
        with self._lock:
            self.refused[(rpc, code)] = self.refused.get((rpc, code), 0) + 1

    def snapshot(self) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
        with self._lock:
            return dict(self.received), dict(self.refused)


def _answering(machine: RoundMachine) -> tuple[frozenset[str], set[str]]:
    """Who the open phase waits for, and who of them has answered (empty outside a collecting phase)."""
    if machine.phase in COLLECTING:
        return machine.expected, machine.answered.get(machine.phase, set())
    if machine.phase == Phase.EVALUATING:
        return machine.participants, machine.evaluated
    return frozenset(), set()


def silo_states(machine: RoundMachine, now: float, late_after_s: float = LATE_AFTER_S) -> dict[str, dict[str, Any]]:
    """Per joined silo: ``state`` (one of :data:`SILO_STATES`) and seconds since it was last heard from.

    ``working``: the open phase asked it for something and the deadline is ahead (a silo training for
    minutes sends nothing meanwhile); ``late``: it missed the open phase's deadline, or nothing is asked
    of it and it has been silent for ``late_after_s`` (killed, cut off)."""
    expected, answered = _answering(machine)
    out = {}
    for silo in sorted(machine.joined):
        silent = max(0.0, now - machine.last_seen.get(silo, now))
        if silo in machine.declined and machine.phase in COLLECTING:
            state = "declined"
        elif silo in expected:
            state = "answered" if silo in answered else ("working" if now <= machine.deadline else "late")
        else:
            state = "late" if silent > late_after_s else "idle"
        out[silo] = {"state": state, "last_seen_seconds": round(silent, 3)}
    return out


def _losses(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pooled held-out losses per model version: the mean over domains and each domain's."""
    out = []
    for row in rows:
        entry = {"version": row["round"], "global_loss": row.get("global_loss"), "local_loss": row.get("local_loss"),
                 "global_by_domain": {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("global_loss/")}}
        if row.get("round_seconds") is not None:
            entry["round_seconds"] = row["round_seconds"]
        for key in ("aggregator_secure_seconds", "updates"):
            if key in row:
                entry[key] = row[key]
        out.append(entry)
    return out


def run_status(machine: RoundMachine, now: float, *, run_id: str, strategy: str, mode: str, min_group_size: int,
               rows: Sequence[Mapping[str, Any]], traffic: Traffic,
               privacy: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
    """Everything the endpoint serves, as one JSON-ready dict (the shape of ``/api/status``). ``privacy``:
    per DP silo, the epsilon, budget and delta it last reported and the round (its claim; its signed
    ledger is the proof)."""
    silos = silo_states(machine, now)
    received, refused = traffic.snapshot()
    for name, entry in silos.items():
        entry["bytes_received"] = received.get(name, 0)
    open_phase = machine.phase in COLLECTING or machine.phase == Phase.EVALUATING
    return {
        "run_id": run_id,
        "strategy": strategy,
        "secure_aggregation": {"mode": mode, "min_group_size": min_group_size},
        "rounds": machine.total_rounds,
        "round": machine.round,
        "rounds_completed": machine.version,
        "phase": machine.phase.value,
        "attempt": machine.attempt,
        "deadline_seconds": round(max(0.0, machine.deadline - now), 3) if open_phase else None,
        "outcome": machine.outcome or None,
        "min_silos": machine.min_silos,
        "silos": silos,
        "late": [name for name, entry in silos.items() if entry["state"] == "late"],
        "losses": _losses(rows),
        "privacy": {name: dict(p) for name, p in sorted((privacy or {}).items())},
        "refused": [{"rpc": rpc, "code": code, "count": n} for (rpc, code), n in sorted(refused.items())],
    }
