"""The silo's privacy ledger: one signed, hash-chained JSON line per release (crypto/signed_log.py).

A DP-SGD round is recorded *before* anything computed from it leaves the silo (report, sketches,
update), with the mechanism's parameters, the running epsilon at the configured delta, and the
digest and size of the privatised delta all those are computed from. ``fcmoe audit verify`` checks
the chain and signatures against the silo's certificate and recomputes epsilon independently.

A ledger cannot show that its tail was cut, so every update of a DP silo carries a signed receipt
(entry count, last line's digest) that the aggregator keeps; at (re)join the silo compares its ledger
with the newest receipt the aggregator holds and refuses to start from a shorter or different one —
a silo restarted from a cut ledger would otherwise resume a smaller epsilon than it spent.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from crypto.pki import PkiPaths, read_pem
from crypto.signed_log import LedgerError, Receipt, SignedLog, compare_with_receipt, verify_receipt
from silo_agent.dp.accounting import PRV_EPS_ERROR, RDP_ORDERS, Release

DP_SGD = "dp_sgd"


def units_digest(units: Mapping[str, np.ndarray]) -> tuple[str, int]:
    """SHA-256 and size of the released vectors as float32, in unit order (the ledger's recorded format)."""
    h, size = hashlib.sha256(), 0
    for unit in units:
        raw = np.ascontiguousarray(units[unit], dtype="<f4").tobytes()
        h.update(unit.encode() + b"\0" + raw)
        size += len(raw)
    return h.hexdigest(), size


class PrivacyLedger:
    def __init__(self, path: Path, pki_dir: Path, silo: str):
        paths = PkiPaths(pki_dir)
        self.silo = silo
        self.path = Path(path)
        self.cert_pem = read_pem(paths.silo_cert(silo))
        self.log = SignedLog(path, read_pem(paths.silo_key(silo)), self.cert_pem)

    def receipt(self, run_id: str, round_: int) -> Receipt:
        """The ledger's current length and head, signed: attached to every update this silo sends."""
        unsigned = Receipt(self.silo, run_id, round_, len(self.log.entries), self.log.head)
        return replace(unsigned, signature=self.log.sign(unsigned.message()))

    def check_receipt(self, receipt: Receipt, run_id: str) -> None:
        """LedgerError (one line) when the aggregator holds a receipt this ledger falls short of: the
        silo must not train (or resume its epsilon) from a cut or rewritten ledger."""
        if receipt.silo != self.silo or receipt.run_id != run_id:
            raise LedgerError(f"{self.path}: the aggregator returned a receipt of silo {receipt.silo!r} run "
                              f"{receipt.run_id!r}, not of {self.silo!r} run {run_id!r}")
        try:
            verify_receipt(receipt, self.cert_pem)
        except LedgerError as exc:
            raise LedgerError(f"{self.path}: the aggregator's {exc}") from None
        problem = compare_with_receipt(self.log.digests, receipt)
        if problem is not None:
            raise LedgerError(f"{self.path}: {problem}; restore the full ledger (the privacy budget belongs to "
                              "the data, it does not restart)")

    def released(self, run_id: str, round_: int) -> bool:
        """Whether this round of this run was already recorded: a redo must not release it again."""
        return any(e["kind"] == DP_SGD and e["run_id"] == run_id and e["round"] == round_ for e in self.log.entries)

    def releases(self) -> list[Release]:
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.log.entries if e["kind"] == DP_SGD]

    def record_training(self, *, run_id: str, round_: int, session: int, release: Release, max_grad_norm: float,
                        delta: float, accountant: str, epsilon: float, budget: float,
                        units: Mapping[str, np.ndarray]) -> dict[str, Any]:
        sha, size = units_digest(units)
        sigma, rate, steps = release
        return self.log.append({
            "kind": DP_SGD, "silo": self.silo, "run_id": run_id, "round": round_, "session": session,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "mechanism": "subsampled_gaussian",
            "noise_multiplier": sigma, "max_grad_norm": max_grad_norm, "sample_rate": rate, "steps": steps,
            "delta": delta, "accountant": accountant, "epsilon": epsilon, "epsilon_budget": budget,
            **({"rdp_orders": list(RDP_ORDERS)} if accountant == "rdp" else {"prv_eps_error": PRV_EPS_ERROR}),
            "released_sha256": sha, "released_bytes": size,
        })
