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
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from crypto.pki import ensure_pki
from fcmoe.config import FCMOE_SKETCH_VARIANT, Config, parse_config
from fcmoe.inprocess import run_in_process
from fcmoe.logs import setup_logging
from protos import fcmoe_pb2 as pb

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
            strategy: str = "fedavg") -> tuple[Config, list[Config]]:
    hidden = hidden_size_for(params, experts=8, layers=2)
    names = [f"silo{i}" for i in range(silos)]
    ensure_pki(out / "certs", names)
    data = {
        "run": {"name": f"secagg-{mode}", "output_dir": str(out / strategy / mode), "log_level": "WARNING"},
        "model": {"source": "builtin", "builtin": {"family": "mixtral", "hidden_size": hidden,
                                                   "intermediate_size": 2 * hidden, "num_layers": 2, "num_heads": 4,
                                                   "num_kv_heads": 2, "num_experts": 8, "top_k": 2},
                  "trainable": {"mode": "full", "router": False}},
        "data": {"builtin": {"samples_per_silo": 256, "eval_fraction": 0.125}, "max_length": 24},
        "federation": {"rounds": rounds, "min_silos": silos, "quorum": silos - 1, "min_group_size": 3,
                       "round_timeout_s": 600, "upload_timeout_s": upload_timeout_s(mode, silos, params),
                       # FC-MoE's groups can be as small as min_group_size: a dropout may leave one short,
                       # and the round is then redone without the silo (nothing unmasked)
                       "max_round_retries": 0 if strategy == "fedavg" else 1, "strategy": strategy_section(strategy),
                       "local": {"local_steps": local_steps, "batch_size": 8, "learning_rate": 0.003, "clip_norm": 1.0},
                       "secure_aggregation": {"mode": mode, "threshold": 0.6, "fixed_point_bits": 32}},
        "aggregator": {"pki_dir": str(out / "certs")},
    }
    aggregator = parse_config(data)
    silo_configs = [parse_config({**data, "silo": {"name": n, "index": i, "num_silos": silos, "threads": 2,
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


def run_mode(mode: str, silos: int, params: int, rounds: int, local_steps: int, out: Path,
             strategy: str = "fedavg") -> dict:
    aggregator, silo_configs = configs(mode, silos, params, rounds, local_steps, out, strategy)
    dropped = silo_configs[-1].silo.name  # type: ignore[union-attr]

    redone = []  # FC-MoE: a redo of the last round (its dropout left a group short) goes on without a dropout

    def absent(silo: str, task: pb.Task) -> bool:  # the last round loses one silo at upload time
        if task.kind == pb.Task.TRAIN and task.round == rounds and task.train.session & 0xFFFF:
            redone.append(task.round)
        return silo == dropped and task.kind == pb.Task.UPLOAD and task.round == rounds and not redone

    start = time.perf_counter()
    coordinator = run_in_process(aggregator, silo_configs, absent=absent)
    wall = time.perf_counter() - start
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
        "wall_seconds": wall,
    }


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--silos", type=int, default=8)
    parser.add_argument("--params", type=int, default=4_000_000, help="trainable parameters (expert units)")
    parser.add_argument("--rounds", type=int, default=6, help="round 1 warms up; the last one has a dropout")
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--no-flower", action="store_true", help="skip timing Flower's SecAgg+")
    parser.add_argument("--fcmoe", action="store_true",
                        help="also time FC-MoE rounds (modes none and masking: the masked sketch stage)")
    parser.add_argument("--flower-python", help="python of a venv with flwr (make flower-venv: .flwr-venv/bin/python)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3: a warm-up round, a measured round and a dropout round")
    setup_logging("bench", "WARNING")
    torch.manual_seed(0)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fcmoe-secagg-") as tmp:
        for mode in args.modes:
            results[mode] = run_mode(mode, args.silos, args.params, args.rounds, args.local_steps, Path(tmp))
            if not args.json:
                print(f"{mode}: {json.dumps(results[mode])}", file=sys.stderr)
        fcmoe_results = {mode: run_mode(mode, args.silos, args.params, args.rounds, args.local_steps, Path(tmp),
                                        "fcmoe") for mode in ("none", "masking") if args.fcmoe}
    for group in (results, fcmoe_results):
        base = group.get("none", {}).get("median_round_seconds")
        for mode, r in group.items():
            r["round_ratio_to_none"] = r["median_round_seconds"] / base if base and r["median_round_seconds"] else None
    flower: dict = {"available": False, "reason": "skipped (--no-flower)"}
    if not args.no_flower:
        flower = flower_secaggplus(args.silos, args.params, args.flower_python)
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
        "modes": results,
        "fcmoe_modes": fcmoe_results,
        "flower_secaggplus": flower,
        "target": {"masking_round_ratio_max": 1.25,
                   "masking_round_ratio": masking.get("round_ratio_to_none"),
                   "fcmoe_masking_round_ratio": fcmoe_ratio,
                   "met": (masking.get("round_ratio_to_none") or math.inf) <= 1.25
                   and (fcmoe_ratio is None or fcmoe_ratio <= 1.25)},
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
    }
    print(json.dumps(summary))
    return 0 if all(r["completed"] for r in (*results.values(), *fcmoe_results.values())) else 1


if __name__ == "__main__":
    sys.exit(main())
