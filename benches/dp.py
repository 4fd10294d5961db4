"""DP-SGD cost on a tiny MoE: step time and peak memory against a non-private step, same batch.

    python -m benches.dp --json

Non-private: the silo's normal step (eager experts, loss.backward, AdamW). Private: the silo's DP
step — ghost clipping for full experts (per-sample norms from token Grams, one reweighted backward),
exact per-sample gradients (vmap over samples, dense experts, LoRA factorised) for LoRA — with
Opacus' optimizer adding noise, AdamW. Each variant runs in its own process, so peak memory (the process's
peak resident set on CPU, ``torch.cuda.max_memory_allocated`` on a GPU) belongs to it alone; the
ratio of the two is printed with the step-time ratio. Prints, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_TIME_RATIO = 2.5


def model_spec(mode: str) -> dict:
    return {"source": "builtin",
            "builtin": {"family": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                        "num_heads": 4, "num_kv_heads": 2, "num_experts": 4, "top_k": 2},
            "trainable": {"mode": mode, "router": True, "lora_rank": 8, "lora_alpha": 16}}


def child(variant: str, mode: str, batch_size: int, steps: int, device: str) -> dict:
    """Time ``steps`` steps of one variant (after two warm-up steps) in this process."""
    import torch

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

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant, "median_step_seconds": statistics.median(times), "peak_bytes": int(peak),
            "trainable_parameters": sum(p.numel() for p in params)}


def measure(mode: str, batch_size: int, steps: int, device: str) -> dict:
    out = {}
    for variant in ("plain", "dp"):
        proc = subprocess.run([sys.executable, "-m", "benches.dp", "--child", variant, "--mode", mode,
                               "--batch-size", str(batch_size), "--steps", str(steps), "--device", device],
                              capture_output=True, text=True, cwd=ROOT, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} run failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "mode": mode,
        "plain": out["plain"],
        "dp": out["dp"],
        "time_ratio": out["dp"]["median_step_seconds"] / out["plain"]["median_step_seconds"],
        "memory_ratio": out["dp"]["peak_bytes"] / out["plain"]["peak_bytes"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--mode", default="lora", choices=["lora", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=["plain", "dp"], help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.mode, args.batch_size, args.steps, args.device)))
        return 0
    import torch

    results = [measure(mode, args.batch_size, args.steps, args.device) for mode in args.modes]
    summary = {
        "benchmark": "dp",
        "batch_size": args.batch_size,
        "device": args.device,
        "results": results,
        "target_time_ratio": TARGET_TIME_RATIO,
        "met": all(r["time_ratio"] <= TARGET_TIME_RATIO for r in results),
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
