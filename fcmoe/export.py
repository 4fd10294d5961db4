"""``fcmoe export``: a run's model as standard Hugging Face folders (transformers + PEFT load them).

Input: the aggregator's ``run.output_dir`` (the global model of a kept checkpoint) or a silo's saved
models (``silo.save``; ``run.output_dir/silo-NAME``). The model is rebuilt from the run's
``model.json`` (fcmoe/model/saved.py) with :mod:`fcmoe.model.build`, and the checkpoint's units are
loaded through the run's :class:`ExpertLayout`. Output folder ``DIR``:

- ``adapter/`` (LoRA runs): a PEFT adapter, LoRA on the fused experts through ``target_parameters``
  (and on q/v with ``attention_lora``); every fully trained module (the routers, ``mlp.gate``) goes
  into ``modules_to_save`` with its trained weights. A personalised silo model adds ``lm_head`` there:
  the personal adapter ``A`` gives logits ``W (h + A h)``, i.e. an output layer ``W + W A``
  (silo_agent/personal.py), so it is exactly one trained module more.
- ``base/`` (built-in models only): the seeded base checkpoint and the byte tokenizer
  (fcmoe/model/tokenizer.py). A ``source: local`` run's base is the user's folder, named in the card
  and in ``adapter_config.json``'s ``base_model_name_or_path``.
- ``merged/`` (``--merged``, and always for ``trainable.mode: full``, which has no adapter): a full
  checkpoint with the adapter merged in, plus the tokenizer.
- ``README.md``: a model card; ``export.json``: the same facts, machine-readable.

``DIR`` is written into a temporary sibling folder and renamed at the end (complete or absent).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fcmoe.errors import ConfigError, LayoutError
from fcmoe.logs import log_event
from fcmoe.model.saved import MODEL_RECORD, SILO_FINAL, read_model_record

log = logging.getLogger(__name__)

_ROUND = re.compile(r"round-(\d{4,})")


@dataclass
class Source:
    """One model of a run, as stored: the record that rebuilds it and the units to load."""

    kind: str  # "aggregator" | "silo"
    record: dict[str, Any]
    folder: Path  # the checkpoint / saved-model folder
    label: str  # "round 3", "final (round 3)"
    version: int | None
    units: dict[str, np.ndarray]
    layout_hash: str
    run_id: str
    personal: np.ndarray | None = None  # silo: the personal adapter's residual weight, when it is used
    notes: list[str] = field(default_factory=list)
    global_loss: float | None = None


def _load_units(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    try:
        with safe_open(str(path), "np") as fh:
            meta = fh.metadata() or {}
        return load_file(str(path)), meta
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None


def _rounds(folder: Path, name: str) -> dict[int, Path]:
    out = {}
    for path in folder.glob("round-*"):
        m = _ROUND.fullmatch(path.name)
        if m and (path / name).is_file():
            out[int(m.group(1))] = path
    return dict(sorted(out.items()))


def _listed(rounds: dict[int, Path]) -> str:
    return ", ".join(str(r) for r in rounds) or "none"


def _global_losses(run_dir: Path, latest_state: dict[str, Any]) -> dict[int, float]:
    """Version -> global held-out loss (mean over domains), from metrics.jsonl, else the checkpoint state."""
    out: dict[int, float] = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("global_loss") is not None:
                out[int(row["round"])] = float(row["global_loss"])
    if not out:
        for raw in latest_state.get("metrics", []):
            pool = raw.get("global_pool", {})
            losses = [pool["loss_sum"][d] / n for d, n in pool.get("tokens", {}).items() if n]
            if losses:
                out[int(raw["round"])] = sum(losses) / len(losses)
    return out


def _aggregator_source(run_dir: Path, choice: str | None) -> Source:
    ckpt = run_dir / "checkpoints"
    record = read_model_record(ckpt)
    rounds = _rounds(ckpt, "global.safetensors")
    if not rounds:
        raise ConfigError(f"{ckpt}: no checkpoint to export")
    latest_file = ckpt / "latest"
    latest_name = latest_file.read_text().strip() if latest_file.is_file() else ""
    m = _ROUND.fullmatch(latest_name)
    latest = int(m.group(1)) if m and int(m.group(1)) in rounds else max(rounds)
    state = json.loads((rounds[latest] / "state.json").read_text()) if (rounds[latest] / "state.json").is_file() else {}
    losses = _global_losses(run_dir, state)
    if choice is None or choice == "latest":
        version, how = latest, "latest"
    elif choice == "best":
        if not losses:
            raise ConfigError(f"--round best: {run_dir} records no global loss yet (metrics.jsonl); give --round N "
                              f"(kept: {_listed(rounds)})")
        version, how = min(losses, key=losses.__getitem__), "best"
        if version not in rounds:
            raise ConfigError(f"--round best: round {version} had the lowest global loss but its checkpoint is not "
                              f"kept in {ckpt}; rounds available: {_listed(rounds)}")
    else:
        version, how = _round_number(choice), "chosen"
        if version not in rounds:
            raise ConfigError(f"--round {version}: not kept in {ckpt} (aggregator.keep_checkpoints keeps the newest "
                              f"and the best); rounds available: {_listed(rounds)}")
    folder = rounds[version]
    units, meta = _load_units(folder / "global.safetensors")
    chosen_state = json.loads((folder / "state.json").read_text()) if (folder / "state.json").is_file() else {}
    run_id = str(chosen_state.get("run_id") or state.get("run_id") or "")
    run_file = ckpt / "run.json"
    if not run_id and run_file.is_file():
        run_id = str(json.loads(run_file.read_text()).get("run_id", ""))
    return Source("aggregator", record, folder, f"round {version} ({how})", version, units,
                  meta.get("layout_hash", ""), run_id, global_loss=losses.get(version))


def _round_number(choice: str) -> int:
    if not str(choice).isdigit():
        raise ConfigError(f"--round {choice!r}: give a round number, 'best' or 'latest'")
    return int(choice)


def _silo_source(folder: Path, choice: str | None, local: bool) -> Source:
    record = read_model_record(folder)
    rounds = _rounds(folder, "local.safetensors")
    final = folder / SILO_FINAL
    has_final = (final / "local.safetensors").is_file()
    if choice == "best":
        raise ConfigError("--round best: a silo's saved models carry no global loss; give --round N or leave it out "
                          "(the final model)")
    if choice is None or choice == "latest":
        if has_final:
            chosen, label = final, "final"
        elif rounds:
            version = max(rounds)
            chosen, label = rounds[version], f"round {version} (latest)"
        else:
            raise ConfigError(f"{folder}: holds no saved model (silo.save: final or every_round)")
    else:
        version = _round_number(choice)
        if version not in rounds:
            raise ConfigError(f"--round {version}: {folder} holds no round-{version:04d} (rounds saved with "
                              f"silo.save: every_round: {_listed(rounds)}{'; and final' if has_final else ''})")
        chosen, label = rounds[version], f"round {version}"
    units, meta = _load_units(chosen / "local.safetensors")
    state = json.loads((chosen / "state.json").read_text())
    if label == "final" and state.get("round") is not None:
        label = f"final (round {state['round']})"
    source = Source("silo", record, chosen, label, state.get("round"), units, meta.get("layout_hash", ""),
                    str(state.get("run_id", "")))
    personal_file = chosen / "personal.safetensors"
    if personal_file.is_file():
        used = bool(state.get("personal_used"))
        if local:
            source.notes.append("the silo's local model without its personal adapter (--local)")
        elif used:
            source.personal = _load_units(personal_file)[0]["residual.weight"]
            source.notes.append(f"personalised: the silo's local model plus its personal adapter (prequential gain "
                                f"{state.get('personal_gain')}); the adapter is the trained output layer lm_head")
        else:
            source.notes.append(f"the silo's personal adapter was not in use (prequential gain "
                                f"{state.get('personal_gain')} <= 0), so its personalised model is its local model")
    else:
        source.notes.append("the silo's local model (no personal adapter: FC-MoE retention off, DP, or several ranks)")
    return source


def locate(run_dir: Path, choice: str | None = None, silo: str | None = None, local: bool = False) -> Source:
    """The model to export: the aggregator's global model, or a silo's saved model (``silo`` or a
    ``silo-NAME`` folder given as ``run_dir``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: not a directory (give a run's run.output_dir)")
    if silo is not None:
        folder = run_dir / f"silo-{silo}"
        if not folder.is_dir():
            found = sorted(p.name.removeprefix("silo-") for p in run_dir.glob("silo-*") if p.is_dir())
            raise ConfigError(f"--silo {silo}: {run_dir} holds no silo-{silo} "
                              f"(silos found: {', '.join(found) or 'none'})")
        return _silo_source(folder, choice, local)
    if (run_dir / MODEL_RECORD).is_file():
        return _silo_source(run_dir, choice, local)
    if (run_dir / "checkpoints").is_dir():
        if local:
            raise ConfigError("--local applies to a silo's saved model (give --silo NAME)")
        return _aggregator_source(run_dir, choice)
    silos = sorted(p for p in run_dir.glob("silo-*") if (p / MODEL_RECORD).is_file())
    if len(silos) == 1:
        return _silo_source(silos[0], choice, local)
    if silos:
        raise ConfigError(f"{run_dir} holds several silos' models ({', '.join(p.name for p in silos)}); "
                          "choose one with --silo NAME")
    raise ConfigError(f"{run_dir}: neither an aggregator's output (checkpoints/) nor a silo's saved models "
                      "(silo-NAME/, silo.save)")


# -- models -------------------------------------------------------------------------------------

def model_spec(record: dict[str, Any]):  # -> ModelConfig
    from pydantic import ValidationError

    from fcmoe.config import ModelConfig

    try:
        spec = ModelConfig.model_validate(record["model"])
    except (KeyError, ValidationError) as exc:
        raise ConfigError(f"{MODEL_RECORD}: invalid model section ({str(exc).splitlines()[0]})") from None
    if spec.source == "local" and not Path(spec.path).is_dir():
        raise ConfigError(f"model.path = {spec.path}: the run's base checkpoint folder is not there any more "
                          "(the export needs it)")
    return spec


def federated_model(source: Source):
    """The framework's own model of ``source`` (fcmoe.model.build + the checkpoint's units), and its spec."""
    from fcmoe.model import ExpertLayout, build_model, load_trainable_state

    spec = model_spec(source.record)
    model = build_model(spec, "cpu", seed=int(source.record.get("seed", 0)))
    layout = ExpertLayout.from_model(model)
    if source.layout_hash and source.layout_hash != layout.hash:
        raise LayoutError(f"{source.folder}: checkpoint layout {source.layout_hash[:12]} does not match the model "
                          f"rebuilt from {MODEL_RECORD} ({layout.hash[:12]})")
    load_trainable_state(model, layout.merge(source.units))
    return model.eval(), spec


def output_layer_name(model) -> str:
    layer = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is layer:
            return name
    raise LayoutError("the model's output layer is not one of its modules")


def personalised_weight(weight, residual: np.ndarray):
    """The output layer that gives the personal adapter's logits: ``W (h + A h) = (W + W A) h``."""
    import torch

    a = torch.as_tensor(np.asarray(residual, dtype=np.float32))
    w = weight.detach().float()
    return (w + w @ a).to(weight.dtype)


def _trained_modules(model) -> list[str]:
    """Modules (paths in the base model) with fully trained weights: routers, say."""
    names = {n.removeprefix("base_model.model.").rsplit(".", 1)[0]
             for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    return sorted(names)


def _modules_to_save(base, wanted: list[str]) -> list[str]:
    """``wanted`` as short suffixes (``mlp.gate``) when those match exactly the same modules, else full paths."""
    from fcmoe.model.build import short_names

    return sorted(short_names(wanted, [n for n, _ in base.named_modules() if n]))


def _untie_output(model) -> None:
    """The personalised output layer differs from the input embeddings: save both."""
    import torch

    config = model.config
    if getattr(config, "tie_word_embeddings", False):
        layer = model.get_output_embeddings()
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        config.tie_word_embeddings = False
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if text is not config:
            text.tie_word_embeddings = False


def peft_model(framework, spec, personal: np.ndarray | None, base_name: str):
    """A PeftModel on a fresh base with the framework model's trained numbers, fully trained modules in
    ``modules_to_save`` (and the personalised ``lm_head``); returns (peft model, modules_to_save)."""
    import torch
    from peft import get_peft_model

    from fcmoe.model.build import build_base_model, lora_config

    base = build_base_model(spec)
    head = output_layer_name(base)
    trained = _trained_modules(framework)
    wanted = trained + ([head] if personal is not None and head not in trained else [])
    to_save = _modules_to_save(base, wanted)
    config = lora_config(spec.trainable, base, to_save or None)
    if personal is not None and getattr(base.config, "tie_word_embeddings", False):
        _untie_output(base)  # modules_to_save copies lm_head; keep the embeddings the base's own
    model = get_peft_model(base, config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in framework.named_parameters():
            if not value.requires_grad:
                continue
            target = name
            if "lora_" not in name:
                owner, leaf = name.rsplit(".", 1)
                target = f"{owner}.modules_to_save.default.{leaf}"
            if target not in params:
                raise LayoutError(f"{name}: no place for it in the PEFT model ({target})")
            params[target].copy_(value)
        if personal is not None:
            wrapped = f"base_model.model.{head}.modules_to_save.default.weight"
            params[wrapped].copy_(personalised_weight(framework.get_output_embeddings().weight, personal))
    model.peft_config["default"].base_model_name_or_path = base_name
    return model.eval(), to_save


# -- writing ------------------------------------------------------------------------------------

def _save_tokenizer(spec, folder: Path) -> str:
    if spec.source == "builtin":
        from fcmoe.model.tokenizer import byte_tokenizer

        byte_tokenizer().save_pretrained(folder)
        return "the byte tokenizer (ids 0-255 = bytes, 256 BOS, 257 EOS, 258 PAD)"
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(spec.path), local_files_only=True).save_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"none: {spec.path} has no tokenizer transformers can read ({str(exc).splitlines()[0][:120]})"
    return f"copied from {spec.path}"


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty directory (choose a new folder)")


@dataclass
class Exported:
    out: Path
    parts: list[str]
    source: Source
    notes: list[str]


def export_model(run_dir: Path, out: Path, choice: str | None = None, merged: bool = False,
                 silo: str | None = None, local: bool = False) -> Exported:
    """Write ``out`` (absent or empty) from the run in ``run_dir``; see the module docstring."""
    from fcmoe.model.upcycle import publish_dir

    out = Path(out)
    _check_out(out)
    source = locate(run_dir, choice, silo, local)
    framework, spec = federated_model(source)
    notes = list(source.notes)
    full = spec.trainable.mode == "full"
    if full and not merged:
        notes.append("full-expert run (trainable.mode: full): every expert weight is trained, so there is no "
                     "adapter; merged/ only")
        merged = True
    final_base = str((out / "base").resolve()) if spec.source == "builtin" else str(spec.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    parts: list[str] = []
    try:
        tokenizer = "-"
        if full:
            model = framework
            if source.personal is not None:
                _untie_output(model)
                layer = model.get_output_embeddings()
                layer.weight.data.copy_(personalised_weight(layer.weight, source.personal))
            to_save: list[str] = []
        else:
            if spec.source == "builtin":
                from fcmoe.model.build import build_base_model

                build_base_model(spec).save_pretrained(tmp / "base")
                tokenizer = _save_tokenizer(spec, tmp / "base")
                parts.append("base/")
            # saved against the base as it is now (PEFT reads its config), then pointed at its final place
            saving_base = str(tmp / "base") if spec.source == "builtin" else final_base
            model, to_save = peft_model(framework, spec, source.personal, saving_base)
            model.save_pretrained(tmp / "adapter")
            saved = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
            saved["base_model_name_or_path"] = final_base
            (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
            readme = tmp / "adapter" / "README.md"  # PEFT's card template names the base too
            if readme.is_file():
                readme.write_text(readme.read_text().replace(saving_base, final_base))
            if to_save and not saved.get("modules_to_save"):
                raise LayoutError("the saved adapter lost its modules_to_save (the trained router would be lost)")
            parts.append("adapter/")
        if merged:
            plain = model if full else model.merge_and_unload()
            if source.personal is not None and not full:
                _untie_output(plain)
            plain.save_pretrained(tmp / "merged")
            tokenizer = _save_tokenizer(spec, tmp / "merged")
            parts.append("merged/")
        facts = _facts(source, spec, to_save, parts, final_base, tokenizer, notes)
        (tmp / "export.json").write_text(json.dumps(facts, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text(model_card(facts))
        parts.append("README.md")
        _check_out(out)
        tmp.chmod(0o755)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log_event(log, "exported", source=source.kind, folder=str(source.folder), out=str(out), parts=",".join(parts))
    return Exported(out, parts, source, notes)


def _facts(source: Source, spec, to_save: list[str], parts: list[str], base: str, tokenizer: str,
           notes: list[str]) -> dict[str, Any]:
    record = source.record
    dp = record.get("dp")
    if source.kind == "silo" and dp and dp.get("enabled"):
        privacy = (f"this silo trained under DP-SGD (delta {dp.get('delta')}, "
                   f"budget epsilon {dp.get('epsilon_budget')}); "
                   f"the epsilon spent is in its privacy ledger {dp.get('ledger')} (`fcmoe audit verify`)")
    elif source.kind == "silo":
        privacy = "this silo did not train under DP-SGD"
    else:
        privacy = ("unknown to the aggregator: whether silos trained under DP-SGD is their own setting; if they did, "
                   "the epsilon figures live in each silo's privacy ledger (`fcmoe audit verify LEDGER --cert ... --ca ...`)")
    t = spec.trainable
    trained = (f"LoRA r={t.lora_rank}, alpha={t.lora_alpha} on the fused experts"
               + (" and attention q/v" if t.attention_lora else "") if t.mode == "lora" else "full expert weights")
    if t.router:
        trained += ", router trained"
    what = "the global model" if source.kind == "aggregator" else f"silo {record.get('silo', '?')}'s model"
    return {
        "model": what,
        "run_id": source.run_id,
        "run_name": record.get("run_name"),
        "exported": source.label,
        "version": source.version,
        "global_loss": source.global_loss,
        "source_folder": str(Path(source.folder).resolve()),
        "strategy": record.get("strategy"),
        "fcmoe": record.get("fcmoe"),
        "secure_aggregation": record.get("secure_aggregation"),
        "base_model": base if spec.source == "local" else
        f"built-in {spec.builtin.family} (seed {spec.builtin.seed}, hidden {spec.builtin.hidden_size}, "
        f"{spec.builtin.num_layers} layers, {spec.builtin.num_experts} experts top-{spec.builtin.top_k}) in base/",
        "base_path": base,
        "trainable": trained,
        "modules_to_save": to_save,
        "personalised": source.personal is not None,
        "parts": parts,
        "tokenizer": tokenizer,
        "privacy": privacy,
        "notes": notes,
    }


def model_card(facts: dict[str, Any]) -> str:
    loss = f" (global held-out loss {facts['global_loss']:.4f})" if facts.get("global_loss") is not None else ""
    lines = [
        f"# {facts.get('run_name') or 'fcmoe'}: {facts['model']}",
        "",
        "Exported by `fcmoe export` from a federated fine-tuning run (FC-MoE framework).",
        "",
        f"- Run id: `{facts['run_id'] or 'unknown'}`",
        f"- Round exported: {facts['exported']}{loss}",
        f"- Strategy: {facts['strategy']}" + (" (importance {importance}, projection {projection}, retention "
                                               "{retention})".format(**facts["fcmoe"]) if facts.get("fcmoe") else ""),
        f"- Secure aggregation: {facts['secure_aggregation']}",
        f"- Base model: {facts['base_model']}",
        f"- Trained: {facts['trainable']}"
        + (f"; in the adapter's modules_to_save: {', '.join(facts['modules_to_save'])}"
           if facts["modules_to_save"] else ""),
        f"- Differential privacy: {facts['privacy']}",
        f"- Tokenizer: {facts['tokenizer']}",
        f"- Contents: {', '.join(facts['parts'])}",
    ]
    lines += [f"- Note: {n}" for n in facts["notes"]]
    lines += ["", "## Load (from this folder)", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if "adapter/" in facts["parts"]:
        base = "base" if "base/" in facts["parts"] else facts["base_path"]
        lines += ["from peft import PeftModel", "",
                  f"base = AutoModelForCausalLM.from_pretrained({base!r})",
                  "model = PeftModel.from_pretrained(base, 'adapter')",
                  f"tokenizer = AutoTokenizer.from_pretrained({base!r})"]
    if "merged/" in facts["parts"]:
        lines += ["# or the merged checkpoint:", "model = AutoModelForCausalLM.from_pretrained('merged')",
                  "tokenizer = AutoTokenizer.from_pretrained('merged')"]
    lines += ["ids = tokenizer('qdkx=', return_tensors='pt')", "out = model.generate(**ids, max_new_tokens=8)",
              "print(tokenizer.decode(out[0], skip_special_tokens=True))", "```", ""]
    return "\n".join(lines)


def run_export(run_dir: Path, out: Path, choice: str | None, merged: bool, silo: str | None, local: bool) -> int:
    """``fcmoe export``: prints what was written (and any note) in a few lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a few lines on stdout, not progress bars for tiny shards
    result = export_model(run_dir, out, choice, merged, silo, local)
    src = result.source
    what = "global model" if src.kind == "aggregator" else f"silo {src.record.get('silo', '?')}"
    for note in result.notes:
        print(f"note: {note}")
    print(f"exported {what} of run {src.run_id or '?'}, {src.label} -> {result.out}: {', '.join(result.parts)}")
    return 0
