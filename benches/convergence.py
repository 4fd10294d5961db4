"""Convergence benchmark: every method on conflicting and Dirichlet non-IID silos, several seeds.

    python -m benches.convergence --config configs/bench_conflict.yaml --seeds 3 --json

Each run is a whole federation in one process (real coordinator and silo agents, codec on every
tensor, no sockets: fcmoe.inprocess); runs go to ``benchmark.workers`` processes. Prints, last, one
JSON object: per setting and method, the final global held-out loss (mean over domains), the mean
personalised (the silos' own models after local training) held-out loss, and the rounds needed to
reach FedAvg's final global loss, each averaged over seeds; the targets of the FC-MoE issue, checked;
and writes a PNG of the loss curves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

METHOD_STRATEGY = {
    "fedavg": {"name": "fedavg"},
    "fedprox": {"name": "fedprox"},
    "fedadam": {"name": "fedadam"},
    "local": {"name": "local"},
    "fcmoe": {"name": "fcmoe"},
    "fcmoe-no-importance": {"name": "fcmoe", "fcmoe": {"importance": False}},
    "fcmoe-no-projection": {"name": "fcmoe", "fcmoe": {"projection": False}},
    "fcmoe-no-retention": {"name": "fcmoe", "fcmoe": {"retention": False}},
}


def run_configs(base: dict, setting: dict, method: str, seed: int, out_dir: str, threads: int = 1):
    """The aggregator's and silos' configs of one run."""
    from fcmoe.config import parse_config

    data = json.loads(json.dumps(base))
    data.pop("benchmark", None)
    data.pop("simulation", None)
    data["run"].update({"seed": seed, "output_dir": out_dir})
    data["model"].setdefault("builtin", {})["seed"] = seed
    if setting.get("shakespeare"):
        data["data"].update({"builtin": None, "shakespeare": {**setting["shakespeare"], "seed": seed}})
    else:
        data["data"]["builtin"].update({"seed": seed, "partition": setting["partition"], "alpha": setting["alpha"],
                                        "domains": setting["domains"]})
    strategy = {**data["federation"].get("strategy", {}), **METHOD_STRATEGY[method]}
    if method == "fedadam":
        strategy["server_lr"] = base["benchmark"]["fedadam_server_lr"]
    data["federation"].update({"strategy": strategy, "min_silos": setting["silos"]})
    aggregator = parse_config(data)
    key = bytes(range(32)).hex()
    silos = []
    for i in range(setting["silos"]):
        silo = {**data, "silo": {"name": f"silo{i}", "index": i, "num_silos": setting["silos"], "threads": threads,
                                 "sketch_key": key, "accept_modes": ["none"]}}
        silos.append(parse_config(silo))
    return aggregator, silos


def one_run(job: tuple[dict, dict, str, int]) -> dict:
    base, setting, method, seed = job
    import torch

    from fcmoe.inprocess import run_in_process
    from fcmoe.logs import setup_logging

    threads = max(1, (os.cpu_count() or 1) // base["benchmark"]["workers"])  # the cores, shared by the workers
    torch.set_num_threads(threads)
    setup_logging("bench", "ERROR")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fcmoe-conv-") as tmp:
        aggregator, silos = run_configs(base, setting, method, seed, tmp, threads)
        # one run id per seed: repeatable runs, and FC-MoE's variants of a seed share their sketch keys
        coordinator = run_in_process(aggregator, silos, run_id=f"bench-seed{seed}")
        rows = coordinator.metrics.rows()
        ok = coordinator.machine.succeeded
    last_local = next((r for r in reversed(rows) if r.get("local_loss") is not None), {})
    return {"setting": setting["name"], "method": method, "seed": seed, "ok": ok,
            "seconds": time.perf_counter() - start,
            "global": [r["global_loss"] for r in rows],
            "local": [r["local_loss"] for r in rows],
            # per domain = per silo where each silo holds one domain (the conflict suite, Shakespeare genres)
            "global_by_domain": _by_domain(rows[-1] if rows else {}, "global_loss/"),
            "local_by_domain": _by_domain(last_local, "local_loss/")}


def _by_domain(row: dict, prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix) and v is not None}


def rounds_to(curve: list[float], target: float) -> int | None:
    return next((r for r, v in enumerate(curve) if v is not None and v <= target + 1e-9), None)


def summarise(runs: list[dict], methods: list[str], settings: list[str]) -> dict:
    out: dict = {}
    for setting in settings:
        by = {(r["method"], r["seed"]): r for r in runs if r["setting"] == setting}
        seeds = sorted({s for _, s in by})
        res = {}
        for method in methods:
            finals_g, finals_l, reach, reach_l = [], [], [], []
            for seed in seeds:
                run, ref = by.get((method, seed)), by.get(("fedavg", seed))
                if run is None:
                    continue
                finals_g.append(run["global"][-1])
                finals_l.append(run["local"][-1])
                if ref is not None:
                    reach.append(rounds_to(run["global"], ref["global"][-1]))
                    reach_l.append(rounds_to(run["local"], ref["local"][-1]))
            res[method] = {
                "final_global_loss": _mean(finals_g),
                "final_personalised_loss": _mean(finals_l),
                "rounds_to_fedavg_final": _mean_if_all(reach),
                "rounds_to_fedavg_final_per_seed": reach,
                # the same count for the personalised models (not a target: what retention buys, in rounds)
                "rounds_to_fedavg_final_personalised": _mean_if_all(reach_l),
                "seconds_per_run": _mean([by[(method, s)]["seconds"] for s in seeds if (method, s) in by]),
                **{f"final_{name}_loss_by_domain": _domain_means([by[(method, s)][f"{kind}_by_domain"]
                                                                 for s in seeds if (method, s) in by])
                   for kind, name in (("global", "global"), ("local", "personalised"))},
                "global_curve": [_mean([by[(method, s)]["global"][r] for s in seeds if (method, s) in by])
                                 for r in range(len(next(iter(by.values()))["global"]))],
                "personalised_curve": [_mean([by[(method, s)]["local"][r] for s in seeds if (method, s) in by])
                                       for r in range(len(next(iter(by.values()))["local"]))],
            }
        out[setting] = res
    return out


def check_targets(summary: dict) -> dict:
    checks = {}
    for setting, res in summary.items():
        fc, fa = res.get("fcmoe"), res.get("fedavg")
        if not fc or not fa:
            continue
        c = {
            "global_le_fedavg": fc["final_global_loss"] <= fa["final_global_loss"],
            "personalised_10pct_below_fedavg": fc["final_personalised_loss"] <= 0.9 * fa["final_personalised_loss"],
            "personalised_reduction_vs_fedavg": 1 - fc["final_personalised_loss"] / fa["final_personalised_loss"],
        }
        fr, ar = fc["rounds_to_fedavg_final"], fa["rounds_to_fedavg_final"]
        c["rounds_ratio"] = fr / ar if fr is not None and ar else None
        c["rounds_ratio_le_0.7"] = c["rounds_ratio"] is not None and c["rounds_ratio"] <= 0.7
        for ablation in ("fcmoe-no-importance", "fcmoe-no-projection", "fcmoe-no-retention"):
            if ablation in res:
                a = res[ablation]
                c[f"{ablation}_worse_on_one_loss"] = (a["final_global_loss"] > fc["final_global_loss"]
                                                      or a["final_personalised_loss"] > fc["final_personalised_loss"])
        checks[setting] = c
    return checks


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(7 * len(summary), 4.5), squeeze=False)
    for ax, (setting, res) in zip(axes[0], summary.items()):
        for i, (method, r) in enumerate(res.items()):
            color = f"C{i}"
            ax.plot(range(len(r["global_curve"])), r["global_curve"], "-", color=color, label=f"{method} global")
            pts = [(x, y) for x, y in enumerate(r["personalised_curve"]) if y is not None]
            if pts:
                ax.plot(*zip(*pts), "--", color=color, alpha=0.7)
        ax.set_title(f"{setting} (solid: global, dashed: personalised)")
        ax.set_xlabel("round")
        ax.set_ylabel("held-out loss, mean over domains")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _domain_means(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Loss and perplexity per domain, averaged over seeds (perplexity = exp of the mean loss)."""
    out = {}
    for domain in sorted({d for x in per_seed for d in x}):
        loss = _mean([x.get(domain) for x in per_seed])
        if loss is not None:
            out[domain] = {"loss": loss, "perplexity": math.exp(loss)}
    return out


def _mean_if_all(xs: list) -> float | None:
    """Mean of per-seed round counts, or None when any seed never got there (or there are none)."""
    return _mean(xs) if xs and all(x is not None for x in xs) else None


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def prepare_model(config) -> None:
    """A pretrained benchmark's model, upcycled once into ``model.path`` (later runs reuse it)."""
    recipe, path = config.benchmark.upcycle, config.model.path
    if recipe is None or config.model.source != "local" or path is None or (path / "config.json").exists():
        return
    from fcmoe.model.upcycle import run_upcycle

    started = time.perf_counter()
    run_upcycle(None, path, recipe.origin, recipe.experts, recipe.top_k, recipe.layers, recipe.seed)
    print(f"model prepared in {time.perf_counter() - started:.0f} s: {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "bench_conflict.yaml")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", help="comma-separated subset of the config's methods")
    parser.add_argument("--settings", help="comma-separated subset of the config's settings")
    parser.add_argument("--out", type=Path, help="folder for the PNG and per-run curves (default: run.output_dir)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result line")
    args = parser.parse_args(argv)
    from fcmoe.config import load_config

    config = load_config(args.config)
    if config.benchmark is None:
        print(f"fcmoe: error: {args.config}: no benchmark section", file=sys.stderr)
        return 2
    prepare_model(config)
    base = config.model_dump(mode="json")
    methods = args.methods.split(",") if args.methods else list(config.benchmark.methods)
    if "fedavg" not in methods:
        methods.insert(0, "fedavg")  # the reference of every comparison
    settings = [s for s in base["benchmark"]["settings"] if not args.settings or s["name"] in args.settings.split(",")]
    jobs = [(base, s, m, seed) for s in settings for seed in range(args.seeds) for m in methods]
    start = time.perf_counter()
    runs: list[dict] = []
    with ProcessPoolExecutor(max_workers=config.benchmark.workers, mp_context=get_context("spawn")) as pool:
        for i, result in enumerate(pool.map(one_run, jobs)):
            runs.append(result)
            if not args.json:
                print(f"[{i + 1}/{len(jobs)}] {result['setting']} {result['method']} seed {result['seed']}: "
                      f"global {result['global'][-1]:.4f} personalised {result['local'][-1]:.4f} "
                      f"({result['seconds']:.0f}s)", file=sys.stderr)
    summary = summarise(runs, methods, [s["name"] for s in settings])
    out_dir = args.out or Path(config.run.output_dir)
    png = out_dir / "convergence.png"
    plot(summary, png)
    (out_dir / "runs.json").write_text(json.dumps(runs))
    result = {
        "benchmark": "convergence",
        "config": str(args.config),
        "seeds": args.seeds,
        "rounds": config.federation.rounds,
        "all_runs_completed": all(r["ok"] for r in runs),
        "wall_seconds": time.perf_counter() - start,
        "plot": str(png),
        "results": {s: {m: {k: v for k, v in r.items() if not k.endswith("_curve")} for m, r in res.items()}
                    for s, res in summary.items()},
        "targets": check_targets(summary),
    }
    print(json.dumps(result))
    return 0 if result["all_runs_completed"] else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
