"""Secure-aggregation benchmark: the same federated rounds under every mode, in one run.

    python -m benches.secagg --silos 8 --params 4000000 --json

Each mode runs the real coordinator and silo agents (in process: every message is serialised and
every tensor goes through the codec; gRPC and TLS are left out so the figures are the protocol's),
on a built-in Mixtral-style MoE sized so that its trainable expert units hold about ``--params``
parameters. Every round but the last has every silo (the median of rounds 2 .. R-1 is reported;
round 1 warms up); in the last one silo vanishes when asked to upload, so the masked round has to rebuild its masks (dropout path;
FC-MoE: where that leaves a group below ``min_group_size`` nothing is unmasked and the round is redone,
the silo back). Prints, last, one JSON object with, per mode:
round times, silo-side and aggregator-side secure-aggregation time, bytes sent per parameter and
the ratio to ``mode: none``; and Flower's SecAgg+ timed on the same sizes where Flower is installed.
FedAvg rounds are one masked stage (upload, consistency check, unmask); ``--fcmoe`` also times the rounds
of FC-MoE's sketch variant (``projection_side: aggregator``) in modes none and masking, whose masked rounds add the sketch stage (masked sketches, a second
consistency check and unmask, the silos' agreement scores): ``fcmoe_modes`` and its own ratio.

Silos run one after another in one process, so a round's time is the sum of every silo's work plus
the aggregator's; on real sites silos work in parallel and only one silo's share of it counts.

The modes run at once and take turns (benches/interleave.py): one federation per mode, all in this
thread, a step of each in turn (a step: one silo's task, or the coordinator's), kept in step so
that round k of every mode runs while the others run theirs; each coordinator's clock runs only
during its own steps, so its round times and deadlines are its own. Whatever load comes and goes on
the machine weighs on every mode alike: a mode's ratio to mode none is computed per round, against
the plaintext round run beside it, and summarised (``round_ratio``: median, quartiles, min, max;
``round_ratio_to_none`` is that median); ``round_seconds`` gives the spread of the round times.
The dropout round and the final evaluation run one federation after another (they wait for a
deadline; not measured). ``--repeats`` does it all again with fresh federations (default 2). A mode
whose run aborts (a deadline passed, an error) is reported with ``"status": "aborted"`` and its
reason and not run again; the others go on, and the exit status is 0 unless every mode aborted.
``--load N`` runs N CPU-bound processes beside the benchmark (benches/load_robust.py compares the
ratios with and without); ``--upload-timeout ckks=SECONDS`` replaces a mode's size-based deadline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Generator
from pathlib import Path

import torch

from aggregator.server import build_coordinator
from benches.interleave import (
    Aborted,
    PausableClock,
    Runs,
    add_load_argument,
    background_load,
    exit_code,
    order_for,
    ratio_summary,
    spread,
    take_turns,
)
from crypto.pki import ensure_pki
from fcmoe.config import FCMOE_SKETCH_VARIANT, Config, parse_config
from fcmoe.launch.inprocess import InProcessTransport
from fcmoe.logs import setup_logging
from protos import fcmoe_pb2 as pb
from silo_agent.agent import SiloAgent

MODES = ("none", "masking", "ckks")
ROOT = Path(__file__).resolve().parents[1]


def hidden_size_for(params: int, experts: int, layers: int) -> int:
    """Hidden size h (a multiple of 16: 4 heads of an even size; intermediate 2h) whose expert weights
    hold about ``params``: each expert has gate, up (h x 2h each) and down (2h x h), 6 h**2 in all."""
    return max(16, 16 * round(math.sqrt(params / (6 * experts * layers)) / 16))


def upload_timeout_s(mode: str, silos: int, params: int) -> float:
    """Long enough for every silo's upload one after another (they share this process), short
    enough that the dropout round's wait for the silo that never uploads stays small. CKKS
    encrypts at about 0.8 M floats/s and the aggregator scales and adds at about 1 M/s."""
    per_parameter = 2.5e-6 if mode == "ckks" else 1e-7
    return 2.0 + silos * params * per_parameter


def strategy_section(strategy: str) -> dict:
    """FC-MoE here is its sketch variant: what this benchmark times is the masked sketch stage."""
    return {"name": strategy, "fcmoe": FCMOE_SKETCH_VARIANT} if strategy == "fcmoe" else {"name": strategy}


def configs(mode: str, silos: int, params: int, rounds: int, local_steps: int, out: Path,
            strategy: str = "fedavg", upload_timeout: float | None = None,
            tag: str = "", threads: int = 2) -> tuple[Config, list[Config]]:
    """``upload_timeout`` replaces :func:`upload_timeout_s`; ``tag`` names the run's own folder (a repeat);
    ``threads``: the silos' torch threads."""
    hidden = hidden_size_for(params, experts=8, layers=2)
    names = [f"silo{i}" for i in range(silos)]
    ensure_pki(out / "certs", names)
    deadline = upload_timeout_s(mode, silos, params) if upload_timeout is None else upload_timeout
    data = {
        "run": {"name": f"secagg-{mode}", "output_dir": str(out / strategy / mode / tag), "log_level": "WARNING"},
        "model": {"source": "builtin", "builtin": {"family": "mixtral", "hidden_size": hidden,
                                                   "intermediate_size": 2 * hidden, "num_layers": 2, "num_heads": 4,
                                                   "num_kv_heads": 2, "num_experts": 8, "top_k": 2},
                  "trainable": {"mode": "full", "router": False}},
        "data": {"builtin": {"samples_per_silo": 256, "eval_fraction": 0.125}, "max_length": 24},
        "federation": {"rounds": rounds, "min_silos": silos, "quorum": silos - 1, "min_group_size": 3,
                       "round_timeout_s": 600, "upload_timeout_s": deadline,
                       # FC-MoE's groups can be as small as min_group_size: a dropout may leave one short,
                       # and the round is then redone without the silo (nothing unmasked)
                       "max_round_retries": 0 if strategy == "fedavg" else 1, "strategy": strategy_section(strategy),
                       "local": {"local_steps": local_steps, "batch_size": 8, "learning_rate": 0.003, "clip_norm": 1.0},
                       "secure_aggregation": {"mode": mode, "threshold": 0.6, "fixed_point_bits": 32}},
        "aggregator": {"pki_dir": str(out / "certs")},
    }
    aggregator = parse_config(data)
    silo_configs = [parse_config({**data, "silo": {"name": n, "index": i, "num_silos": silos, "threads": threads,
                                                   "pki_dir": str(out / "certs"), "accept_modes": [mode],
                                                   "sketch_key": "5a" * 32}})
                    for i, n in enumerate(names)]
    return aggregator, silo_configs


def _round_figures(row: dict, trainable: int) -> dict:
    per_silo = list(row.get("silos", {}).values())
    uploaders = [s for s in per_silo if "bytes_up" in s]
    return {
        "round": row["round"],
        "round_seconds": row.get("round_seconds"),
        "updates": row.get("updates"),
        "silo_train_seconds_mean": _mean([s["train_seconds"] for s in per_silo]),
        "silo_secure_seconds_mean": _mean([s.get("secure_seconds", 0.0) for s in uploaders]),
        "aggregator_secure_seconds": row.get("aggregator_secure_seconds"),
        "upload_bytes_per_parameter": _mean([s["bytes_up"] / trainable for s in uploaders]),
        "all_bytes_up_per_parameter": _mean([(s["bytes_up"] + s["report_bytes"] + s.get("secure_bytes", 0))
                                             / trainable for s in uploaders]),
    }


def federation(mode: str, silos: int, params: int, rounds: int, local_steps: int, out: Path,
               strategy: str = "fedavg", upload_timeout: float | None = None,
               tag: str = "", threads: int = 2) -> Generator[int, None, dict]:
    """One federation of ``rounds`` rounds in ``mode``, a step at a time: yields the rounds completed
    after every step of its driver loop (as :func:`fcmoe.launch.inprocess.run_in_process`'s: every silo does
    its task, one step each, then the coordinator steps) until the last measured round is done, then
    runs the dropout round and the final evaluation in one go; returns its figures (medians over
    rounds 2 .. R-1).

    The coordinator runs on a :class:`PausableClock` that stops while the generator is suspended, so
    that when several federations take turns, each one's round times and deadlines count its own
    work only."""
    aggregator, silo_configs = configs(mode, silos, params, rounds, local_steps, out, strategy, upload_timeout, tag,
                                       threads)
    dropped = silo_configs[-1].silo.name  # type: ignore[union-attr]

    redone = []  # FC-MoE: a redo of the last round (its dropout left a group short) goes on without a dropout

    def absent(silo: str, task: pb.Task) -> bool:  # the last round loses one silo at upload time
        if task.kind == pb.Task.TRAIN and task.round == rounds and task.train.session & 0xFFFF:
            redone.append(task.round)
        return silo == dropped and task.kind == pb.Task.UPLOAD and task.round == rounds and not redone

    start = time.perf_counter()
    fresh = aggregator.aggregator.model_copy(update={"resume": False})  # a new run every time
    coordinator = build_coordinator(aggregator.model_copy(update={"aggregator": fresh}))
    clock = PausableClock()
    coordinator.clock = clock  # its deadlines and round times count only this federation's turns
    agents = [SiloAgent(c, transport=InProcessTransport(coordinator, c.silo.name))  # type: ignore[union-attr]
              for c in silo_configs]
    for agent in agents:
        agent.join()
    active, last_measured = list(agents), False
    coordinator.step()
    while active:
        for agent in list(active):
            task = agent.client.get_task(agent.run_id, wait_s=0.0)
            if absent(agent.silo.name, task):
                continue
            if agent.handle(task) is not None:
                active.remove(agent)
            if not last_measured:  # a turn: one silo's task
                clock.pause()
                yield coordinator.machine.version
                clock.resume()
        coordinator.step()  # where a round closes the next one opens: its silos wait for the others' round
        if active and not last_measured:
            last_measured = coordinator.machine.version >= rounds - 1  # then the rest in one go
            clock.pause()
            yield coordinator.machine.version
            clock.resume()
    clock.pause()
    trainable = sum(coordinator.unit_sizes.values())
    per_round = [_round_figures(r, trainable) for r in coordinator.metrics.rows() if r["round"] >= 1]
    full = [r for r in per_round if 1 < r["round"] < rounds]  # round 1 warms up (allocations, caches)
    med = lambda key: statistics.median(r[key] for r in full) if full else None  # noqa: E731
    silo_s, agg_s = med("silo_secure_seconds_mean"), med("aggregator_secure_seconds")
    protocol = silo_s * silos + agg_s if silo_s is not None and agg_s is not None else None
    return {
        "completed": coordinator.machine.succeeded,
        "outcome": coordinator.machine.outcome,
        "trainable_parameters": trainable,
        "median_round_seconds": med("round_seconds"),
        "silo_secure_seconds_median": silo_s,
        "aggregator_secure_seconds_median": agg_s,
        "protocol_seconds_sequential": protocol,
        "secure_share_of_round": protocol / med("round_seconds") if protocol is not None and med("round_seconds") else None,
        "upload_bytes_per_parameter": med("upload_bytes_per_parameter"),
        "all_bytes_up_per_parameter": med("all_bytes_up_per_parameter"),
        "silo_train_seconds_median": med("silo_train_seconds_mean"),
        "dropout_round": {**(per_round[-1] if per_round and per_round[-1]["round"] == rounds else {}),
                          "dropped": dropped},
        "per_round": per_round,
        "busy_seconds": clock.busy_seconds,  # this federation's own turns
        "wall_seconds": time.perf_counter() - start,  # others' turns included when federations take turns
    }


def run_mode(mode: str, silos: int, params: int, rounds: int, local_steps: int, out: Path,
             strategy: str = "fedavg", upload_timeout: float | None = None, tag: str = "", threads: int = 2) -> dict:
    """One federation of ``rounds`` rounds in ``mode`` on its own: its figures (see :func:`federation`)."""
    steps = federation(mode, silos, params, rounds, local_steps, out, strategy, upload_timeout, tag, threads)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def flower_secaggplus(silos: int, params: int, python: str | None) -> dict:
    """Flower's SecAgg+ on the same sizes, every pair masked as in our groups and t = 0.6 n.

    Flower pins protobuf < 7, which this project cannot share an environment with, so it runs in
    the interpreter of its own virtual environment (``make flower-venv``) when one is given.
    """
    call = (f"from benches.flower_secaggplus import measure; import json; "
            f"print(json.dumps(measure({silos}, {params}, num_shares=1.0, reconstruction_threshold=0.6)))")
    if python is None:
        from benches.flower_secaggplus import measure

        return measure(silos, params, num_shares=1.0, reconstruction_threshold=0.6)
    proc = subprocess.run([python, "-c", call], capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"available": False, "reason": f"{python} exited with {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# figures of a mode: the median over its repeats of each repeat's own figure
_REPEAT_MEDIANS = ("silo_secure_seconds_median", "aggregator_secure_seconds_median", "protocol_seconds_sequential",
                   "secure_share_of_round", "upload_bytes_per_parameter", "all_bytes_up_per_parameter",
                   "silo_train_seconds_median")


def measured_rounds(runs: Runs, rounds: int) -> dict[tuple[int, int], float]:
    """{(repeat, round): round seconds} over the measured rounds (2 .. R-1) of every completed repeat."""
    return {(k, row["round"]): row["round_seconds"] for k, result in zip(runs.repeats, runs.results)
            for row in result["per_round"] if 1 < row["round"] < rounds and row["round_seconds"] is not None}


def mode_summary(runs: Runs, none: Runs | None, rounds: int) -> dict:
    """A mode over its repeats: medians, the spread of its round times, its ratio to mode none per
    round (round k of a repeat against round k of that repeat's plaintext federation, which ran at
    the same time, the two taking turns)."""
    results = runs.results
    own = measured_rounds(runs, rounds)
    out: dict = {**runs.status_fields(), "completed": not runs.aborted and bool(results),
                 "outcome": runs.reason if runs.aborted else (results[-1]["outcome"] if results else None),
                 "repeats_completed": len(results),
                 "trainable_parameters": results[0]["trainable_parameters"] if results else None,
                 "median_round_seconds": statistics.median(own.values()) if own else None,
                 "round_seconds": spread(list(own.values()))}
    for key in _REPEAT_MEDIANS:
        values = list(runs.by_repeat(key).values())
        out[key] = statistics.median(values) if values else None
    ratio = ratio_summary(own, measured_rounds(none, rounds)) if none is not None else None
    out["round_ratio_to_none"] = ratio["median"] if ratio else None
    out["round_ratio"] = ratio
    out["dropout_round"] = results[-1]["dropout_round"] if results else None
    out["busy_seconds"] = sum(r["busy_seconds"] for r in results)
    out["repeats"] = [{"repeat": k, **r} for k, r in zip(runs.repeats, results)]
    return out


def parse_timeouts(values: list[str], parser: argparse.ArgumentParser) -> dict[str, float]:
    out = {}
    for value in values:
        mode, _, seconds = value.partition("=")
        try:
            out[mode] = float(seconds)
        except ValueError:
            parser.error(f"--upload-timeout {value!r}: expected MODE=SECONDS, e.g. ckks=120")
        if mode not in MODES or out[mode] <= 0:
            parser.error(f"--upload-timeout {value!r}: MODE is one of {', '.join(MODES)}, SECONDS > 0")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--silos", type=int, default=8)
    parser.add_argument("--params", type=int, default=4_000_000, help="trainable parameters (expert units)")
    parser.add_argument("--rounds", type=int, default=6, help="round 1 warms up; the last one has a dropout")
    parser.add_argument("--repeats", type=int, default=2,
                        help="times every mode's federation runs, the modes taking turns (default 2)")
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--upload-timeout", action="append", default=[], metavar="MODE=SECONDS",
                        help="upload deadline of a mode's rounds instead of the size-based one (repeatable)")
    parser.add_argument("--no-flower", action="store_true", help="skip timing Flower's SecAgg+")
    parser.add_argument("--fcmoe", action="store_true",
                        help="also time FC-MoE rounds (modes none and masking: the masked sketch stage)")
    parser.add_argument("--flower-python", help="python of a venv with flwr (make flower-venv: .flwr-venv/bin/python)")
    parser.add_argument("--threads", type=int, default=2,
                        help="the silos' torch threads (default 2); 1 keeps the ratios the same under load")
    add_load_argument(parser)
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3: a warm-up round, a measured round and a dropout round")
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    timeouts = parse_timeouts(args.upload_timeout, parser)
    setup_logging("bench", "WARNING")
    torch.manual_seed(0)
    modes = list(dict.fromkeys(args.modes))
    names = modes + ([f"fcmoe:{m}" for m in ("none", "masking")] if args.fcmoe else [])
    load: dict = {"processes": 0}
    with background_load(args.load, load, args.load_period), tempfile.TemporaryDirectory(prefix="fcmoe-secagg-") as tmp:
        def start(name: str, repeat: int) -> Generator[int, None, dict]:
            strategy, _, mode = name.rpartition(":")
            result = yield from federation(mode, args.silos, args.params, args.rounds, args.local_steps, Path(tmp),
                                           strategy or "fedavg", timeouts.get(mode), f"repeat{repeat}", args.threads)
            if not result["completed"]:
                raise Aborted(f"repeat {repeat}: {result['outcome']}")
            return result

        def progress(name: str, repeat: int, result: dict) -> None:
            if not args.json:
                print(f"repeat {repeat} {name}: median round {result['median_round_seconds']} s, "
                      f"{result['outcome']}", file=sys.stderr)

        runs = {name: Runs(name) for name in names}
        for repeat in range(args.repeats):  # every mode's federation at once, a step of each in turn
            take_turns(order_for(names, repeat), lambda name, k=repeat: start(name, k), runs, repeat,
                       on_result=progress)
        flower: dict = {"available": False, "reason": "skipped (--no-flower)"}
        if not args.no_flower:  # a reference figure, timed once after the modes (not interleaved)
            flower = flower_secaggplus(args.silos, args.params, args.flower_python)
    results = {m: mode_summary(runs[m], runs.get("none"), args.rounds) for m in modes}
    fcmoe_results = {m: mode_summary(runs[f"fcmoe:{m}"], runs["fcmoe:none"], args.rounds) for m in ("none", "masking")
                     if args.fcmoe}
    ours = results.get("masking", {}).get("protocol_seconds_sequential")
    if flower.get("available") and ours:
        flower["ratio_to_fcmoe_masking_protocol"] = flower["round_seconds"] / ours
    masking = results.get("masking", {})
    fcmoe_ratio = fcmoe_results.get("masking", {}).get("round_ratio_to_none")
    summary = {
        "benchmark": "secagg",
        "silos": args.silos,
        "params": args.params,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "schedule": "every mode's federation at once, a step of each in turn, rounds in step; "
                    "ratio per round against the plaintext round run beside it, median and spread",
        "load": load,
        "modes": results,
        "fcmoe_modes": fcmoe_results,
        "aborted": {name: r.reason for name, r in runs.items() if r.aborted},
        "flower_secaggplus": flower,
        "target": {"masking_round_ratio_max": 1.25,
                   "masking_round_ratio": masking.get("round_ratio_to_none"),
                   "fcmoe_masking_round_ratio": fcmoe_ratio,
                   "met": (masking.get("round_ratio_to_none") or math.inf) <= 1.25
                   and (fcmoe_ratio is None or fcmoe_ratio <= 1.25)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
    }
    print(json.dumps(summary))
    return exit_code(list(runs.values()))


if __name__ == "__main__":
    sys.exit(main())
