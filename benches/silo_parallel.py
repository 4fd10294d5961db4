"""A silo on two ranks against one process: memory per rank, the update, and what persistent ranks save.

    python -m benches.silo_parallel --json

A built-in Mixtral-style MoE of 371 M parameters (24 layers of 8 experts, hidden 1024, expert width
512; fp32 on the CPU, about 1.5 GB; 676 M with ``--intermediate-size 1024``; LoRA rank 8 on the
experts, router trained) trains the same rounds three ways,
each in a fresh interpreter so that its memory high-water mark is its own (``--hidden-size``,
``--intermediate-size`` and ``--num-layers`` change the model; tests/integration/test_benches.py runs it
tiny):

- ``one``: one process (``world_size: 1``);
- ``fsdp``: two ranks, ``silo.parallel: fsdp``, started once and kept for every round;
- ``respawn``: the same two ranks started afresh every round (build, base broadcast, then training:
  what a silo paid per round before ranks persisted);
- ``streamed``: ``fsdp`` from the same model saved as a local checkpoint, which rank 0 reads layer by
  layer as it hands it out (what a silo does with ``source: local``): one round;
- ``threads``: ``one`` on two threads instead of one, one round: how far the update moves when only
  the order of float sums changes (``one_process_two_threads_relative_diff``), the scale against which
  ``update_relative_diff`` reads;
- ``one-ranks-allocator``: ``one`` with the glibc setting CPU ranks use (``map_large_blocks_directly``;
  a one-process silo keeps glibc's default), two rounds, checkpointed: ``memory_ratio_ranks_allocator``
  is a rank's peak over that process's, the ratio with the allocator the same on both sides.

Reported, last, as one JSON object: each rank's peak resident memory in the last round (start-up
apart) and ``memory_ratio`` = a training rank's peak (rank 1) over the one process's peak;
``rank0_memory_ratio`` for rank 0, which is also the agent: its model is its shard, through which it
evaluates and reads the update; ``startup_peak_mib``, the peak while the model is built (rank 0 of ``fsdp``
builds the whole model on the host once, hands it out tensor by tensor and drops it; rank 0 of
``streamed`` never holds more than a layer of it: ``streamed_startup_ratio`` is its start-up peak over
``fsdp``'s, and ``streamed_update_relative_diff`` its first update against ``fsdp``'s);
``above_base_ratio``, the same ratio after taking off each process's memory before its model was
built (interpreter, libraries, data: ``base_mib``), which is what a GPU allocator's peaks compare; both
with and without activation checkpointing (``memory_ratio`` itself: with it, on both sides);
``update_relative_diff`` = |update_fsdp - update_one| / |update_one| over the trainable numbers after
the first round, read against ``one_process_two_threads_relative_diff`` (AdamW's first step divides
each gradient by its own size, so elements whose gradient is near zero take their sign from rounding:
in this 24-layer model any change in the order of float sums, threads included, moves the update by
tenths; the tests hold sharded training to one process's update within 1e-3 on shallow models); round
times and ``respawn_over_persistent`` (median round time when respawning over persistent). Memory is
the process's resident-set high-water mark (``VmHWM``, started afresh with each round;
``ru_maxrss`` would carry the parent's over a spawn), interpreter and libraries included, the same in
every variant; on CUDA the figures would be the allocator's peaks instead.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"builtin": {"family": "mixtral", "hidden_size": 1024, "intermediate_size": 512, "num_layers": 24,
                     "num_heads": 16, "num_kv_heads": 4, "num_experts": 8, "top_k": 2},
         "trainable": {"mode": "lora", "lora_rank": 8, "lora_alpha": 16, "router": True}}


SHAPE = ("hidden_size", "intermediate_size", "num_layers")  # what the command line may change (a smoke test
# runs the bench on a tiny model)


def _model(shape: dict) -> dict:
    return {**MODEL, "builtin": {**MODEL["builtin"], **shape}}


# the one-process variants: (torch threads, the ranks' allocator setting); the others train on two fsdp ranks
# (``fsdp``: persistent; ``respawn``: fresh ranks every round; ``streamed``: from the local checkpoint)
_ONE_PROCESS = {"one": (1, False), "threads": (2, False), "one-ranks-allocator": (1, True)}


def _variant(variant: str, rounds: int, steps: int, batch_size: int, out: Path, checkpointing: bool,
             shape: dict) -> dict:
    """One variant, in this (fresh) process: trains ``rounds`` rounds and saves the trained state."""
    from safetensors.torch import save_file

    from fcmoe.config import ModelConfig
    from fcmoe.model import build_model, checkpoint_activations, load_trainable_state, trainable_state
    from fcmoe.plan import RoundPlan
    from silo_agent.distributed import RankSetup, SiloRanks
    from silo_agent.memory import map_large_blocks_directly, memory_bytes, peak_memory_bytes, reset_peak_memory
    from silo_agent.training import train_locally

    threads, ranks_allocator = _ONE_PROCESS.get(variant, (1, False))
    torch.set_num_threads(threads)
    if ranks_allocator:
        map_large_blocks_directly()
    spec = ModelConfig.model_validate(_model(shape))
    if variant == "streamed":
        return _streamed(spec.model_copy(update={"source": "local", "path": out / "checkpoint"}), steps, batch_size,
                         out, checkpointing)
    data = _data()
    cpu = torch.device("cpu")
    bases = [memory_bytes(cpu)]  # before the model: interpreter, libraries, data
    model = build_model(spec, cpu)
    if checkpointing:
        checkpoint_activations(model)
    generator = torch.Generator().manual_seed(1)  # away from PEFT's zero LoRA B, as after a first round
    load_trainable_state(model, {k: v + 0.02 * torch.randn(v.shape, generator=generator)
                                 for k, v in trainable_state(model).items()})
    save_file(trainable_state(model), str(out / "start.safetensors"))
    parameters = sum(p.numel() for p in model.parameters())
    plan = RoundPlan(local_steps=steps, batch_size=batch_size, learning_rate=1e-3, seed=7)
    setup = RankSetup(spec, "fsdp", 2, cuda=False, activation_checkpointing=checkpointing)
    seconds, peaks, startup = [], [], peak_memory_bytes(cpu)
    ranks = None
    if variant == "fsdp":  # the ranks own the model: rank 0 keeps its shard only, as the agent does
        ranks, model = SiloRanks(model, setup, data, cpu), None
        startup = ranks.startup_peak_bytes
    suffix = "-ckpt" if checkpointing else ""
    try:
        for round_ in range(rounds):
            began = time.perf_counter()
            if variant in _ONE_PROCESS:
                reset_peak_memory(cpu)  # the round's peak, as the ranks report theirs
                train_locally(model, data, plan, cpu)
                peaks, trained = [peak_memory_bytes(cpu)], trainable_state(model)
            else:
                if variant == "respawn":
                    ranks = SiloRanks(model, setup, data, cpu)
                assert ranks is not None
                ranks.train(plan)
                peaks, bases = ranks.peak_bytes_per_rank, ranks.base_bytes_per_rank
                trained = ranks.trainable_state()
                if variant == "respawn":  # the next round's fresh ranks start from this round's state
                    load_trainable_state(model, trained)
                    ranks.close()
                    ranks = None
            seconds.append(time.perf_counter() - began)
            if round_ == 0:
                save_file(trained, str(out / f"{variant}{suffix}-round1.safetensors"))
    finally:
        if ranks is not None:
            ranks.close()
    return {"round_seconds": [round(s, 3) for s in seconds], "peak_bytes": peaks, "base_bytes": bases,
            "startup_peak_bytes": startup, "parameters": parameters}


def _data():
    from silo_agent.data import ByteTokenizer, ExampleBatches, build_silo_dataset

    train, _ = build_silo_dataset(silo_index=0, num_silos=1, domains=["shift_up", "copy", "reverse"],
                                  partition="domain", alpha=0.5, samples_per_silo=64, eval_fraction=0.25, seed=0)
    return ExampleBatches(train, ByteTokenizer(), 32)


def _streamed(spec, steps: int, batch_size: int, out: Path, checkpointing: bool) -> dict:
    """fsdp from the local checkpoint, read layer by layer: no process builds the whole model (the start
    state comes from the file ``one`` wrote)."""
    from safetensors.torch import load_file, save_file

    from fcmoe.model.stream import CheckpointStream
    from fcmoe.plan import RoundPlan
    from silo_agent.distributed import RankSetup, SiloRanks

    cpu = torch.device("cpu")
    data = _data()
    setup = RankSetup(spec, "fsdp", 2, cuda=False, activation_checkpointing=checkpointing)
    ranks = SiloRanks(CheckpointStream(spec), setup, data, cpu)
    try:
        startup = ranks.startup_peak_bytes
        ranks.load_trainable_state(load_file(str(out / "start.safetensors")))
        began = time.perf_counter()
        ranks.train(RoundPlan(local_steps=steps, batch_size=batch_size, learning_rate=1e-3, seed=7))
        seconds = time.perf_counter() - began
        save_file(ranks.trainable_state(), str(out / "streamed-round1.safetensors"))
        peaks, bases = ranks.peak_bytes_per_rank, ranks.base_bytes_per_rank
    finally:
        ranks.close()
    return {"round_seconds": [round(seconds, 3)], "peak_bytes": peaks, "base_bytes": bases,
            "startup_peak_bytes": startup}


def _run_variant(variant: str, rounds: int, steps: int, batch_size: int, out: Path, checkpointing: bool,
                 shape: dict) -> dict:
    flags = ["--activation-checkpointing"] if checkpointing else []
    flags += [f"--{key.replace('_', '-')}={value}" for key, value in shape.items()]
    proc = subprocess.run([sys.executable, "-m", "benches.silo_parallel", "--variant", variant, "--rounds", str(rounds),
                           "--steps", str(steps), "--batch-size", str(batch_size), "--out", str(out)] + flags,
                          cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _relative_diff(out: Path, suffix: str, reference: str = "one", other: str = "fsdp") -> float:
    """|update_other - update_reference| / |update_reference| after the first round."""
    from safetensors.torch import load_file

    start, one, two = (load_file(str(out / f"{n}.safetensors"))
                       for n in ("start", f"{reference}{suffix}-round1", f"{other}{suffix}-round1"))
    num = sum(float(((two[k] - one[k]).double() ** 2).sum()) for k in one)
    den = sum(float(((one[k] - start[k]).double() ** 2).sum()) for k in one)
    return (num / den) ** 0.5


def _memory(runs: dict) -> dict:
    """Peaks of one setting: the one process, each rank, and the ratios a rank reaches."""
    one, one_base = runs["one"]["peak_bytes"][0], runs["one"]["base_bytes"][0]
    rank0, rank1 = runs["fsdp"]["peak_bytes"]
    rank1_base = runs["fsdp"]["base_bytes"][1]
    return {"one_process_peak_mib": one >> 20, "rank_peak_mib": [rank0 >> 20, rank1 >> 20],
            "memory_ratio": round(rank1 / one, 3), "rank0_memory_ratio": round(rank0 / one, 3),
            "startup_peak_mib": {"one": runs["one"]["startup_peak_bytes"] >> 20,
                                 "rank0": runs["fsdp"]["startup_peak_bytes"] >> 20},
            "base_mib": [one_base >> 20, rank1_base >> 20],
            "above_base_ratio": round((rank1 - rank1_base) / (one - one_base), 3)}


def _save_checkpoint(shape: dict, folder: Path) -> None:
    """The built-in model as a local checkpoint (safetensors), for ``streamed``."""
    from fcmoe.config import ModelConfig
    from fcmoe.model.build import build_base_model

    build_base_model(ModelConfig.model_validate(_model(shape))).save_pretrained(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="local steps per round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--intermediate-size", type=int, default=MODEL["builtin"]["intermediate_size"],
                        help="each expert's hidden width (512: 371 M parameters; 1024: 676 M)")
    parser.add_argument("--hidden-size", type=int, default=MODEL["builtin"]["hidden_size"])
    parser.add_argument("--num-layers", type=int, default=MODEL["builtin"]["num_layers"])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["one", "threads", "one-ranks-allocator", "fsdp", "respawn", "streamed"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = {key: getattr(args, key) for key in SHAPE}
    if args.variant:  # one variant in this fresh process, for the parent
        print(json.dumps(_variant(args.variant, args.rounds, args.steps, args.batch_size, args.out,
                                  args.activation_checkpointing, shape)))
        return 0
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fcmoe-silo-parallel-") as tmp:
        out = Path(tmp)
        sizes = (args.rounds, args.steps, args.batch_size, out)
        runs = {v: _run_variant(v, *sizes, False, shape) for v in ("one", "fsdp", "respawn")}
        checkpointed = {v: _run_variant(v, *sizes, True, shape) for v in ("one", "fsdp")}
        diffs = {"plain": _relative_diff(out, ""), "checkpointed": _relative_diff(out, "-ckpt")}
        _save_checkpoint(shape, out / "checkpoint")
        streamed = _run_variant("streamed", 1, *sizes[1:], True, shape)
        streamed_diff = _relative_diff(out, "", reference="fsdp-ckpt", other="streamed")
        _run_variant("threads", 1, *sizes[1:], False, shape)
        threads_diff = _relative_diff(out, "", other="threads")
        allocator = _run_variant("one-ranks-allocator", 2, *sizes[1:], True, shape)
    memory = {name: _memory(variants) for name, variants in (("plain", runs), ("checkpointed", checkpointed))}
    same_allocator = allocator["peak_bytes"][0]
    memory["checkpointed"]["one_process_ranks_allocator_peak_mib"] = same_allocator >> 20
    memory["checkpointed"]["memory_ratio_ranks_allocator"] = round(checkpointed["fsdp"]["peak_bytes"][1] / same_allocator, 3)
    persistent = statistics.median(runs["fsdp"]["round_seconds"][1:] or runs["fsdp"]["round_seconds"])
    respawn = statistics.median(runs["respawn"]["round_seconds"])
    best = memory["checkpointed"]["memory_ratio"]
    result = {
        "bench": "silo_parallel", "parameters": runs["one"]["parameters"],
        **shape, "rounds": args.rounds,
        "local_steps": args.steps, "batch_size": args.batch_size, "world_size": 2, "parallel": "fsdp",
        "memory": memory, "memory_ratio": best, "memory_target": 0.65, "memory_target_met": best <= 0.65,
        "update_relative_diff": max(diffs.values()), "update_relative_diffs": diffs,
        "one_process_two_threads_relative_diff": threads_diff,
        "round_seconds": {v: r["round_seconds"] for v, r in runs.items()},
        "checkpointed_round_seconds": {v: r["round_seconds"] for v, r in checkpointed.items()},
        "streamed": {"startup_peak_mib": [streamed["startup_peak_bytes"] >> 20],
                     "rank_peak_mib": [b >> 20 for b in streamed["peak_bytes"]]},
        "streamed_startup_ratio": round(streamed["startup_peak_bytes"] / checkpointed["fsdp"]["startup_peak_bytes"], 3),
        "streamed_update_relative_diff": streamed_diff,
        "persistent_round_s": round(persistent, 3), "respawn_round_s": round(respawn, 3),
        "respawn_over_persistent": round(respawn / persistent, 3),
        "machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__},
    }
    if not args.json:
        for key, value in result.items():
            print(f"{key}: {value}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
