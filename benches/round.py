"""Round benchmark: a real federated run (processes, gRPC, mutual TLS on loopback), timed per round.

    python -m benches.round --silos 4 --json

Prints, last, one JSON object: per-round wall time, bytes up and down per silo, local training
tokens/s, and the framework's overhead = (round time - slowest silo's pure training time) / round
time. Round time runs from the round opening to its aggregate being applied, so it includes every
silo's download, evaluation of the received global and of its own model, upload and the
aggregation; the evaluation share is reported separately because it is work the operator asked
for, not protocol cost. The strategy's share is its maths alone: planning the coefficients (FC-MoE:
importance, consensus on the keyed sketches, groups) and aggregating the sums (FC-MoE: projection
and combination of the group sums, then the server step). FC-MoE's sketch stage (weighted sketches
summed, masked in mode masking, then every silo's agreement scores) is timed from its opening to the
coefficients: ``median_sketch_stage_share``. ``--mode`` runs the config under another secure-aggregation
mode (``--clip-norm`` then sets the clip where the config has none).

Evaluation cost (federation.evaluation): the run is repeated for each ``--eval-every`` setting (default
``1,5``: every round, then every 5th), in one invocation so that their ratios come from one machine state.
``evaluation_settings`` holds, per setting, each round split into training (the slowest silo's), evaluation
(the slowest silo's evaluation passes) and the rest (download, reports, uploads, aggregation), and their
sums over the run's rounds; the top-level figures are the first setting's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fcmoe.config import load_config, parse_config
from fcmoe.logs import setup_logging
from fcmoe.launch.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]


def run(silos: int, rounds: int, config_path: Path, local_steps: int | None, out_dir: Path,
        strategy: str | None = None, mode: str | None = None, clip_norm: float | None = None,
        eval_every: int | None = None, eval_max_examples: int | None = None) -> dict:
    data = load_config(config_path).model_dump(mode="json")
    if eval_every is not None:
        data["federation"]["evaluation"]["every"] = eval_every
    if eval_max_examples is not None:
        data["federation"]["evaluation"]["max_examples"] = eval_max_examples
    data["run"]["output_dir"] = str(out_dir)
    if strategy:
        data["federation"]["strategy"]["name"] = strategy
    if mode:
        data["federation"]["secure_aggregation"]["mode"] = mode
    if clip_norm is not None:
        data["federation"]["local"]["clip_norm"] = clip_norm
    data["federation"].update({"rounds": rounds, "min_silos": silos})
    if local_steps:
        data["federation"]["local"]["local_steps"] = local_steps
    data["simulation"] = {**(data.get("simulation") or {}), "silos": silos}
    config = parse_config(data)
    start = time.perf_counter()
    code = simulate(config, progress=False)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    per_round = []
    for r in rows:
        if "round_seconds" not in r:
            continue
        s = r["silos"].values()
        strategy_seconds = r["plan_seconds"] + r["aggregate_seconds"]
        slowest = max(x["train_seconds"] for x in s)
        evals = max(x.get("eval_seconds", 0.0) for x in s)
        per_round.append({
            "round": r["round"],
            "round_seconds": r["round_seconds"],
            "slowest_train_seconds": slowest,
            "eval_seconds": evals,
            "rest_seconds": max(0.0, r["round_seconds"] - slowest - evals),
            "eval_examples_per_silo": max(x.get("eval_examples", 0) for x in s),
            "overhead": r["overhead"],
            "overhead_excluding_eval": max(0.0, r["round_seconds"] - slowest - evals) / r["round_seconds"],
            "strategy_seconds": strategy_seconds,
            "strategy_share": strategy_seconds / r["round_seconds"],
            "sketch_stage_seconds": r.get("sketch_stage_seconds", 0.0),
            "sketch_stage_share": r.get("sketch_stage_seconds", 0.0) / r["round_seconds"],
            "bytes_up_per_silo": r["bytes_up_mean"],
            "bytes_down_per_silo": r["bytes_down_mean"],
            "train_tokens_per_s": r["train_tokens_per_s"],
        })
    med = lambda k: statistics.median(p[k] for p in per_round)  # noqa: E731
    total = lambda k: sum(p[k] for p in per_round)  # noqa: E731
    round_total = total("round_seconds")
    return {
        "benchmark": "round",
        "exit_code": code,
        "silos": silos,
        "rounds": rounds,
        "config": str(config_path.relative_to(ROOT) if config_path.is_relative_to(ROOT) else config_path),
        "update_bytes_per_silo": per_round[0]["bytes_up_per_silo"] if per_round else None,
        "per_round": per_round,
        "median_round_seconds": med("round_seconds"),
        "median_overhead": med("overhead"),
        "median_overhead_excluding_eval": med("overhead_excluding_eval"),
        "median_strategy_share": med("strategy_share"),
        "median_sketch_stage_share": med("sketch_stage_share"),
        "mode": config.federation.secure_aggregation.mode,
        "median_train_tokens_per_s": med("train_tokens_per_s"),
        "total_wall_seconds": wall,
        "eval_every": config.federation.evaluation.every,
        "eval_max_examples": config.federation.evaluation.max_examples,
        "mean_round_seconds": round_total / len(per_round) if per_round else None,
        # summed over the rounds: a setting that evaluates every 5th round pays for it in one round of 5
        "round_split": {part: total(key) / round_total if round_total else None
                        for part, key in (("training", "slowest_train_seconds"), ("evaluation", "eval_seconds"),
                                          ("rest", "rest_seconds"))},
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--silos", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=None)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--strategy", help="override the config's strategy (e.g. fcmoe)")
    parser.add_argument("--mode", choices=["none", "masking", "ckks"], help="override the secure-aggregation mode")
    parser.add_argument("--clip-norm", type=float, help="override local.clip_norm (secure modes need one > 0)")
    parser.add_argument("--eval-every", default="1,5",
                        help="federation.evaluation.every settings to run, comma-separated (default 1,5)")
    parser.add_argument("--eval-max-examples", type=int, help="federation.evaluation.max_examples for every setting")
    parser.add_argument("--json", action="store_true", help="print only the JSON result line")
    args = parser.parse_args(argv)
    settings = [int(x) for x in args.eval_every.split(",") if x.strip()]
    if not settings or min(settings) < 1:
        parser.error("--eval-every: one or more integers >= 1, e.g. 1,5")
    setup_logging("bench", "WARNING")
    runs = []
    for every in settings:
        with tempfile.TemporaryDirectory(prefix="fcmoe-bench-") as tmp:
            runs.append(run(args.silos, args.rounds, args.config, args.local_steps, Path(tmp) / "run", args.strategy,
                            args.mode, args.clip_norm, every, args.eval_max_examples))
    result = {**runs[0], "evaluation_settings": [_setting(r, runs[0]) for r in runs]}
    if not args.json:
        for r in runs:
            for p in r["per_round"]:
                print(f"eval every {r['eval_every']}, round {p['round']}: {p['round_seconds']:.2f}s "
                      f"(training {p['slowest_train_seconds']:.2f}s, evaluation {p['eval_seconds']:.2f}s), "
                      f"overhead {p['overhead']:.1%}", file=sys.stderr)
    print(json.dumps(result))
    return 0 if all(r["exit_code"] == 0 for r in runs) else 1


def _setting(r: dict, reference: dict) -> dict:
    """One evaluation setting's figures, and its mean round time relative to the first setting's."""
    keys = ("eval_every", "eval_max_examples", "exit_code", "mean_round_seconds", "round_split", "median_overhead",
            "median_overhead_excluding_eval", "total_wall_seconds")
    ratio = (r["mean_round_seconds"] / reference["mean_round_seconds"]
             if r["mean_round_seconds"] and reference["mean_round_seconds"] else None)
    per_round = [{k: p[k] for k in ("round", "round_seconds", "slowest_train_seconds", "eval_seconds", "rest_seconds",
                                    "eval_examples_per_silo")} for p in r["per_round"]]
    return {**{k: r[k] for k in keys}, "mean_round_time_ratio": ratio, "per_round": per_round}


if __name__ == "__main__":
    sys.exit(main())
