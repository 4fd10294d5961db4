"""Convergence benchmark: every method on conflicting and Dirichlet non-IID silos, several seeds.

    python -m benches.convergence --config configs/bench_conflict.yaml --seeds 3 --json

Each run is a whole federation in one process (real coordinator and silo agents, codec on every
tensor, no sockets: fcmoe.launch.inprocess); runs go to ``benchmark.workers`` processes. Prints, last, one
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

from fcmoe.config import FCMOE_SKETCH_VARIANT

ROOT = Path(__file__).resolve().parents[1]

# FC-MoE's variants, each spelled out so that a figure keeps its meaning when a default changes.
# The paper's mechanisms (the defaults since they were measured, docs/algorithm.md "The paper's setting,
# measured"): importance from activation x update norm, silo-side projection against the previous
# global update, re-anchoring lambda = 0.5 of what it removed, plus the personal adapter (retention).
PAPER = {"importance_measure": "activation_norm", "projection_side": "silo", "reanchor_lambda": 0.5,
         "retention": False}
# The sketch-consensus variant (the default before): sample count x reliability x routing share,
# conflict groups from the masked sketch stage, projection of group sums, the personal adapter.
SKETCH = FCMOE_SKETCH_VARIANT
METHOD_STRATEGY = {
    "fedavg": {"name": "fedavg"},
    "fedprox": {"name": "fedprox"},
    "fedavgm": {"name": "fedavgm"},
    "fedadam": {"name": "fedadam"},
    "local": {"name": "local"},
    "fedmoe": {"name": "fedmoe"},
    "fcmoe": {"name": "fcmoe", "fcmoe": {**PAPER, "retention": True}},
    "fcmoe-sketch": {"name": "fcmoe", "fcmoe": SKETCH},
    "fcmoe-sketch-no-importance": {"name": "fcmoe", "fcmoe": {**SKETCH, "importance": False}},
    "fcmoe-sketch-no-projection": {"name": "fcmoe", "fcmoe": {**SKETCH, "projection": False}},
    "fcmoe-sketch-no-retention": {"name": "fcmoe", "fcmoe": {**SKETCH, "retention": False}},
    "fcmoe-paper": {"name": "fcmoe", "fcmoe": PAPER},
    "fcmoe-paper-no-importance": {"name": "fcmoe", "fcmoe": {**PAPER, "importance": False}},
    "fcmoe-paper-no-projection": {"name": "fcmoe", "fcmoe": {**PAPER, "projection": False, "reanchor_lambda": 0.0}},
    "fcmoe-paper-no-reanchor": {"name": "fcmoe", "fcmoe": {**PAPER, "reanchor_lambda": 0.0}},
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
    elif setting.get("labelskew"):
        data["data"].update({"builtin": None, "labelskew": {**setting["labelskew"], "seed": seed}})
        # every round's global model stays on disk, for its accuracy; silos keep their final models
        data["aggregator"]["keep_checkpoints"] = data["federation"]["rounds"] + 1
    else:
        data["data"]["builtin"].update({"seed": seed, "partition": setting["partition"], "alpha": setting["alpha"],
                                        "domains": setting["domains"]})
    strategy = dict(METHOD_STRATEGY[method])  # each method with its own settings only
    if method == "fedadam":
        strategy["server_lr"] = base["benchmark"]["fedadam_server_lr"]
    data["federation"].update({"strategy": strategy, "min_silos": setting["silos"]})
    aggregator = parse_config(data)
    key = bytes(range(32)).hex()
    silos = []
    for i in range(setting["silos"]):
        silo = {**data, "silo": {"name": f"silo{i}", "index": i, "num_silos": setting["silos"], "threads": threads,
                                 "sketch_key": key, "accept_modes": ["none"], "measure_conflict": True,
                                 "save": "final" if setting.get("labelskew") else "none"}}
        silos.append(parse_config(silo))
    return aggregator, silos


def one_run(job: tuple[dict, dict, str, int]) -> dict:
    base, setting, method, seed = job
    import torch

    from fcmoe.launch.inprocess import run_in_process
    from fcmoe.logs import setup_logging

    threads = max(1, (os.cpu_count() or 1) // base["benchmark"]["workers"])  # the cores, shared by the workers
    torch.set_num_threads(threads)
    setup_logging("bench", "ERROR")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fcmoe-conv-") as tmp:
        aggregator, silos = run_configs(base, setting, method, seed, tmp, threads)
        agents: list = []
        # one run id per seed: repeatable runs, and FC-MoE's variants of a seed share their sketch keys
        coordinator = run_in_process(aggregator, silos, run_id=f"bench-seed{seed}", agents=agents)
        rows = coordinator.metrics.rows()
        ok = coordinator.machine.succeeded
        accuracy = labelskew_accuracy(Path(tmp), aggregator, silos) if setting.get("labelskew") and ok else {}
    last_local = next((r for r in reversed(rows) if r.get("local_loss") is not None), {})
    return {"setting": setting["name"], "method": method, "seed": seed, "ok": ok,
            "seconds": time.perf_counter() - start,
            "global": [r["global_loss"] for r in rows],
            "local": [r["local_loss"] for r in rows],
            # per domain = per silo where each silo holds one domain (the conflict suite, Shakespeare genres)
            "global_by_domain": _by_domain(rows[-1] if rows else {}, "global_loss/"),
            "local_by_domain": _by_domain(last_local, "local_loss/"),
            "conflict": conflict_fractions(agents, len(rows)),
            **accuracy}


def conflict_fractions(agents: list, rounds: int) -> list[float | None]:
    """Per round (1-based, index r-1): the share of (silo, expert) updates whose cosine with the previous
    global update is negative (silo.measure_conflict); None before there is a previous update."""
    out: list[float | None] = []
    for r in range(1, rounds + 1):
        opposed = sum(a.state.conflicts.get(r, (0, 0))[0] for a in agents)
        compared = sum(a.state.conflicts.get(r, (0, 0))[1] for a in agents)
        out.append(opposed / compared if compared else None)
    return out


def labelskew_accuracy(run_dir: Path, aggregator, silos: list) -> dict:
    """Accuracy of every round's global model on the balanced global test set, and of each silo's final
    model (its personalised model where it has one) on its own test split."""
    import torch

    from fcmoe.export import federated_model, locate, output_layer_name, personalised_weight
    from fcmoe.model import ExpertLayout, load_trainable_state
    from silo_agent.classify import classify
    from silo_agent.data import tokenizer_for
    from silo_agent.data.classification import (DEFAULT_LABELS, build_labelskew_dataset, label_word,
                                                labelskew_test_set)

    data = aggregator.data
    keys = data.labelskew.model_dump()
    tok = tokenizer_for(aggregator.model)
    labels = list(keys["labels"] or DEFAULT_LABELS[keys["source"]])
    words = [label_word(x) for x in labels]
    test = labelskew_test_set(num_silos=len(silos), **keys)
    model, _ = federated_model(locate(run_dir, "0"))
    layout = ExpertLayout.from_model(model)
    curve = []
    for version in range(aggregator.federation.rounds + 1):  # version 0: the pretrained start
        load_trainable_state(model, layout.merge(locate(run_dir, str(version)).units))
        curve.append(classify(model, tok, test, words, batch_size=data.eval_batch_size,
                              max_length=data.max_length).accuracy)
    local = {}
    for silo in silos:
        source = locate(run_dir, silo=silo.silo.name)
        model, _ = federated_model(source)
        if source.personal is not None:
            head = model.get_submodule(output_layer_name(model))
            with torch.no_grad():
                head.weight.copy_(personalised_weight(head.weight, source.personal))
        _, own_test = build_labelskew_dataset(silo_index=silo.silo.index, num_silos=len(silos), **keys)
        local[silo.silo.name] = classify(model, tok, own_test, words, batch_size=data.eval_batch_size,
                                         max_length=data.max_length).accuracy
    return {"global_accuracy": curve, "local_accuracy": local}


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
            if not any((method, seed) in by for seed in seeds):
                continue  # not run on this setting (its methods)
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
            res[method].update(_accuracy_summary([by[(method, s)] for s in seeds if (method, s) in by],
                                                 [by.get(("fedavg", s)) for s in seeds if (method, s) in by]))
        out[setting] = res
    return out


def _accuracy_summary(runs: list[dict], refs: list[dict | None]) -> dict:
    """Label-skew settings: final global accuracy (mean and seed spread), mean local accuracy, versions
    until the global accuracy reaches FedAvg's final (same seed), and the conflict fraction."""
    if not runs or any("global_accuracy" not in r for r in runs):
        return {}
    finals = [r["global_accuracy"][-1] for r in runs]
    reach = [None if ref is None or "global_accuracy" not in ref else
             next((v for v, a in enumerate(r["global_accuracy"]) if a >= ref["global_accuracy"][-1] - 1e-9), None)
             for r, ref in zip(runs, refs)]
    conflict = [c for r in runs for c in r["conflict"] if c is not None]
    length = len(runs[0]["global_accuracy"])
    return {
        "final_global_accuracy": _mean(finals),
        "final_global_accuracy_per_seed": finals,
        "global_accuracy_spread": _spread(finals),
        "mean_local_accuracy": _mean([_mean(list(r["local_accuracy"].values())) for r in runs]),
        "mean_local_accuracy_per_seed": [_mean(list(r["local_accuracy"].values())) for r in runs],
        "rounds_to_fedavg_final_accuracy": _mean_if_all(reach),
        "rounds_to_fedavg_final_accuracy_per_seed": reach,
        "conflict_fraction": _mean(conflict),
        "conflict_fraction_by_round": [_mean([r["conflict"][i] for r in runs]) for i in range(len(runs[0]["conflict"]))],
        "accuracy_curve": [_mean([r["global_accuracy"][v] for r in runs]) for v in range(length)],
    }


def _spread(xs: list[float]) -> float:
    """Sample standard deviation over seeds (0 for one seed)."""
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def check_accuracy_targets(res: dict) -> dict:
    """The paper-setting targets of each FC-MoE variant against FedAvg: global accuracy above FedAvg's
    by more than the seed spread (the larger of the two sample deviations), local accuracy above
    FedAvg's, and versions to FedAvg's final global accuracy at most 0.7 of FedAvg's."""
    fa, out = res["fedavg"], {}
    for variant in ("fcmoe", "fcmoe-sketch", "fcmoe-paper"):
        fc = res.get(variant)
        if not fc or fc.get("final_global_accuracy") is None:
            continue
        gap = fc["final_global_accuracy"] - fa["final_global_accuracy"]
        spread = max(fc["global_accuracy_spread"], fa["global_accuracy_spread"])
        fr, ar = fc["rounds_to_fedavg_final_accuracy"], fa["rounds_to_fedavg_final_accuracy"]
        ratio = fr / ar if fr is not None and ar else None
        out[variant] = {"global_accuracy_gap": gap, "seed_spread": spread, "global_above_by_more_than_spread": gap > spread,
                        "local_accuracy_gap": fc["mean_local_accuracy"] - fa["mean_local_accuracy"],
                        "local_above_fedavg": fc["mean_local_accuracy"] > fa["mean_local_accuracy"],
                        "rounds_ratio": ratio, "rounds_ratio_le_0.7": ratio is not None and ratio <= 0.7}
    return out


def check_targets(summary: dict) -> dict:
    checks = {}
    for setting, res in summary.items():
        fc, fa = res.get("fcmoe"), res.get("fedavg")
        if fa and fa.get("final_global_accuracy") is not None:
            checks[setting] = check_accuracy_targets(res)
            continue
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
        for ablation in ("fcmoe-sketch-no-importance", "fcmoe-sketch-no-projection", "fcmoe-sketch-no-retention"):
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
        accuracy = all(r.get("accuracy_curve") for r in res.values())
        for i, (method, r) in enumerate(res.items()):
            color = f"C{i % 10}"
            if accuracy:  # label-skew classification: global accuracy on the balanced test set, per version
                ax.plot(range(len(r["accuracy_curve"])), r["accuracy_curve"], "-" if i < 10 else "--", color=color,
                        label=method)
                continue
            ax.plot(range(len(r["global_curve"])), r["global_curve"], "-", color=color, label=f"{method} global")
            pts = [(x, y) for x, y in enumerate(r["personalised_curve"]) if y is not None]
            if pts:
                ax.plot(*zip(*pts), "--", color=color, alpha=0.7)
        if accuracy:
            ax.set_title(f"{setting}: global model's accuracy")
            ax.set_ylabel("accuracy, balanced global test set")
        else:
            ax.set_title(f"{setting} (solid: global, dashed: personalised)")
            ax.set_ylabel("held-out loss, mean over domains")
        ax.set_xlabel("round")
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


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _mean_if_all(xs: list) -> float | None:
    """Mean of per-seed round counts, or None when any seed never got there (or there are none)."""
    return _mean(xs) if xs and all(x is not None for x in xs) else None


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def prepare_model(config) -> None:
    """A pretrained benchmark's model, made once into ``model.path`` (later runs reuse it): upcycled
    from SmolLM2, or pre-trained here on unlabelled text (benches/pretrained_moe.py)."""
    path = config.model.path
    if config.model.source != "local" or path is None or (path / "config.json").exists():
        return
    if config.benchmark.pretrain is not None:
        from benches.pretrained_moe import pretrain_moe

        pretrain_moe(config.benchmark.pretrain, config.model_dump(mode="json")["benchmark"]["settings"], path,
                     config.data.max_length)
        return
    recipe = config.benchmark.upcycle
    if recipe is None:
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
    parser.add_argument("--json", action="store_true",
                        help="print only the JSON result line on stdout (progress goes to stderr either way)")
    args = parser.parse_args(argv)
    from fcmoe.config import load_config

    config = load_config(args.config)
    if config.benchmark is None:
        print(f"fcmoe: error: {args.config}: no benchmark section", file=sys.stderr)
        return 2
    if config.benchmark.pretrain is not None and args.seeds > config.benchmark.pretrain.held_out_seeds:
        print(f"fcmoe: error: --seeds {args.seeds}: the pretrained model kept only seeds 0..."
              f"{config.benchmark.pretrain.held_out_seeds - 1}'s test passages out of its text "
              "(benchmark.pretrain.held_out_seeds)", file=sys.stderr)
        return 2
    prepare_model(config)
    base = config.model_dump(mode="json")
    methods = args.methods.split(",") if args.methods else list(config.benchmark.methods)
    if "fedavg" not in methods:
        methods.insert(0, "fedavg")  # the reference of every comparison
    settings = [s for s in base["benchmark"]["settings"] if not args.settings or s["name"] in args.settings.split(",")]
    jobs = [(base, s, m, seed) for s in settings for seed in range(args.seeds) for m in methods
            if not s.get("methods") or m in s["methods"]]
    start = time.perf_counter()
    runs: list[dict] = []
    with ProcessPoolExecutor(max_workers=config.benchmark.workers, mp_context=get_context("spawn")) as pool:
        for i, result in enumerate(pool.map(one_run, jobs)):
            runs.append(result)
            # progress on stderr (stdout keeps the one JSON line)
            accuracy = (f" accuracy {result['global_accuracy'][-1]:.3f} local "
                        f"{_mean(list(result['local_accuracy'].values())):.3f}" if "global_accuracy" in result else "")
            print(f"[{i + 1}/{len(jobs)}] {result['setting']} {result['method']} seed {result['seed']}: "
                  f"{'' if result['ok'] else 'NOT COMPLETED '}global {_fmt(result['global'][-1])} personalised "
                  f"{_fmt(result['local'][-1])}{accuracy} ({result['seconds']:.0f}s)", file=sys.stderr)
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
