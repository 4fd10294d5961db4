"""Append-only, hash-chained, signed JSON lines (the privacy ledger's format), written and checked here.

Each line is the canonical JSON (sorted keys, no spaces, ASCII) of one entry. An entry carries
``index`` (0, 1, ...), ``prev`` (SHA-256 hex of the previous line's bytes; 64 zeros for the first)
and ``signature``: ECDSA P-256 / SHA-256, base64, by the writer's certificate key over the canonical
JSON of the entry without its signature. So a changed byte breaks that line's signature and the next
line's ``prev``; a removed or reordered line breaks the chain and the indices; a line signed with
another key fails against the writer's certificate; a truncated tail is caught by comparing the
last index with what the writer reported elsewhere (the ledger itself cannot know it was cut).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fcmoe.errors import FcMoeError

GENESIS = "0" * 64


class LedgerError(FcMoeError):
    """A ledger line that does not verify; the message names the line."""


def canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def line_digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


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
        last = self.path.read_bytes().splitlines()[-1] if self.entries else None
        self._prev = line_digest(last) if last is not None else GENESIS

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        body = {**entry, "index": len(self.entries), "prev": self._prev}
        signature = self._key.sign(canonical(body), ec.ECDSA(hashes.SHA256()))
        full = {**body, "signature": base64.b64encode(signature).decode()}
        line = canonical(full)
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:  # the directory entry of a new file must reach the disk too
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._prev = line_digest(line)
        self.entries.append(full)
        return full


def _lines(path: Path) -> Iterator[tuple[dict[str, Any], bytes]]:
    for number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LedgerError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(entry, dict):
            raise LedgerError(f"{path}:{number}: not a JSON object")
        yield entry, line


def verify(path: Path, cert_pem: bytes) -> list[dict[str, Any]]:
    """Every entry of the log, after checking chain, indices and signatures; LedgerError names the line."""
    public = x509.load_pem_x509_certificate(cert_pem).public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise LedgerError("the certificate does not hold an ECDSA key")
    entries, prev = [], GENESIS
    for number, (entry, line) in enumerate(_lines(path), start=1):
        where = f"{path}:{number}"
        if line != canonical(entry):
            raise LedgerError(f"{where}: not in canonical form (edited?)")
        if entry.get("index") != number - 1:
            raise LedgerError(f"{where}: index {entry.get('index')!r}, expected {number - 1} (line removed or moved?)")
        if entry.get("prev") != prev:
            raise LedgerError(f"{where}: does not chain to the previous line (changed, removed or reordered)")
        body = {k: v for k, v in entry.items() if k != "signature"}
        try:
            public.verify(base64.b64decode(str(entry.get("signature", "")), validate=True), canonical(body),
                          ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            raise LedgerError(f"{where}: signature does not verify against the certificate") from None
        entries.append(entry)
        prev = line_digest(line)
    return entries
