"""Write docs/operations.md's memory table from the checkpoint configs in configs/checkpoints/.

``make memory-table`` runs this script: for each ``configs/checkpoints/*.yaml`` it plans the silo's
training (:mod:`fcmoe.model.memory_plan`, the same figures as ``fcmoe plan-memory``) at 1, 2, 4 and 8
GPUs and replaces the text between the table markers in docs/operations.md. The table is never
edited by hand; tests/unit/fcmoe/model/test_memory_plan.py checks that it is current.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fcmoe.config import Config
    from fcmoe.model.memory_plan import ModelShape

Entry = tuple[str, "Config", "ModelShape"]  # file stem, its config, its model read on the meta device
ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- memory table: begin (make memory-table) -->", "<!-- memory table: end -->"
GPUS = (1, 2, 4, 8)
LAYOUTS = (("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True))
NAMES = {"mixtral-8x7b": "Mixtral-8x7B", "qwen3-30b-a3b": "Qwen3-30B-A3B", "olmoe-1b-7b": "OLMoE-1B-7B",
         "deepseek-v2-lite": "DeepSeek-V2-Lite", "gpt-oss-20b": "GPT-OSS-20B"}


def checkpoint_entries() -> list[Entry]:
    """(file stem, config, model shape) of every checkpoint config, read from the repository root
    (the configs name their folders relative to it)."""
    from fcmoe.config import load_config
    from fcmoe.model.memory_plan import read_model

    out = []
    for path in sorted((ROOT / "configs" / "checkpoints").glob("*.yaml")):
        config = load_config(path)
        out.append((path.stem, config, read_model(config.model)))
    return out


def render(entries: list[Entry]) -> str:
    """The markdown table: per-rank GiB and whether it fits 80 GiB, per model, GPU count and layout."""
    from fcmoe.model.memory_plan import FIT_GIB, GIB, Plan, plan_memory

    lines = ["| model | weights | trainable | micro-batch | GPUs | ddp | ddp + ckpt | fsdp | fsdp + ckpt |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for stem, config, shape in entries:
        batch, seq = config.federation.local.batch_size, config.data.max_length
        weights = sum(t.nbytes for t in shape.tensors) / GIB
        for n in GPUS:
            cells = []
            for strategy, checkpointing in LAYOUTS:
                total = plan_memory(shape, Plan(n, strategy, batch, seq, checkpointing)).total
                cells.append(f"{total / GIB:.1f} {'yes' if total <= FIT_GIB * GIB else 'no'}")
            head = ([NAMES.get(stem, stem), f"{shape.base_params / 1e9:.2f} B, {weights:.1f} GiB",
                     f"{shape.trainable_params / 1e6:.0f} M", f"{batch} x {seq}"] if n == GPUS[0] else ["", "", "", ""])
            lines.append("| " + " | ".join(head + [str(n)] + cells) + " |")
    return "\n".join(lines)


def main(doc: str) -> None:
    path = Path(doc).resolve()
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc}: the memory table markers are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    entries = checkpoint_entries()
    path.write_text(f"{head}{BEGIN}\n{render(entries)}\n{END}{tail}")
    print(f"{doc}: {len(entries)} models")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tools/memory_table.py docs/operations.md")
    main(sys.argv[1])
