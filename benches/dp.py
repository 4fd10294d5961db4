"""DP-SGD cost on a tiny MoE: step time and peak memory against a non-private step, same batch.

    python -m benches.dp --json

Non-private: the silo's normal step (eager experts, loss.backward, AdamW). Private: the silo's DP
step — ghost clipping for full experts (per-sample norms from token Grams, one reweighted backward),
exact per-sample gradients (vmap over samples, dense experts, LoRA factorised) for LoRA — with
Opacus' optimizer adding noise, AdamW.

Step time: both variants in one process (two models built alike), their steps taking turns (plain,
dp, dp, plain, ...; benches/interleave.py), so that whatever else runs on the machine weighs on both
alike; ``time_ratio`` is the median of the per-pair ratios, ``time_ratio_spread`` their spread
(quartiles, min, max). Peak memory: each variant in its own process, so that the peak (the process's
peak resident set on CPU, ``torch.cuda.max_memory_allocated`` on a GPU) belongs to it alone; those
runs also give each variant's step time measured on its own, one after the other
(``sequential_time_ratio``, for reference: it is what a load that comes or goes between them
distorts). A mode whose run fails is reported with ``"status": "aborted"`` and its reason, the other
going on; the exit status is 0 unless every mode failed. ``--load N`` runs N CPU-bound processes
beside the benchmark. ``--threads`` sets torch's threads (default: torch's own, one per core): with
one per core, a CPU-bound neighbour stalls the multi-threaded parts of a step (each parallel region
waits for its slowest thread), which weighs on the two variants unequally and changes the ratio
itself; with ``--threads 1`` it does not (benches/load_robust.py). Prints, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benches.interleave import (
    Aborted,
    add_load_argument,
    background_load,
    exit_code,
    interleaved,
    ratio_summary,
    spread,
)

ROOT = Path(__file__).resolve().parents[1]
TARGET_TIME_RATIO = 2.5


def model_spec(mode: str) -> dict:
    return {"source": "builtin",
            "builtin": {"family": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                        "num_heads": 4, "num_kv_heads": 2, "num_experts": 4, "top_k": 2},
            "trainable": {"mode": mode, "router": True, "lora_rank": 8, "lora_alpha": 16}}


def _setup(variant: str, mode: str, batch_size: int, device: str, threads: int | None = None):
    """A fresh model (seed 0) and one training step of ``variant`` on a fixed batch: (step, parameters)."""
    import torch

    torch.device(device)  # a device torch does not know fails here, before the model's imports
    if threads:
        torch.set_num_threads(threads)
    from fcmoe.config import ModelConfig
    from fcmoe.model import build_model
    from silo_agent.dp.training import DpStep, private_step_parts
    from silo_agent.training import token_losses

    torch.manual_seed(0)
    model = build_model(ModelConfig.model_validate(model_spec(mode)), device, seed=0)
    ids = torch.randint(0, 256, (batch_size, 24), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    if variant == "plain":
        optimizer = torch.optim.AdamW(params, lr=1e-3)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            losses, mask = token_losses(model, batch)
            (losses.sum() / mask.sum()).backward()
            optimizer.step()
    else:
        engine, optimizer = private_step_parts(model, DpStep(1.0, 1.0, 0.5), batch_size, 1e-3)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            engine.clip(batch)
            optimizer.step()

    def synced() -> None:
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return synced, params


def child(variant: str, mode: str, batch_size: int, steps: int, device: str, threads: int | None = None) -> dict:
    """Time ``steps`` steps of one variant (after two warm-up steps) in this process: its peak memory
    (it is alone in the process) and, for reference, its step time measured on its own."""
    import torch

    step, params = _setup(variant, mode, batch_size, device, threads)
    for _ in range(2):
        step()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant, "median_step_seconds": statistics.median(times), "peak_bytes": int(peak),
            "trainable_parameters": sum(p.numel() for p in params)}


def interleaved_child(mode: str, batch_size: int, steps: int, device: str, threads: int | None = None) -> dict:
    """Both variants in one process, two models built alike, their steps taking turns (plain, dp,
    dp, plain, ...): ``steps`` pairs, a ratio per pair, after two warm-up steps each."""
    variants = ("plain", "dp")
    parts = {v: _setup(v, mode, batch_size, device, threads) for v in variants}
    for _ in range(2):
        for v in variants:
            parts[v][0]()

    def measure(variant: str, repeat: int) -> float:  # noqa: ARG001
        start = time.perf_counter()
        parts[variant][0]()
        return time.perf_counter() - start

    runs = interleaved(variants, measure, steps)
    for r in runs.values():
        if r.aborted:
            raise RuntimeError(f"{r.name} step failed: {r.reason}")
    plain, dp = (runs[v].by_repeat(lambda t: t) for v in variants)
    return {"steps": steps, "plain_step_seconds": spread(list(plain.values())),
            "dp_step_seconds": spread(list(dp.values())), "time_ratio": ratio_summary(dp, plain),
            "trainable_parameters": sum(p.numel() for p in parts["dp"][1])}


def _run_child(args: list[str], what: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benches.dp", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=1800)
    if proc.returncode != 0:
        raise Aborted(f"{what} failed (exit {proc.returncode}): {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(mode: str, batch_size: int, steps: int, device: str, threads: int | None = None) -> dict:
    """One mode: the step-time ratio from interleaved steps in one process; peak memory (and, for
    reference, each variant's step time measured alone, one after the other) from one process per variant."""
    sizes = ["--mode", mode, "--batch-size", str(batch_size), "--steps", str(steps), "--device", device]
    sizes += ["--threads", str(threads)] if threads else []
    timing = _run_child(["--child", "interleaved", *sizes], "interleaved run")
    out = {v: _run_child(["--child", v, *sizes], f"{v} run") for v in ("plain", "dp")}
    ratio = timing["time_ratio"]
    return {
        "mode": mode,
        "status": "ok",
        **{v: {**out[v], "median_step_seconds": timing[f"{v}_step_seconds"]["median"],
               "step_seconds": timing[f"{v}_step_seconds"], "alone_median_step_seconds": out[v]["median_step_seconds"]}
           for v in ("plain", "dp")},
        "time_ratio": ratio["median"],
        "time_ratio_spread": ratio,
        "sequential_time_ratio": out["dp"]["median_step_seconds"] / out["plain"]["median_step_seconds"],
        "memory_ratio": out["dp"]["peak_bytes"] / out["plain"]["peak_bytes"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--mode", default="lora", choices=["lora", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50, help="timed steps of each variant (default 50)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=["plain", "dp", "interleaved"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help="torch threads of the runs (default: torch's own, one per core); "
                                                     "1 keeps the ratio the same under load")
    add_load_argument(parser)
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args(argv)
    if args.steps < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--steps and --threads must be at least 1")
    if args.child == "interleaved":
        print(json.dumps(interleaved_child(args.mode, args.batch_size, args.steps, args.device, args.threads)))
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.mode, args.batch_size, args.steps, args.device, args.threads)))
        return 0
    import torch

    modes = list(dict.fromkeys(args.modes))
    load: dict = {"processes": 0}
    with background_load(args.load, load, args.load_period):
        runs = interleaved(modes, lambda mode, _: measure(mode, args.batch_size, args.steps, args.device,
                                                          args.threads), 1)
    results = [runs[m].results[0] if runs[m].results else {"mode": m, **runs[m].status_fields(), "time_ratio": None}
               for m in modes]
    done = [r for r in results if r["status"] == "ok"]
    summary = {
        "benchmark": "dp",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "threads": args.threads or torch.get_num_threads(),
        "device": args.device,
        "schedule": "plain and DP steps take turns in one process (plain, dp, dp, plain, ...); "
                    "ratio per pair, median and spread",
        "load": load,
        "results": results,
        "aborted": {m: r.reason for m, r in runs.items() if r.aborted},
        "target_time_ratio": TARGET_TIME_RATIO,
        "met": bool(done) and len(done) == len(results) and all(r["time_ratio"] <= TARGET_TIME_RATIO for r in done),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    print(json.dumps(summary))
    return exit_code(list(runs.values()))


if __name__ == "__main__":
    sys.exit(main())
