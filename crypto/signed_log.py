"""Append-only, hash-chained, signed JSON lines (the privacy ledger's format), written and checked here.

Each line is the canonical JSON (sorted keys, no spaces, ASCII) of one entry. An entry carries
``index`` (0, 1, ...), ``prev`` (SHA-256 hex of the previous line's bytes; 64 zeros for the first)
and ``signature``: ECDSA P-256 / SHA-256, base64, by the writer's certificate key over the canonical
JSON of the entry without its signature. So a changed byte breaks that line's signature and the next
line's ``prev``; a removed or reordered line breaks the chain and the indices; a line signed with
another key fails against the writer's certificate. A truncated tail cannot be seen from the ledger
alone: the writer therefore signs *receipts* (its entry count and the digest of its last line, bound
to a run and round) that a second party keeps; :func:`compare_with_receipt` then tells a ledger that
lost entries a receipt vouches for. Receipt signing and checking are pure functions here, the
keeping is the aggregator's (aggregator/receipts.py) and the auditor's (``fcmoe audit verify --receipts``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fcmoe.errors import FcMoeError

GENESIS = "0" * 64
#: Domain separation: a receipt signature can never be taken for a ledger line's, or the reverse.
RECEIPT_TAG = b"fcmoe/ledger-receipt/v1\0"


class LedgerError(FcMoeError):
    """A ledger line that does not verify; the message names the line."""


def canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def line_digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def append_durably(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` (created 0600) and fsync it, and its folder entry when new: an
    append-only record must survive a crash the moment its writer goes on."""
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:  # the directory entry of a new file must reach the disk too
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class SignedLog:
    """The writer's side: appends signed, chained lines with fsync; never rewrites one."""

    def __init__(self, path: Path, key_pem: bytes, cert_pem: bytes):
        self.path = Path(path)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise LedgerError("the ledger is signed with the silo's ECDSA certificate key")
        self._key = key
        # a writer that resumes checks what it resumes from: it never appends to a broken chain
        self.entries = verify(self.path, cert_pem) if self.path.exists() else []
        #: SHA-256 of every line, in order: what a receipt's head hash is compared with
        self.digests = [line_digest(line) for line in self.path.read_bytes().splitlines()] if self.entries else []
        self._prev = self.digests[-1] if self.digests else GENESIS

    @property
    def head(self) -> str:
        """Digest of the last line (GENESIS for an empty log): with ``len(entries)``, what a receipt anchors."""
        return self._prev

    def sign(self, message: bytes) -> bytes:
        """ECDSA P-256 / SHA-256 signature by the writer's key (receipts: :func:`receipt_message`)."""
        return self._key.sign(message, ec.ECDSA(hashes.SHA256()))

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        body = {**entry, "index": len(self.entries), "prev": self._prev}
        signature = self._key.sign(canonical(body), ec.ECDSA(hashes.SHA256()))
        full = {**body, "signature": base64.b64encode(signature).decode()}
        line = canonical(full)
        append_durably(self.path, line + b"\n")
        self._prev = line_digest(line)
        self.digests.append(self._prev)
        self.entries.append(full)
        return full


def _no_constant(name: str) -> Any:
    """json.loads hook: NaN and +-Infinity are not JSON, and a ledger never holds them."""
    raise ValueError(f"{name} is not a JSON number")


def parse_line(line: bytes) -> dict[str, Any]:
    """One ledger (or receipts) line as a JSON object; ValueError (one line) when it is not one."""
    try:
        entry = json.loads(line, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a JSON line ({exc.msg} at column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # NaN or Infinity (see _no_constant), absurd nesting
        raise ValueError(f"not a JSON line ({exc})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"not a JSON object but a {type(entry).__name__}")
    return entry


def read_lines(path: Path) -> list[bytes]:
    """The file's lines; LedgerError naming the file when it cannot be read."""
    try:
        return Path(path).read_bytes().splitlines()
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None


def _lines(path: Path) -> Iterator[tuple[dict[str, Any], bytes]]:
    for number, line in enumerate(read_lines(path), start=1):
        try:
            entry = parse_line(line)
        except ValueError as exc:
            raise LedgerError(f"{path}: line {number}: {exc}") from None
        yield entry, line


def load_public_key(cert_pem: bytes, what: str = "the certificate") -> ec.EllipticCurvePublicKey:
    """The ECDSA key of a PEM certificate; LedgerError (one line) for anything else, e.g. a key file."""
    try:
        public = x509.load_pem_x509_certificate(cert_pem).public_key()
    except ValueError:
        hint = " (that is a private key; pass the certificate silo-NAME.pem)" if b"PRIVATE KEY" in cert_pem else ""
        raise LedgerError(f"{what} is not a PEM X.509 certificate{hint}") from None
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise LedgerError(f"{what} does not hold an ECDSA key")
    return public


def verify(path: Path, cert_pem: bytes) -> list[dict[str, Any]]:
    """Every entry of the log, after checking chain, indices and signatures; LedgerError names the line."""
    return [entry for entry, _ in verify_with_digests(path, cert_pem)]


def verify_with_digests(path: Path, cert_pem: bytes) -> list[tuple[dict[str, Any], str]]:
    """:func:`verify`, each entry with its line's digest (the next line's ``prev``, a receipt's head)."""
    public = load_public_key(cert_pem)
    entries, prev = [], GENESIS
    for number, (entry, line) in enumerate(_lines(path), start=1):
        where = f"{path}: line {number}"
        try:
            if line != canonical(entry):
                raise LedgerError(f"{where}: not in canonical form (edited?)")
        except (TypeError, ValueError):
            raise LedgerError(f"{where}: holds a value canonical JSON cannot encode") from None
        index = entry.get("index")
        if type(index) is not int or index != number - 1:
            raise LedgerError(f"{where}: index {repr(index)[:40]}, expected {number - 1} (line removed or moved?)")
        if entry.get("prev") != prev:
            raise LedgerError(f"{where}: does not chain to the previous line (changed, removed or reordered)")
        body = {k: v for k, v in entry.items() if k != "signature"}
        signature = entry.get("signature")
        try:
            if not isinstance(signature, str):
                raise ValueError("no signature string")
            public.verify(base64.b64decode(signature, validate=True), canonical(body), ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            raise LedgerError(f"{where}: signature does not verify against the certificate") from None
        prev = line_digest(line)
        entries.append((entry, prev))
    return entries


# --------------------------------------------------------------------------------------------------
# Receipts: a second party's evidence of how long the log was (pure functions, no I/O)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Receipt:
    """The writer's signed statement: in ``run_id`` at ``round`` its log held ``length`` entries, the
    last one's line digest ``head_hash`` (GENESIS when empty)."""

    silo: str
    run_id: str
    round: int
    length: int
    head_hash: str
    signature: bytes = b""

    def message(self) -> bytes:
        return receipt_message(self.silo, self.run_id, self.round, self.length, self.head_hash)

    def to_json(self) -> dict[str, Any]:
        return {"silo": self.silo, "run_id": self.run_id, "round": self.round, "length": self.length,
                "head_hash": self.head_hash, "signature": base64.b64encode(self.signature).decode()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Receipt":
        """ValueError (one line) unless every field is there with its type."""
        types = {"silo": str, "run_id": str, "round": int, "length": int, "head_hash": str, "signature": str}
        for key, kind in types.items():
            value = data.get(key)
            if type(value) is not kind:
                raise ValueError(f"receipt field {key!r} is {repr(value)[:40]}, expected {kind.__name__}")
        try:
            signature = base64.b64decode(data["signature"], validate=True)
        except ValueError:
            raise ValueError("receipt signature is not base64") from None
        return cls(data["silo"], data["run_id"], data["round"], data["length"], data["head_hash"], signature)


def receipt_message(silo: str, run_id: str, round_: int, length: int, head_hash: str) -> bytes:
    """What a receipt signature covers: a tag, then the canonical JSON of its fields."""
    return RECEIPT_TAG + canonical({"silo": silo, "run_id": run_id, "round": int(round_), "length": int(length),
                                    "head_hash": head_hash})


def check_receipt_fields(receipt: Receipt) -> None:
    """ValueError (one line) for a receipt no honest writer makes: negative numbers, a malformed head."""
    if receipt.length < 0 or receipt.round < 0:
        raise ValueError(f"receipt length {receipt.length} or round {receipt.round} is negative")
    if len(receipt.head_hash) != 64 or any(c not in "0123456789abcdef" for c in receipt.head_hash):
        raise ValueError("receipt head_hash is not a SHA-256 hex digest")
    if (receipt.length == 0) != (receipt.head_hash == GENESIS):
        raise ValueError(f"receipt of {receipt.length} entries with head {receipt.head_hash[:12]}...")


def verify_receipt(receipt: Receipt, cert_pem: bytes) -> None:
    """LedgerError (one line) unless ``receipt`` is well formed and signed by the key of ``cert_pem``."""
    public = load_public_key(cert_pem, "the silo certificate")
    try:
        check_receipt_fields(receipt)
    except ValueError as exc:
        raise LedgerError(str(exc)) from None
    try:
        public.verify(receipt.signature, receipt.message(), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise LedgerError(f"receipt of silo {receipt.silo[:64]!r} (run {receipt.run_id[:64]}, round {receipt.round}) "
                          "is not signed by the silo's certificate key") from None


def compare_with_receipt(digests: Sequence[str], receipt: Receipt) -> str | None:
    """Why a log whose line digests are ``digests`` cannot be the one ``receipt`` vouches for, else None.

    A log may have grown since the receipt; it may not have fewer entries (a cut tail) nor a different
    entry at the receipt's length (rewritten)."""
    if len(digests) < receipt.length:
        return (f"ledger has {len(digests)} entries but the aggregator holds a receipt for {receipt.length} "
                f"(run {receipt.run_id}, round {receipt.round}): cut tail")
    head = digests[receipt.length - 1] if receipt.length else GENESIS
    if head != receipt.head_hash:
        return (f"ledger entry {receipt.length} differs from the one the aggregator holds a receipt for "
                f"(run {receipt.run_id}, round {receipt.round}): rewritten")
    return None


def finite_number(value: Any) -> bool:
    """A JSON number (not a bool) that is finite: what every numeric ledger field must be."""
    return type(value) in (int, float) and math.isfinite(value)
