"""``fcmoe audit``: what an auditor runs on a silo's privacy ledger, without trusting the silo's code.

``verify``: the chain, indices and every signature against the silo's certificate
(crypto/signed_log.py); then epsilon recomputed from the logged mechanism parameters with Google's
dp-accounting — an implementation independent of the Opacus accountant that wrote the ledger — and
compared with the logged epsilon (RDP: within 1e-6 relative, both evaluate the same integer Renyi
orders exactly; PRV: the logged value must be at least dp-accounting's PLD epsilon minus its stated
error), and with the logged budget. Prints one row per release; the first problem ends it with one
``FAILED: ...`` line naming the file and line, and status 1 — whatever the file holds (not JSON,
NaN, a missing or mistyped field, a key file given as certificate), never a traceback. With
``--receipts`` (the aggregator's ``receipts.jsonl``) every receipt of this silo is checked against
its certificate and the ledger must reach each one: a cut tail, invisible in the ledger alone, fails.

``report``: a PNG of epsilon over rounds, one line per silo ledger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crypto.pki import certificate_common_name
from crypto.signed_log import (LedgerError, Receipt, compare_with_receipt, finite_number, line_digest, parse_line,
                               read_lines, verify, verify_receipt)
from fcmoe.errors import FcMoeError, PkiError

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


def _show(value: Any, limit: int = 60) -> str:
    """A field's value for a one-line message, however long the value an edited ledger holds."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_fields(entry: dict[str, Any], where: str) -> None:
    """AuditError (one line) for a field that is missing or of a type or range no DP-SGD release has."""
    missing = [k for k in REQUIRED if k not in entry]
    if missing:
        raise AuditError(f"{where}: missing {', '.join(missing)}")
    if entry["kind"] != "dp_sgd":
        raise AuditError(f"{where}: unknown release kind {_show(entry['kind'])}")
    if entry["accountant"] not in ("rdp", "prv"):
        raise AuditError(f"{where}: accountant {_show(entry['accountant'])}, expected 'rdp' or 'prv'")
    for key in ("noise_multiplier", "sample_rate", "delta", "epsilon", "epsilon_budget"):
        if not finite_number(entry[key]):
            raise AuditError(f"{where}: {key} = {_show(entry[key])} is not a finite number")
    for key in ("round", "steps"):
        if type(entry[key]) is not int or entry[key] < 0:
            raise AuditError(f"{where}: {key} = {_show(entry[key])} is not a non-negative integer")
    if not isinstance(entry["run_id"], str):
        raise AuditError(f"{where}: run_id = {_show(entry['run_id'])} is not a string")
    if not (entry["noise_multiplier"] > 0 and 0 < entry["sample_rate"] <= 1 and 0 < entry["delta"] < 1
            and entry["epsilon"] >= 0 and entry["epsilon_budget"] > 0):
        raise AuditError(f"{where}: noise_multiplier, sample_rate, delta, epsilon or epsilon_budget out of range")
    if entry["accountant"] == "rdp":
        orders = entry.get("rdp_orders")
        if (not isinstance(orders, list) or len(orders) != 2 or any(type(o) is not int for o in orders)
                or not 1 < orders[0] <= orders[1] <= 10_000):
            raise AuditError(f"{where}: rdp_orders = {_show(orders)}, expected [low, high] integers")
    elif "prv_eps_error" in entry and not (finite_number(entry["prv_eps_error"]) and 0 <= entry["prv_eps_error"] < 1):
        raise AuditError(f"{where}: prv_eps_error = {_show(entry['prv_eps_error'])} out of range")


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
        where = f"{ledger}: line {number}"
        _check_fields(entry, where)
        releases.append(entry)
        if any(e["accountant"] != entry["accountant"] or e["delta"] != entry["delta"] for e in releases):
            raise AuditError(f"{where}: accountant or delta changed within one ledger")
        try:
            recomputed = recompute(releases)
        except (ArithmeticError, ValueError, TypeError) as exc:  # parameters dp-accounting cannot compose
            raise AuditError(f"{where}: epsilon cannot be recomputed from the logged parameters ({exc})") from None
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


def load_receipts(path: Path, silo: str, cert_pem: bytes) -> list[Receipt]:
    """The receipts of ``silo`` in the aggregator's receipts file, each checked against the silo's
    certificate; LedgerError naming the line for one that is malformed or not signed by the silo."""
    receipts = []
    for number, line in enumerate(read_lines(path), start=1):
        where = f"{path}: line {number}"
        try:
            receipt = Receipt.from_json(parse_line(line))
        except ValueError as exc:
            raise LedgerError(f"{where}: {exc}") from None
        if receipt.silo != silo:
            continue
        try:
            verify_receipt(receipt, cert_pem)
        except LedgerError as exc:
            raise LedgerError(f"{where}: {exc}") from None
        receipts.append(receipt)
    return receipts


def check_receipts(ledger: Path, receipts: list[Receipt]) -> None:
    """LedgerError unless the (verified) ledger reaches every receipt: same entry at each receipt's length."""
    digests = [line_digest(line) for line in read_lines(ledger)]
    for receipt in sorted(receipts, key=lambda r: -r.length):  # the longest first: the cut that matters
        problem = compare_with_receipt(digests, receipt)
        if problem is not None:
            raise LedgerError(f"{ledger}: {problem}")


def _certificate(cert: Path) -> tuple[bytes, str]:
    try:
        pem = cert.read_bytes()
    except OSError as exc:
        raise LedgerError(f"{cert}: cannot read ({exc.strerror or type(exc).__name__})") from None
    try:
        return pem, certificate_common_name(pem)
    except PkiError:
        hint = " (that is a private key; pass the certificate silo-NAME.pem)" if b"PRIVATE KEY" in pem else ""
        raise LedgerError(f"{cert}: not a PEM X.509 certificate{hint}") from None


def run_verify(ledger: Path, cert: Path, receipts: Path | None = None) -> int:
    """Exit status 0 (every check passed) or 1 with exactly one ``FAILED: ...`` line."""
    try:
        cert_pem, silo = _certificate(cert)
        rows = audit(ledger, cert_pem)
        held = load_receipts(receipts, silo, cert_pem) if receipts is not None else []
        check_receipts(ledger, held)
    except (LedgerError, AuditError) as exc:
        print(f"FAILED: {exc}")
        return 1
    if rows:
        print(table(rows))
    anchored = (f", reaches all {len(held)} aggregator receipts" if receipts is not None
                else "; no --receipts given: a cut tail would not show")
    print(f"OK: {len(rows)} releases, chain and signatures verify, epsilon reproduced"
          + (f", {rows[-1].logged_epsilon:.6g} of {rows[-1].budget:g} spent" if rows else "")
          + anchored)
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
