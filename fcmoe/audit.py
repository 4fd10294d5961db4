"""``fcmoe audit``: what an auditor runs on a silo's privacy ledger, without trusting the silo's code.

``verify``: the chain, indices and every signature against the silo's certificate
(crypto/signed_log.py); then epsilon recomputed from the logged mechanism parameters with Google's
dp-accounting — an implementation independent of the Opacus accountant that wrote the ledger — and
compared with the logged epsilon (RDP: within 1e-6 relative, both evaluate the same integer Renyi
orders exactly; PRV: the logged value must be at least dp-accounting's PLD epsilon minus its stated
error), and with the logged budget. Prints one row per release; the first problem ends it with a
non-zero status and the line it is on.

``report``: a PNG of epsilon over rounds, one line per silo ledger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crypto.signed_log import LedgerError, verify
from fcmoe.errors import FcMoeError

RDP_TOLERANCE = 1e-6
PLD_DISCRETIZATION = 1e-4


class AuditError(FcMoeError):
    """The ledger verifies, but what it says does not add up (the message names the line)."""


@dataclass(frozen=True)
class AuditRow:
    line: int
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    logged_epsilon: float
    recomputed_epsilon: float
    budget: float


def _event(sigma: float, rate: float):
    from dp_accounting import dp_event

    return dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(sigma))


def recompute(entries: list[dict[str, Any]]) -> float:
    """Epsilon after every release in ``entries`` (same accountant, delta and orders as the last one)."""
    last = entries[-1]
    if last["accountant"] == "rdp":
        from dp_accounting.rdp import rdp_privacy_accountant

        low, high = last["rdp_orders"]
        accountant = rdp_privacy_accountant.RdpAccountant(orders=list(range(int(low), int(high) + 1)))
    else:
        from dp_accounting.pld import pld_privacy_accountant

        accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    for e in entries:
        accountant.compose(_event(float(e["noise_multiplier"]), float(e["sample_rate"])), int(e["steps"]))
    return float(accountant.get_epsilon(float(last["delta"])))


def _check(entry: dict[str, Any], recomputed: float, where: str) -> None:
    logged = float(entry["epsilon"])
    if entry["accountant"] == "rdp":
        if not math.isclose(logged, recomputed, rel_tol=RDP_TOLERANCE):
            raise AuditError(f"{where}: logged epsilon {logged!r} but the parameters give {recomputed!r}")
    elif logged < recomputed * (1 - float(entry.get("prv_eps_error", 0.01))):
        raise AuditError(f"{where}: logged epsilon {logged!r} is below the PLD epsilon {recomputed!r}")
    if logged > float(entry["epsilon_budget"]) * (1 + RDP_TOLERANCE):
        raise AuditError(f"{where}: epsilon {logged!r} exceeds the budget {entry['epsilon_budget']!r}")


REQUIRED = ("kind", "run_id", "round", "noise_multiplier", "sample_rate", "steps", "delta", "accountant",
            "epsilon", "epsilon_budget")


def audit(ledger: Path, cert_pem: bytes) -> list[AuditRow]:
    entries = verify(ledger, cert_pem)
    rows, releases = [], []
    for number, entry in enumerate(entries, start=1):
        where = f"{ledger}:{number}"
        missing = [k for k in REQUIRED if k not in entry]
        if missing:
            raise AuditError(f"{where}: missing {', '.join(missing)}")
        if entry["kind"] != "dp_sgd":
            raise AuditError(f"{where}: unknown release kind {entry['kind']!r}")
        releases.append(entry)
        if any(e["accountant"] != entry["accountant"] or e["delta"] != entry["delta"] for e in releases):
            raise AuditError(f"{where}: accountant or delta changed within one ledger")
        recomputed = recompute(releases)
        _check(entry, recomputed, where)
        rows.append(AuditRow(number, entry["run_id"], int(entry["round"]), float(entry["noise_multiplier"]),
                             float(entry["sample_rate"]), int(entry["steps"]), float(entry["epsilon"]), recomputed,
                             float(entry["epsilon_budget"])))
    return rows


def table(rows: list[AuditRow]) -> str:
    head = f"{'line':>4} {'run':>12} {'round':>5} {'sigma':>7} {'q':>9} {'steps':>6} {'epsilon':>12} {'recomputed':>12} {'budget':>7}"
    lines = [head]
    for r in rows:
        lines.append(f"{r.line:>4} {r.run_id:>12} {r.round:>5} {r.noise_multiplier:>7.4g} {r.sample_rate:>9.4g} "
                     f"{r.steps:>6} {r.logged_epsilon:>12.6g} {r.recomputed_epsilon:>12.6g} {r.budget:>7.4g}")
    return "\n".join(lines)


def run_verify(ledger: Path, cert: Path) -> int:
    try:
        rows = audit(ledger, cert.read_bytes())
    except (LedgerError, AuditError) as exc:
        print(f"FAILED: {exc}")
        return 1
    print(table(rows))
    print(f"OK: {len(rows)} releases, chain and signatures verify, epsilon reproduced"
          + (f", {rows[-1].logged_epsilon:.6g} of {rows[-1].budget:g} spent" if rows else ""))
    return 0


def run_report(ledgers: list[Path], out: Path) -> int:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for ledger in ledgers:
        entries = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
        ax.plot(range(1, len(entries) + 1), [e["epsilon"] for e in entries], marker="o",
                label=entries[0].get("silo", ledger.stem) if entries else ledger.stem)
        if entries:
            ax.axhline(entries[-1]["epsilon_budget"], linestyle=":", linewidth=1, color="grey")
    ax.set_xlabel("release (training round)")
    ax.set_ylabel("epsilon")
    ax.set_title("privacy spent per silo (dotted: budget)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0
