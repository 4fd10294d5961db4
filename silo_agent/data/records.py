"""Training records and their JSONL file format.

A silo's data never leaves the silo, so the loader is the trust boundary for whatever an operator
drops on disk: it parses strictly (``json`` only, a closed set of keys, string values only) and
reports the first problem as one line naming ``FILE:LINE`` so the operator can fix it directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from fcmoe.errors import DataError
from fcmoe.fileio import write_atomic

_TEXT_KEYS = frozenset({"text", "domain"})
_PAIR_KEYS = frozenset({"prompt", "response", "domain"})


@dataclass(frozen=True)
class Example:
    """One training record.

    ``prompt`` is context the model sees but is not scored on; ``response`` is what the loss is
    computed on. A plain-text record is ``prompt=""`` so the loss covers the whole text.
    """

    prompt: str
    response: str
    domain: str


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` silently keeps the last duplicate key; a duplicate is almost always a bug upstream."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_object(line: str, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(line, object_pairs_hook=_reject_duplicate_keys)
    except ValueError as exc:  # JSONDecodeError is a ValueError, as is a duplicate key
        raise DataError(f"{where}: invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _require_str(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def parse_record(obj: dict[str, Any], where: str, default_domain: str) -> Example:
    """Turn one decoded JSON object into an :class:`Example`; ``where`` is ``FILE:LINE`` for errors."""
    keys = set(obj)
    if "text" in keys and ({"prompt", "response"} & keys):
        raise DataError(f"{where}: record has both 'text' and 'prompt'/'response'; use one form")
    allowed = _TEXT_KEYS if "text" in keys else _PAIR_KEYS
    unknown = sorted(keys - allowed)
    if unknown:  # every key of either form: the record may have meant the other one
        raise DataError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_TEXT_KEYS | _PAIR_KEYS)} "
                        "('text', or 'prompt' and 'response'; 'domain' optional)")
    required = {"text"} if "text" in keys else {"prompt", "response"}
    missing = sorted(required - keys)
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}; need 'text' or both 'prompt' and 'response'")
    domain = _require_str(obj, "domain", where) if "domain" in obj else default_domain
    if not domain:
        raise DataError(f"{where}: 'domain' must be a non-empty string")
    if "text" in keys:
        return Example(prompt="", response=_require_str(obj, "text", where), domain=domain)
    return Example(
        prompt=_require_str(obj, "prompt", where),
        response=_require_str(obj, "response", where),
        domain=domain,
    )


def load_jsonl(path: Path, default_domain: str = "default") -> list[Example]:
    """Read a JSONL dataset strictly; the first malformed line raises ``DataError("FILE:LINE: ...")``.

    Each non-empty line is ``{"text": ...}`` or ``{"prompt": ..., "response": ...}``, optionally with
    ``"domain"``; records without one get ``default_domain``.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read dataset: {exc.strerror or exc}") from None
    examples: list[Example] = []
    for number, line_bytes in enumerate(raw.splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not line.strip():
            continue
        examples.append(parse_record(_parse_object(line, where), where, default_domain))
    if not examples:
        raise DataError(f"{path}: no records (the file is empty or holds only blank lines)")
    return examples


def record_to_json(example: Example) -> dict[str, str]:
    """The JSONL form of an example: ``text`` when there is no prompt, so plain text round-trips."""
    if example.prompt == "":
        return {"text": example.response, "domain": example.domain}
    return {"prompt": example.prompt, "response": example.response, "domain": example.domain}


def write_jsonl(path: Path, examples: Iterable[Example]) -> None:
    """Write examples as JSONL atomically, so a crash never leaves a half-written dataset behind."""
    lines = "".join(json.dumps(record_to_json(e), ensure_ascii=False) + "\n" for e in examples)
    write_atomic(Path(path), lines)
