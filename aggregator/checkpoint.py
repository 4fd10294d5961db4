"""What the aggregator keeps on disk to resume a run after a crash (docs/operations.md, "Restarts").

- ``checkpoints/round-NNNN/`` after every completed round (``round-0000`` at the start): the global
  model and strategy state in safetensors, the metrics so far in ``state.json``; the newest
  ``aggregator.keep_checkpoints`` (3) are kept, and the one whose model had the lowest global loss. Written into a
  temporary folder and renamed into place, so a crash leaves the previous checkpoint or the new one,
  never a torn one; ``latest`` names the newest complete one.
- ``checkpoints/run.json``: the run's identity (run id, layout, base model, strategy), the attempt
  of the round in progress — rewritten *before* an attempt's first task goes out, so a restarted
  aggregator never hands out a session (and so keys and masks) twice — and whether the run finished.
- ``checkpoints/ckks/``: mode ckks, the run's public context and sealed secret key, once dealt.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fcmoe.errors import ConfigError
from fcmoe.fileio import write_atomic

RUN_FILE = "run.json"


@dataclass
class RunRecord:
    run_id: str
    layout_hash: str
    base_fingerprint: str
    strategy: str
    round: int = 0  # the round of the attempt below
    attempt: int = 0  # the last attempt of ``round`` whose tasks may have gone out
    finished: bool = False
    outcome: str = ""


@dataclass
class Checkpoint:
    version: int
    global_units: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray]
    state: dict[str, object] = field(default_factory=dict)


def save_checkpoint(
    root: Path,
    version: int,
    global_units: Mapping[str, np.ndarray],
    strategy_state: Mapping[str, np.ndarray],
    state: Mapping[str, object],
    keep_newest: int = 3,
    best: int | None = None,
) -> Path:
    """Write round ``version``'s checkpoint, then delete older ones but the newest ``keep_newest``
    and ``best`` (the version whose global model had the lowest loss, when one is known)."""
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
    for old in root.glob("round-*"):
        number = old.name.removeprefix("round-")
        if number.isdigit() and not version - keep_newest < int(number) <= version and int(number) != best:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(root: Path) -> Checkpoint:
    """The newest complete checkpoint (``latest``); a missing or unreadable one is a ConfigError."""
    try:
        folder = root / (root / "latest").read_text().strip()
        state = json.loads((folder / "state.json").read_text())
        global_units = load_file(str(folder / "global.safetensors"))
        strategy_file = folder / "strategy.safetensors"
        strategy_state = load_file(str(strategy_file)) if strategy_file.exists() else {}
        return Checkpoint(int(state["version"]), global_units, strategy_state, state)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise ConfigError(f"cannot resume from {root}: latest checkpoint unreadable ({exc})") from None


def write_run_record(root: Path, record: RunRecord) -> None:
    write_atomic(root / RUN_FILE, json.dumps(asdict(record), indent=2))


def read_run_record(root: Path) -> RunRecord | None:
    path = root / RUN_FILE
    if not path.exists():
        return None
    try:
        return RunRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable run record ({exc}); move the folder away to start a new run") from None


def save_ckks_keys(root: Path, public_context: bytes, sealed_secret: bytes) -> None:
    write_atomic(root / "ckks" / "public_context.bin", public_context)
    write_atomic(root / "ckks" / "sealed_secret.bin", sealed_secret)


def load_ckks_keys(root: Path) -> tuple[bytes, bytes] | None:
    folder = root / "ckks"
    try:
        return (folder / "public_context.bin").read_bytes(), (folder / "sealed_secret.bin").read_bytes()
    except FileNotFoundError:
        return None


@dataclass
class ResumePoint:
    record: RunRecord
    checkpoint: Checkpoint
    ckks_keys: tuple[bytes, bytes] | None

    @property
    def first_attempt(self) -> int:
        """Attempts of the next round whose tasks may have gone out before the crash are never reused."""
        return self.record.attempt + 1 if self.record.round == self.checkpoint.version + 1 else 0


def resume_point(root: Path, layout_hash: str, base_fingerprint: str, strategy: str) -> ResumePoint | None:
    """The unfinished run in ``root`` to go on with; None when there is none (or it finished).
    An unfinished run of another model or strategy is refused rather than overwritten."""
    record = read_run_record(root)
    if record is None or record.finished:
        return None
    differs = [name for name, theirs, ours in (("model layout", record.layout_hash, layout_hash),
                                               ("base weights", record.base_fingerprint, base_fingerprint),
                                               ("strategy", record.strategy, strategy)) if theirs != ours]
    if differs:
        raise ConfigError(f"{root} holds unfinished run {record.run_id} with another {', '.join(differs)}; "
                          "use another run.output_dir, or set aggregator.resume: false to start a new run there")
    return ResumePoint(record, load_latest(root), load_ckks_keys(root))


def archive_previous(root: Path) -> Path | None:
    """A new run starts in a folder that holds an earlier run's checkpoints: move them aside, do not mix."""
    if not root.exists() or not any(root.iterdir()):
        return None
    try:
        record = read_run_record(root)
    except ConfigError:
        record = None
    label = record.run_id if record is not None else f"{int(root.stat().st_mtime)}"
    target, copies = root.with_name(f"{root.name}.{label}"), 0
    while target.exists():  # an earlier archive under the same label is kept, never replaced
        copies += 1
        target = root.with_name(f"{root.name}.{label}.{copies}")
    os.replace(root, target)
    return target
