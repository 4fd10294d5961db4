"""Ratio benchmarks that mean the same on a loaded machine: interleaved repeats, medians with spread.

A benchmark that measures one side and then the other compares two different machines whenever
something else starts or stops in between (another job on the cores, a thermal or frequency change):
a ratio of 0.11 says nothing about the code. Here the sides take turns instead, A B C, C B A, A B C ...
(every other repeat reversed, so a drift that is linear in time weighs on each side alike and each
pair stays adjacent), every repeat yields one figure per side, and a ratio is computed per repeat,
between figures measured next to each other, then summarised by its median and spread.

- :func:`interleaved` runs the schedule; a side whose measurement raises (:class:`Aborted` for a run
  that could not finish, e.g. a deadline; any other exception for an error) is recorded as aborted
  with its reason and left out of the later repeats, the other sides going on.
- :func:`take_turns` interleaves finer, for long runs: the sides' jobs run at once in one thread, a
  step of each in turn and in step with each other (e.g. round k of every federation before round
  k + 1 of any), each timing itself on a :class:`PausableClock` that runs only during its own steps.
- :func:`spread` and :func:`paired_ratios` / :func:`ratio_summary` are the summary maths.
- :func:`background_load` starts N CPU-bound processes for the duration of a block (``--load N``),
  so that a benchmark's claim to hold under load can be measured, and always stops them.

Taking turns removes what changes *between* two measurements; it cannot remove a load that changes
the sides' costs unequally. The one that matters here: with as many torch threads as cores, a
CPU-bound neighbour stalls every parallel region on its descheduled thread, so torch's multi-threaded
work slows far more than single-threaded work (masking, the crypto), and the ratio itself moves.
With one torch thread (``--threads 1`` in benches.secagg and benches.dp) both sides slow alike.
"""

from __future__ import annotations

import argparse
import atexit
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


class Aborted(Exception):
    """A measurement that ran but could not finish (a deadline passed, a run gave up); the message is the reason."""


@dataclass
class Runs:
    """One side's results over the repeats: ``results[i]`` was measured in repeat ``repeats[i]``."""

    name: str
    results: list[Any] = field(default_factory=list)
    repeats: list[int] = field(default_factory=list)
    status: str = "ok"
    reason: str | None = None
    aborted_in_repeat: int | None = None

    @property
    def aborted(self) -> bool:
        return self.status == "aborted"

    def by_repeat(self, key: str | Callable[[Any], float | None]) -> dict[int, float]:
        """{repeat: figure} over the completed repeats (a figure that is None is left out)."""
        get = key if callable(key) else (lambda r: r.get(key))
        out = {}
        for repeat, result in zip(self.repeats, self.results):
            value = get(result)
            if value is not None:
                out[repeat] = float(value)
        return out

    def status_fields(self) -> dict:
        """``{"status": "ok"}``, or ``{"status": "aborted", "reason": ..., "aborted_in_repeat": k}``."""
        if not self.aborted:
            return {"status": "ok"}
        return {"status": "aborted", "reason": self.reason, "aborted_in_repeat": self.aborted_in_repeat}


def order_for(names: Sequence[str], repeat: int, alternate: bool = True) -> list[str]:
    """The sides' order in a repeat: as given in even repeats, reversed in odd ones (``alternate``)."""
    return list(reversed(names)) if alternate and repeat % 2 else list(names)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Aborted):
        return str(exc)
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    place = f" ({os.path.basename(where[0].filename)}:{where[0].lineno})" if where else ""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}{place}"


def interleaved(names: Sequence[str], measure: Callable[[str, int], Any], repeats: int, *,
                alternate: bool = True, on_result: Callable[[str, int, Any], None] | None = None) -> dict[str, Runs]:
    """Call ``measure(name, repeat)`` for every side in every repeat, the sides taking turns.

    A side whose ``measure`` raises an ``Exception`` is marked aborted (reason: the :class:`Aborted`
    message, else the exception's type, message and place) and not measured again; the others go on.
    ``KeyboardInterrupt`` and ``SystemExit`` are not caught.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    runs = {name: Runs(name) for name in names}
    for repeat in range(repeats):
        for name in order_for(names, repeat, alternate):
            side = runs[name]
            if side.aborted:
                continue
            try:
                result = measure(name, repeat)
            except Exception as exc:  # noqa: BLE001 - any failure of one side is reported, not raised
                side.status, side.reason, side.aborted_in_repeat = "aborted", _reason(exc), repeat
                continue
            side.results.append(result)
            side.repeats.append(repeat)
            if on_result is not None:
                on_result(name, repeat, result)
    return runs


class PausableClock:
    """``time.time()``-like, but running only between :meth:`resume` and :meth:`pause`: the clock of
    one of several jobs that take turns in one thread, so that its deadlines and durations count its
    own turns only, not the others'. Starts at the wall time of its creation, running."""

    def __init__(self) -> None:
        self._base, self._running_since, self.paused_seconds = time.time(), time.perf_counter(), 0.0
        self._paused_since: float | None = None

    def __call__(self) -> float:
        now = time.perf_counter() if self._paused_since is None else self._paused_since
        return self._base + (now - self._running_since) - self.paused_seconds

    def pause(self) -> None:
        if self._paused_since is None:
            self._paused_since = time.perf_counter()

    def resume(self) -> None:
        if self._paused_since is not None:
            self.paused_seconds += time.perf_counter() - self._paused_since
            self._paused_since = None

    @property
    def busy_seconds(self) -> float:
        """Seconds it has run since it was created."""
        return self() - self._base


def take_turns(names: Sequence[str], start: Callable[[str], Generator[float, None, Any]], runs: dict[str, Runs],
               repeat: int = 0, *, alternate: bool = True,
               on_result: Callable[[str, int, Any], None] | None = None) -> None:
    """Run one job per name at once in this thread, a step of each in turn: ``start(name)`` returns a
    generator that does a step of its work between two ``yield progress`` (a number: e.g. rounds
    done) and returns its result. Only the jobs whose progress is the lowest take a step, so that the
    jobs stay in step with each other (round k of every job runs while the others run theirs); the
    order of a sweep is reversed every other sweep. A job's result goes to ``runs[name]`` as measured
    in ``repeat``; a job that raises is marked aborted there (as in :func:`interleaved`), the others go on.
    """
    live = {name: start(name) for name in names if not runs[name].aborted}
    progress = dict.fromkeys(live, -math.inf)
    sweep = 0
    while live:
        floor = min(progress[name] for name in live)
        for name in order_for(list(live), sweep, alternate):
            if progress[name] > floor:
                continue
            side = runs[name]
            try:
                progress[name] = next(live[name])
            except StopIteration as stop:
                del live[name]
                side.results.append(stop.value)
                side.repeats.append(repeat)
                if on_result is not None:
                    on_result(name, repeat, stop.value)
            except Exception as exc:  # noqa: BLE001 - one job's failure is reported, the others go on
                del live[name]
                side.status, side.reason, side.aborted_in_repeat = "aborted", _reason(exc), repeat
        sweep += 1


def spread(values: Sequence[float | None]) -> dict | None:
    """Median, quartiles (inclusive method: the quartiles of 1..5 are 2 and 4), IQR, min, max, count
    and the values themselves; None without any value."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None
    if len(vals) == 1:
        q1 = q3 = vals[0]
    else:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "q1": q1, "q3": q3,
            "iqr": q3 - q1, "n": len(vals), "values": vals}


def paired_ratios(numerator: Mapping[int, float], denominator: Mapping[int, float]) -> list[float]:
    """``numerator[k] / denominator[k]`` for every repeat k both have (in repeat order); a zero
    denominator gives no ratio."""
    return [numerator[k] / denominator[k] for k in sorted(numerator) if denominator.get(k)]


def ratio_summary(numerator: Mapping[int, float], denominator: Mapping[int, float]) -> dict | None:
    """The spread of the per-repeat ratios (``median`` is the figure to quote), plus the ratio of
    the two sides' medians for comparison; None without a single pair."""
    summary = spread(paired_ratios(numerator, denominator))
    if summary is None:
        return None
    den = statistics.median(denominator.values()) if denominator else None
    summary["ratio_of_medians"] = statistics.median(numerator.values()) / den if den else None
    return summary


def exit_code(runs: Sequence[Runs]) -> int:
    """0 unless every side aborted (or there was none)."""
    return 0 if any(not r.aborted for r in runs) else 1


# --- background load ---------------------------------------------------------------------------

# One BLAS thread each, so that N processes keep N cores busy; each stops by itself once its parent is
# gone (re-parented), should the parent die without its ``finally`` running (SIGKILL). With a period
# (argument 1, seconds) it is busy for one period, idle for the next, and so on.
LOAD_SCRIPT = """
import os
import sys
import time
import numpy as np
parent = os.getppid()
period = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
a = np.random.default_rng(0).random((256, 256))
start = time.monotonic()
while os.getppid() == parent:
    if period and int((time.monotonic() - start) / period) % 2:
        time.sleep(min(0.05, period))
        continue
    for _ in range(8):
        b = a @ a
"""
_LOAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_live: set[subprocess.Popen] = set()


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        _live.discard(p)


@atexit.register
def _stop_all() -> None:
    _stop(list(_live))


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a running process (Linux /proc), None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def background_load(processes: int, record: dict | None = None,
                    period: float = 0.0) -> Iterator[list[subprocess.Popen]]:
    """Keep ``processes`` CPU-bound processes (numpy matmuls) running for the duration of the block;
    with a ``period`` (seconds), all of them busy for one period, idle for the next, and so on (a
    load that comes and goes).

    They are stopped when the block ends, whatever ends it (an exception, KeyboardInterrupt; SIGTERM
    is turned into SystemExit meanwhile when this runs in the main thread), and at interpreter exit
    as a last resort. ``record``, if given, receives the load's figures: processes, wall seconds, the
    CPU seconds they used (Linux), which tells that the load did run, and any that exited before the end.
    """
    procs: list[subprocess.Popen] = []
    previous = None
    in_main = threading.current_thread() is threading.main_thread()
    start = time.perf_counter()
    cpu: dict[int, float | None] = {}
    exited: list[int] = []
    try:
        if processes > 0 and in_main:
            def terminated(signum, frame):  # noqa: ARG001
                raise SystemExit(128 + signum)
            previous = signal.signal(signal.SIGTERM, terminated)
        for _ in range(processes):
            proc = subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT, str(period)], env={**os.environ, **_LOAD_ENV},
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            _live.add(proc)
        yield procs
    finally:
        for p in procs:
            if p.poll() is not None:
                exited.append(p.pid)
            cpu[p.pid] = _cpu_seconds(p.pid)
        _stop(procs)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if record is not None:
            used = [c for c in cpu.values() if c is not None]
            record.update({"processes": processes, "period_seconds": period or None,
                           "wall_seconds": time.perf_counter() - start,
                           "cpu_seconds": sum(used) if len(used) == len(procs) and procs else None,
                           "exited_early": exited})


def add_load_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="run N CPU-bound processes beside the benchmark for its duration (default 0)")
    parser.add_argument("--load-period", type=float, default=0.0, metavar="SECONDS",
                        help="the load busy for SECONDS, idle for SECONDS, and so on (default: busy throughout)")
