"""The aggregator's book of privacy-ledger receipts: ``OUTPUT_DIR/receipts.jsonl``.

A silo's privacy ledger cannot show that its tail was cut (crypto/signed_log.py), so every update of
a DP silo carries a receipt: the ledger's entry count and last line's digest, bound to the run and
round, signed with the silo's certificate key. The aggregator checks the signature against the
silo's TLS client certificate — the one its CA verified in the handshake, so the aggregator needs
no copy of silo certificates — keeps the receipt here (one JSON line, fsynced), and refuses one that
is shorter than, or forks from, a receipt it already holds for that silo in this run. At Join it
returns the newest receipt of the silo in this run (read back from the file after a restart); the
silo then refuses to start from a shorter or different ledger, and ``fcmoe audit verify --receipts``
lets an auditor check a ledger against this file.

Receipts are kept as the silo signed them: an auditor re-verifies every one against the silo's
certificate, so a line edited here is caught too.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from crypto.signed_log import LedgerError, Receipt, append_durably, parse_line, read_lines, verify_receipt
from fcmoe.errors import ProtocolError
from fcmoe.logs import log_event
from protos import fcmoe_pb2 as pb

log = logging.getLogger(__name__)

RECEIPTS_FILE = "receipts.jsonl"


def from_message(message: pb.LedgerReceipt) -> Receipt:
    return Receipt(message.silo, message.run_id, message.round, message.length, message.head_hash,
                   bytes(message.signature))


def to_message(receipt: Receipt) -> pb.LedgerReceipt:
    return pb.LedgerReceipt(silo=receipt.silo, run_id=receipt.run_id, round=receipt.round, length=receipt.length,
                            head_hash=receipt.head_hash, signature=receipt.signature)


def admissible(receipt: Receipt, silo: str, run_id: str, round_: int, held: Receipt | None) -> str | None:
    """Why ``receipt`` (signature already checked) must be refused from ``silo`` for ``round_``, else None."""
    if receipt.silo != silo:
        return f"ledger receipt names silo {receipt.silo[:64]!r}, but the certificate is {silo!r}"
    if receipt.run_id != run_id or receipt.round != round_:
        return f"ledger receipt is for run {receipt.run_id[:64]!r} round {receipt.round}, not run {run_id!r} round {round_}"
    if held is not None and receipt.length < held.length:
        return (f"ledger receipt of {receipt.length} entries is shorter than the {held.length} this aggregator "
                f"holds for silo {silo!r} (round {held.round}): the ledger was cut")
    if held is not None and receipt.length == held.length and receipt.head_hash != held.head_hash:
        return f"ledger receipt of {receipt.length} entries differs from the one held for silo {silo!r}: rewritten"
    return None


class ReceiptBook:
    """Newest receipt per (silo, run), backed by an append-only JSON-lines file. Thread-safe."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._newest: dict[tuple[str, str], Receipt] = {}
        if self.path.exists():
            for number, line in enumerate(read_lines(self.path), start=1):
                try:
                    receipt = Receipt.from_json(parse_line(line))
                except ValueError as exc:  # a torn last line after a crash: the others still count
                    log_event(log, "receipt_line_skipped", level=logging.WARNING, file=str(self.path),
                              line=number, reason=str(exc))
                    continue
                key = (receipt.silo, receipt.run_id)
                if key not in self._newest or receipt.length >= self._newest[key].length:
                    self._newest[key] = receipt

    def newest(self, silo: str, run_id: str) -> Receipt | None:
        with self._lock:
            return self._newest.get((silo, run_id))

    def keep(self, silo: str, run_id: str, round_: int, message: pb.LedgerReceipt, cert_pem: bytes) -> Receipt:
        """Check ``message`` from ``silo`` (its certificate ``cert_pem``) and keep it on disk before the
        update it came with is counted; ProtocolError (one log line) when it is refused."""
        receipt = from_message(message)
        try:
            verify_receipt(receipt, cert_pem)
        except LedgerError as exc:
            self._refuse(silo, round_, str(exc), "PERMISSION_DENIED")
        with self._lock:
            held = self._newest.get((silo, run_id))
            problem = admissible(receipt, silo, run_id, round_, held)
            if problem is not None:
                self._refuse(silo, round_, problem, "FAILED_PRECONDITION")
            if held is not None and (held.length, held.head_hash) == (receipt.length, receipt.head_hash):
                return held  # a resent update: nothing new to anchor
            self._append(receipt)
            self._newest[(silo, run_id)] = receipt
        log_event(log, "ledger_receipt_kept", silo=silo, run_id=run_id, round=round_, length=receipt.length,
                  head=receipt.head_hash[:12])
        return receipt

    @staticmethod
    def _refuse(silo: str, round_: int, reason: str, status: str) -> None:
        log_event(log, "ledger_receipt_refused", level=logging.WARNING, silo=silo, round=round_, reason=reason)
        raise ProtocolError(reason, status)

    def _append(self, receipt: Receipt) -> None:
        line = json.dumps(receipt.to_json(), sort_keys=True, separators=(",", ":")).encode() + b"\n"
        append_durably(self.path, line)
