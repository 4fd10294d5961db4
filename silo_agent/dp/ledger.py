"""The silo's privacy ledger: one signed, hash-chained JSON line per release (crypto/signed_log.py).

A DP-SGD round is recorded *before* anything computed from it leaves the silo (report, sketches,
update), with the mechanism's parameters, the running epsilon at the configured delta, and the
digest and size of the privatised delta all those are computed from. ``fcmoe audit verify`` checks
the chain and signatures against the silo's certificate and recomputes epsilon independently.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from crypto.pki import PkiPaths, read_pem
from crypto.signed_log import SignedLog
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
        self.log = SignedLog(path, read_pem(paths.silo_key(silo)), read_pem(paths.silo_cert(silo)))

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
