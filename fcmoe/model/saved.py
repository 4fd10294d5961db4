"""What a run leaves on disk so that ``fcmoe export`` can rebuild its models (fcmoe/export.py).

- ``model.json`` (``MODEL_RECORD``): the effective ``model`` section of the config that built the
  model (a local ``model.path`` made absolute), the run's seed, strategy, secure-aggregation mode and,
  for a silo, its name and DP settings. The aggregator writes it next to its checkpoints
  (``run.output_dir/checkpoints/model.json``), a silo into its own folder
  (``run.output_dir/silo-NAME/model.json``). With the expert units of a checkpoint it is all an export needs.
- A silo's saved models (``silo.save``): ``run.output_dir/silo-NAME/round-NNNN/`` after each round
  (``every_round``) and ``final/`` when the run ends (``final`` and ``every_round``), each holding
  ``local.safetensors`` (the silo's trained model, one vector per expert unit, as the aggregator's
  ``global.safetensors``), ``personal.safetensors`` (FC-MoE retention: the personal adapter's
  ``residual.weight`` ``[hidden, hidden]``) and ``state.json``. Written into a temporary folder and
  renamed into place.

Pure file handling: numpy and safetensors, no model code; both roles import it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from fcmoe.errors import ConfigError
from fcmoe.fileio import write_atomic

MODEL_RECORD = "model.json"
FORMAT = "fcmoe-model/1"
SILO_FINAL = "final"


def model_record(config, role: str) -> dict[str, Any]:
    """The part of ``config`` (a ``fcmoe.config.Config``) that rebuilds the model and describes the run."""
    model = config.model.model_dump(mode="json")
    if config.model.path is not None:
        model["path"] = str(Path(config.model.path).resolve())
    strategy = config.federation.strategy
    record: dict[str, Any] = {
        "format": FORMAT,
        "role": role,
        "run_name": config.run.name,
        "seed": config.run.seed,
        "model": model,
        "strategy": strategy.name,
        "fcmoe": strategy.fcmoe.model_dump(mode="json") if strategy.name == "fcmoe" else None,
        "secure_aggregation": config.federation.secure_aggregation.mode,
        "rounds": config.federation.rounds,
    }
    if config.silo is not None and role == "silo":
        dp = config.silo.dp
        record["silo"] = config.silo.name
        record["dp"] = {"enabled": dp.enabled, "ledger": str(Path(dp.ledger).resolve()),
                        "epsilon_budget": dp.epsilon_budget, "delta": dp.delta} if dp.enabled else {"enabled": False}
    return record


def write_model_record(folder: Path, config, role: str = "aggregator") -> None:
    write_atomic(Path(folder) / MODEL_RECORD, json.dumps(model_record(config, role), indent=2) + "\n")


def read_model_record(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MODEL_RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing (a run written before `fcmoe export` existed? rerun, or copy the "
                          "run's config there)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a {FORMAT} record")
    return record


def silo_folder(output_dir: Path, silo: str) -> Path:
    return Path(output_dir) / f"silo-{silo}"


def save_silo_model(folder: Path, label: str, record: Mapping[str, Any], units: Mapping[str, np.ndarray],
                    state: Mapping[str, Any], personal: np.ndarray | None = None) -> Path:
    """Write one of a silo's saved models as ``folder/label`` (replacing an older one of that label)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / MODEL_RECORD, json.dumps(dict(record), indent=2) + "\n")
    final = folder / label
    tmp = Path(tempfile.mkdtemp(prefix=f".{label}.", suffix=".tmp", dir=folder))
    try:
        meta = {"layout_hash": str(state.get("layout_hash", ""))}
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in units.items()},
                  str(tmp / "local.safetensors"), meta)
        if personal is not None:
            save_file({"residual.weight": np.ascontiguousarray(personal, dtype=np.float32)},
                      str(tmp / "personal.safetensors"))
        (tmp / "state.json").write_text(json.dumps(dict(state), indent=2, default=str) + "\n")
        os.chmod(tmp, 0o755)
        if final.exists():
            old = final.with_name(f".{label}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
