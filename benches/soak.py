"""Soak benchmark: many light silos against one real aggregator, secure aggregation on.

    python -m benches.soak --silos 32 --rounds 20 --json
    python -m benches.soak --sweep 4,8,16,32 --rounds 20 --json

The aggregator is the real one (``fcmoe aggregator ROLE.yaml`` in its own process, gRPC over
mutual TLS on 127.0.0.1, ``secure_aggregation.mode: masking``), so its peak resident memory can be
read from ``/proc/PID/status`` (VmHWM, polled). Every silo is a real :class:`SiloAgent` with its own
certificate and a real gRPC client; to keep 32 of them affordable on a 2-core machine they run as
threads inside ``--silo-procs`` worker processes (one torch import per process instead of per
silo). Silos are "light": a 1-layer Mixtral-style MoE of hidden size 16 with 4 experts, 2 local
steps of batch 4, one torch thread. Silos sharing a process also share its interpreter lock, so
the figures are a conservative picture of the protocol's scaling, not of real sites working in
parallel on their own machines. They train full expert weights rather than LoRA: PEFT applies LoRA
on fused experts through ``torch.nn.utils.parametrize.cached()``, whose cache is one per process
(keyed by module, cleared only when no thread is inside it), so two silo threads training LoRA at
once reuse each other's freed graphs ("Trying to backward through the graph a second time") or,
under ``no_grad``, stale weights. One silo per process, as deployed, is not affected.

Every round must include every silo (``min_silos`` = quorum = silos) and timeouts are generous so
that a slow shared machine does not drop silos; anything that still goes wrong is counted, never
hidden: rounds missing, failed or retried (aggregator log), rounds closed with fewer updates than
silos, silos and worker processes that exited non-zero, refused RPCs, client retries, TLS
handshake failures. Round time is the aggregator's ``round_seconds`` (metrics.jsonl: from the
round opening to its aggregate being applied). Prints, last, one JSON object; with ``--sweep`` it
holds every size measured in the same invocation, and its top-level figures are the largest size's.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from fcmoe.config import Config, dump_config, load_config, parse_config
from fcmoe.fileio import write_atomic
from fcmoe.logs import log_event, setup_logging
from fcmoe.launch.simulate import role_configs, silo_names

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("fcmoe.bench.soak")

GENEROUS_TIMEOUT_S = 900.0  # any phase: a starved silo on a shared 2-core machine is slow, not gone
POLL_S = 0.25  # how often peak memory and child processes are looked at
SILO_EXIT_GRACE_S = 120.0  # after the aggregator finished: time for every silo to collect DONE and exit

# aggregator log events counted as failures (round_retry is logged when a round is redone)
AGGREGATOR_FAILURE_EVENTS = ("round_failed", "round_retry", "rpc_refused", "run_aborted")
# silo log events worth counting: transient RPC failures that were retried, rounds a silo left
# (a silo that stopped or crashed is counted by its exit status)
SILO_EVENTS = ("rpc_retry", "round_refused", "upload_without_training")


def light_config(silos: int, rounds: int, strategy: str, out: Path) -> Config:
    """One simulation file for the run: light model and data, masking, everyone in every round."""
    return parse_config({
        "run": {"name": f"soak-{silos}", "output_dir": str(out), "seed": 0, "log_level": "INFO"},
        "model": {"source": "builtin",
                  "builtin": {"family": "mixtral", "hidden_size": 16, "intermediate_size": 32, "num_layers": 1,
                              "num_heads": 2, "num_kv_heads": 1, "num_experts": 4, "top_k": 2, "seed": 0},
                  # full expert weights, not LoRA: PEFT's LoRA on fused experts goes through
                  # torch.nn.utils.parametrize.cached(), whose cache is global to the process, so
                  # silos training at once in threads of one process would read each other's stale
                  # tensors (see module docstring)
                  "trainable": {"mode": "full", "router": True}},
        "data": {"builtin": {"domains": ["shift_up", "shift_down", "copy", "reverse"], "partition": "domain",
                             "samples_per_silo": 32, "eval_fraction": 0.25},
                 "max_length": 24, "eval_batch_size": 64},
        "federation": {
            "rounds": rounds, "min_silos": silos, "quorum": silos, "min_group_size": 3,
            "round_timeout_s": GENEROUS_TIMEOUT_S, "upload_timeout_s": GENEROUS_TIMEOUT_S,
            "join_timeout_s": GENEROUS_TIMEOUT_S, "silo_lease_s": GENEROUS_TIMEOUT_S, "max_round_retries": 2,
            "local": {"local_steps": 2, "batch_size": 4, "learning_rate": 0.01, "clip_norm": 1.0},
            "strategy": {"name": strategy},
            "secure_aggregation": {"mode": "masking", "threshold": 0.6, "fixed_point_bits": 32,
                                   "phase_timeout_s": GENEROUS_TIMEOUT_S}},
        # each silo waiting in a long-poll holds one server thread: keep spares for uploads
        "aggregator": {"host": "127.0.0.1", "port": 0, "max_workers": max(64, 2 * silos + 16)},
        "simulation": {"silos": silos, "threads_per_silo": 1, "timeout_s": GENEROUS_TIMEOUT_S},
    })


# -- processes -------------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child, before exec: be sent SIGTERM if the bench dies, even by SIGKILL (Linux only).
    A hard-killed bench must not leave 33 processes behind on a shared machine."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen:
    """A child in its own process group (so the group can be killed), logging to ``log_path``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:  # the bench process starts no threads, so preexec_fn is safe here
        return subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True, preexec_fn=_die_with_parent)  # noqa: PLW1509


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        pass


def stop_all(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """Terminate every still-running child's process group; kill what has not left after ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    end = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def peak_rss_kib(pid: int) -> int | None:
    """The process's resident-memory high-water mark (VmHWM), None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@dataclass
class PeakMemory:
    """Highest VmHWM seen per process; polled, so growth in the last ``POLL_S`` before exit is missed."""

    kib: dict[int, int] = field(default_factory=dict)

    def poll(self, procs: list[subprocess.Popen]) -> None:
        for p in procs:
            value = peak_rss_kib(p.pid)
            if value is not None:
                self.kib[p.pid] = max(value, self.kib.get(p.pid, 0))

    def mib(self, proc: subprocess.Popen) -> float | None:
        value = self.kib.get(proc.pid)
        return round(value / 1024, 1) if value is not None else None


def _wait_for_port(path: Path, aggregator: subprocess.Popen, timeout_s: float) -> int:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        text = path.read_text().strip() if path.exists() else ""
        if text:
            return int(text)
        if aggregator.poll() is not None:
            raise RuntimeError(f"aggregator exited with status {aggregator.returncode} before listening")
        time.sleep(0.1)
    raise RuntimeError(f"aggregator did not listen within {timeout_s:.0f} s")


# -- one size --------------------------------------------------------------------------------------

@dataclass
class Launch:
    """What one size started, filled in as it goes, so that a failure half-way still stops it all."""

    aggregator: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    results: list[Path] = field(default_factory=list)  # one JSON file of silo exit codes per worker
    assignment: list[list[str]] = field(default_factory=list)  # silo names per worker

    @property
    def processes(self) -> list[subprocess.Popen]:
        return ([self.aggregator] if self.aggregator is not None else []) + self.workers


def _launch(config: Config, silo_procs: int, launch: Launch) -> None:
    """Certificates, role files, the aggregator, then the worker processes hosting the silos."""
    from crypto.pki import ensure_pki

    out = config.run.output_dir
    names = silo_names(config.simulation.silos)  # type: ignore[union-attr]
    ensure_pki(out / "certs", names)
    roles, logs = out / "roles", out / "logs"
    (out / "aggregator.port").unlink(missing_ok=True)
    agg_config, _ = role_configs(config, 0)
    dump_config(agg_config, roles / "aggregator.yaml")
    launch.aggregator = _spawn([sys.executable, "-m", "fcmoe", "aggregator", str(roles / "aggregator.yaml"),
                                "--no-progress"], logs / "aggregator.log")
    port = _wait_for_port(out / "aggregator.port", launch.aggregator, timeout_s=300)
    _, silo_configs = role_configs(config, port, secrets.token_hex(32))
    paths = []
    for silo_config in silo_configs:
        path = roles / f"{silo_config.silo.name}.yaml"  # type: ignore[union-attr]
        dump_config(silo_config, path)
        paths.append(path)
    procs = max(1, min(silo_procs, len(paths)))
    for k in range(procs):
        mine = paths[k::procs]  # round-robin: domains spread evenly over workers
        result = out / "workers" / f"worker{k}.json"
        launch.results.append(result)
        launch.assignment.append([p.stem for p in mine])
        launch.workers.append(_spawn([sys.executable, "-m", "benches.soak", "--worker", *map(str, mine),
                                      "--worker-result", str(result)], logs / f"worker{k}.log"))
    log_event(log, "soak_started", silos=len(paths), workers=procs, port=port, output=out)


def _watch(launch: Launch, peaks: PeakMemory, timeout_s: float) -> str:
    """Until the aggregator exits: poll memory; stop early on a dead worker or the time limit."""
    assert launch.aggregator is not None
    deadline = time.monotonic() + timeout_s
    while launch.aggregator.poll() is None:
        peaks.poll(launch.processes)
        dead = [k for k, w in enumerate(launch.workers) if w.poll() not in (None, 0)]
        if dead:
            return f"worker{dead[0]} exited with status {launch.workers[dead[0]].returncode} during the run"
        if time.monotonic() > deadline:
            return f"size exceeded --timeout-s {timeout_s:.0f}"
        time.sleep(POLL_S)
    end = time.monotonic() + SILO_EXIT_GRACE_S
    while any(w.poll() is None for w in launch.workers) and time.monotonic() < end:
        peaks.poll(launch.workers)
        time.sleep(POLL_S)
    if any(w.poll() is None for w in launch.workers):
        return f"silos still running {SILO_EXIT_GRACE_S:.0f} s after the aggregator finished"
    return ""


def run_size(silos: int, rounds: int, silo_procs: int, strategy: str, out: Path, timeout_s: float) -> dict:
    """One federation of ``silos`` silos for ``rounds`` rounds; its figures and failures."""
    config = light_config(silos, rounds, strategy, out)
    peaks = PeakMemory()
    start = time.perf_counter()
    launch = Launch()
    stopped = ""
    try:
        _launch(config, silo_procs, launch)
        stopped = _watch(launch, peaks, timeout_s)
    except RuntimeError as exc:
        stopped = str(exc)
    finally:
        stop_all(launch.processes)
    wall = time.perf_counter() - start
    result = summarise_size(config, launch, peaks, wall, stopped)
    log_event(log, "soak_finished", silos=silos, completed_rounds=result["completed_rounds"],
              median_s=result["round_seconds_median"], failures=sum(result["failures"].values()),
              wall_s=round(wall, 1))
    return result


# -- figures ---------------------------------------------------------------------------------------

def _metrics_rounds(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if r.get("round", 0) >= 1 and "round_seconds" in r]


def count_events(paths: list[Path], events: tuple[str, ...]) -> dict[str, int]:
    """How many log lines carry ``event=NAME`` for each name (missing logs count nothing)."""
    counts = dict.fromkeys(events, 0)
    pattern = re.compile(r"\bevent=(\w+)")
    for path in paths:
        if not path.exists():
            continue
        for match in pattern.finditer(path.read_text(errors="replace")):
            if match.group(1) in counts:
                counts[match.group(1)] += 1
    return counts


PHASE_MARKS = {"round_started": "round_started", "round_retry": "round_started",  # a retry starts afresh
               "coefficients_planned": "coefficients_planned", "unmask_requested": "unmask_requested",
               "round_closed": "round_closed"}
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*\bevent=(\w+) round=(\d+)")


def phase_seconds(aggregator_log: Path) -> dict[str, float | None]:
    """Median time per part of a round, from the aggregator's log timestamps (millisecond lines):
    reports (download, evaluation, training, report), shares + uploads, unmasking + aggregation.
    A retried round counts from its last start."""
    marks: dict[int, dict[str, float]] = {}
    text = aggregator_log.read_text(errors="replace") if aggregator_log.exists() else ""
    for line in text.splitlines():
        m = _LOG_LINE.match(line)
        if m and m.group(2) in PHASE_MARKS:
            when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            marks.setdefault(int(m.group(3)), {})[PHASE_MARKS[m.group(2)]] = when
    spans = {"reports": ("round_started", "coefficients_planned"),
             "shares_and_uploads": ("coefficients_planned", "unmask_requested"),
             "unmask_and_aggregate": ("unmask_requested", "round_closed")}
    return {name: _median([t[b] - t[a] for t in marks.values() if a in t and b in t])
            for name, (a, b) in spans.items()}


def _silo_exit_codes(launch: Launch) -> dict[str, int | None]:
    """Each silo's exit status as its worker recorded it; None when the worker left no record."""
    codes: dict[str, int | None] = {}
    for names, path in zip(launch.assignment, launch.results):
        recorded = json.loads(path.read_text()) if path.exists() else {}
        codes.update({n: recorded.get(n) for n in names})
    return codes


def _mean_over_silos(row: dict, key: str) -> float:
    values = [s.get(key, 0.0) for s in row.get("silos", {}).values()]
    return sum(values) / len(values) if values else 0.0


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def summarise_size(config: Config, launch: Launch, peaks: PeakMemory, wall: float, stopped: str) -> dict:
    out, silos, rounds = config.run.output_dir, config.simulation.silos, config.federation.rounds  # type: ignore[union-attr]
    per_round = _metrics_rounds(out)
    seconds = [r["round_seconds"] for r in per_round]
    logs = out / "logs"
    agg_events = count_events([logs / "aggregator.log"], AGGREGATOR_FAILURE_EVENTS)
    worker_logs = sorted(logs.glob("worker*.log"))
    silo_events = count_events(worker_logs, SILO_EVENTS)
    agg_text = (logs / "aggregator.log").read_text(errors="replace") if (logs / "aggregator.log").exists() else ""
    codes = _silo_exit_codes(launch)
    workers = launch.workers
    failures = {
        "rounds_missing": rounds - len(per_round),
        "rounds_failed": agg_events["round_failed"],
        "round_retries": agg_events["round_retry"],
        "rounds_short": sum(1 for r in per_round if r.get("updates", 0) < silos),  # closed without every silo
        "silos_exited_nonzero": sum(1 for n in silo_names(silos) if codes.get(n) != 0),  # no record counts
        "workers_exited_nonzero": sum(1 for w in workers if w.returncode != 0),
        "aggregator_exit_nonzero": int(launch.aggregator is None or launch.aggregator.returncode != 0),
        "rpc_refused": agg_events["rpc_refused"],
        "silo_rpc_retries": silo_events["rpc_retry"],
        "silo_rounds_left": silo_events["round_refused"] + silo_events["upload_without_training"],
        "tls_handshake_failures": agg_text.count("Handshake failed"),
        "run_aborted": agg_events["run_aborted"],
        "bench_stopped": int(bool(stopped)),
    }
    worker_rss = [m for m in (peaks.mib(w) for w in workers) if m is not None]
    return {
        "silos": silos,
        "rounds": rounds,
        "silo_procs": len(workers),
        "completed_rounds": len(per_round),
        "round_seconds_median": _median(seconds),
        "round_seconds_max": round(max(seconds), 4) if seconds else None,
        "round_seconds_min": round(min(seconds), 4) if seconds else None,
        "round_seconds": [round(s, 4) for s in seconds],
        "slowest_train_seconds_median": _median([r["slowest_train_seconds"] for r in per_round]),
        "aggregator_secure_seconds_median": _median([r["aggregator_secure_seconds"] for r in per_round]),
        "silo_secure_seconds_median": _median([_mean_over_silos(r, "secure_seconds") for r in per_round]),
        "silo_secure_bytes_median": _median([_mean_over_silos(r, "secure_bytes") for r in per_round]),
        "phase_seconds_median": phase_seconds(logs / "aggregator.log"),
        "updates_min": min((int(r["updates"]) for r in per_round), default=0),
        "aggregator_peak_rss_mib": peaks.mib(launch.aggregator) if launch.aggregator is not None else None,
        "silo_worker_peak_rss_mib_max": max(worker_rss) if worker_rss else None,
        "silo_workers_peak_rss_mib_total": round(sum(worker_rss), 1) if worker_rss else None,
        "failures": failures,
        "stopped_because": stopped or None,
        "wall_seconds": round(wall, 2),
        "seconds_outside_rounds": round(wall - sum(seconds), 2),  # start-up, joins, final evaluation, exit
    }


def combine(sizes: list[dict], strategy: str, wall: float) -> dict:
    """The JSON object printed last: the largest size's figures on top, every size under ``sweep``."""
    import torch

    largest = max(sizes, key=lambda s: s["silos"])
    smallest = min(sizes, key=lambda s: s["silos"])
    base = smallest["round_seconds_median"]
    growth = {str(s["silos"]): (round(s["round_seconds_median"] / base, 3)
                                if base and s["round_seconds_median"] is not None else None) for s in sizes}
    totals = {k: sum(s["failures"][k] for s in sizes) for k in largest["failures"]}
    return {
        "benchmark": "soak",
        **{k: largest[k] for k in ("silos", "rounds", "silo_procs", "completed_rounds", "round_seconds_median",
                                   "round_seconds_max", "aggregator_peak_rss_mib", "failures")},
        "ok": all(s["completed_rounds"] == s["rounds"] and not any(s["failures"].values()) for s in sizes),
        "round_seconds_median_vs_smallest": growth,
        "failures_all_sizes": totals,
        "sweep": sizes,
        "setup": {"secure_aggregation": "masking", "strategy": strategy, "min_group_size": 3, "threshold": 0.6,
                  "model": "mixtral hidden 16, 1 layer, 4 experts top-2; full expert weights + router trained",
                  "local_steps": 2, "batch_size": 4, "samples_per_silo": 32, "transport": "gRPC, mutual TLS, 127.0.0.1",
                  "silos_as": "threads in worker processes (SiloAgent + AggregatorClient each, own certificate)"},
        "wall_seconds": round(wall, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }


# -- worker process --------------------------------------------------------------------------------

def _run_agent(agent, codes: dict[str, int], failed: threading.Event) -> None:
    """Thread body: one silo's whole run; an exception is a failure of that silo, not of its peers."""
    name = agent.silo.name
    try:
        codes[name] = agent.run()
    except Exception as exc:  # noqa: BLE001 - recorded and counted by the bench
        log_event(log, "silo_crashed", level=logging.ERROR, silo=name, error=f"{type(exc).__name__}: {exc}")
        codes[name] = 3
    if codes[name] != 0:
        failed.set()


def worker_main(config_paths: list[Path], result_path: Path) -> int:
    """Host several silos in one process, each in its own thread.

    Every agent is built before any thread starts: model building seeds torch's global generator,
    so it must not interleave. A silo that stops with an error ends the whole worker at once, as a
    dead silo process would, so the bench stops instead of waiting out the round's deadline.
    """
    setup_logging("silo-worker", "INFO")
    handler = logging.getLogger().handlers[0]  # one log per worker: say which silo (thread) speaks
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s role=silo silo=%(threadName)s logger=%(name)s %(message)s"))
    import torch

    from silo_agent.agent import SiloAgent

    torch.set_num_threads(1)
    agents = [SiloAgent(load_config(path)) for path in config_paths]
    codes: dict[str, int] = {}
    failed = threading.Event()
    threads = [threading.Thread(target=_run_agent, args=(a, codes, failed), name=a.silo.name, daemon=True)
               for a in agents]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) and not failed.wait(timeout=POLL_S):
        pass
    write_atomic(result_path, json.dumps(codes))
    if failed.is_set():
        logging.shutdown()
        os._exit(1)  # the other silos are blocked in RPCs: do not wait for them
    return 0 if len(codes) == len(agents) and all(c == 0 for c in codes.values()) else 1


# -- command line ----------------------------------------------------------------------------------

def _sizes(args: argparse.Namespace) -> list[int]:
    sizes = [int(s) for s in args.sweep.split(",") if s.strip()] if args.sweep else [args.silos]
    if any(n < 3 for n in sizes):
        raise SystemExit("soak: every size needs at least 3 silos (min_group_size = 3)")
    return sizes


def _terminate_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` blocks stop every child process group."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run_bench(sizes: list[int], rounds: int, silo_procs: int, strategy: str, out: Path, timeout_s: float) -> dict:
    for n in sizes:  # logs append and an old metrics.jsonl would be read as this run's: start clean
        folder = out / f"silos-{n}"
        if folder.exists() and any(folder.iterdir()):
            raise SystemExit(f"soak: {folder} is not empty; give --out a fresh folder")
    start = time.perf_counter()
    results = [run_size(n, rounds, silo_procs, strategy, out / f"silos-{n}", timeout_s) for n in sizes]
    return combine(results, strategy, time.perf_counter() - start)


def _print_human(result: dict) -> None:
    for s in result["sweep"]:
        bad = {k: v for k, v in s["failures"].items() if v}
        print(f"{s['silos']:>3} silos: {s['completed_rounds']}/{s['rounds']} rounds, round median "
              f"{s['round_seconds_median']} s, max {s['round_seconds_max']} s, aggregator peak "
              f"{s['aggregator_peak_rss_mib']} MiB, failures {bad or 'none'}, wall {s['wall_seconds']} s",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--silos", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sweep", default="", help="comma-separated silo counts run one after another, e.g. 4,8,16,32")
    parser.add_argument("--silo-procs", type=int, default=4, help="worker processes hosting the silos as threads")
    parser.add_argument("--strategy", default="fcmoe", choices=["fedavg", "fcmoe"])
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="per size; then everything is stopped")
    parser.add_argument("--out", type=Path, default=None, help="keep every size's run folder here (default: temporary)")
    parser.add_argument("--json", action="store_true", help="only the JSON object on stdout")
    parser.add_argument("--worker", nargs="+", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.worker_result)
    sizes = _sizes(args)
    setup_logging("bench", "INFO" if not args.json else "WARNING")
    _terminate_on_sigterm()
    if args.out is not None:
        result = run_bench(sizes, args.rounds, args.silo_procs, args.strategy, args.out, args.timeout_s)
    else:
        with tempfile.TemporaryDirectory(prefix="fcmoe-soak-") as tmp:
            result = run_bench(sizes, args.rounds, args.silo_procs, args.strategy, Path(tmp), args.timeout_s)
    if not args.json:
        _print_human(result)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
