"""Checkpoints after every round: global model and strategy state in safetensors, run state in JSON.

Written into a temporary folder and renamed into place, so a crash leaves either the previous
checkpoint or the new one, never a torn one. ``latest`` names the newest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from fcmoe.fileio import write_atomic

KEEP = 2  # round checkpoints kept besides the newest one


def save_checkpoint(
    root: Path,
    version: int,
    global_units: Mapping[str, np.ndarray],
    strategy_state: Mapping[str, np.ndarray],
    state: Mapping[str, object],
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{version:04d}"
    tmp = root / f".round-{version:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {"version": str(version), "layout_hash": str(state.get("layout_hash", ""))}
    save_file({k: np.ascontiguousarray(v) for k, v in global_units.items()}, str(tmp / "global.safetensors"), meta)
    if strategy_state:
        save_file({k: np.ascontiguousarray(v) for k, v in strategy_state.items()}, str(tmp / "strategy.safetensors"))
    (tmp / "state.json").write_text(json.dumps(dict(state), indent=2, default=str))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(root / "latest", final.name + "\n")
    for old in sorted(root.glob("round-*"))[: -(KEEP + 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final

