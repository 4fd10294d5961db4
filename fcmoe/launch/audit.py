"""``fcmoe audit``: what an auditor runs on a silo's privacy ledger, without trusting the silo's code.

``verify``: the silo's certificate against the federation's CA (issued by it, valid when the last
release was written); the chain, indices and every signature against that certificate
(crypto/signed_log.py); then epsilon recomputed from the logged mechanism parameters with Google's
dp-accounting — an implementation independent of the Opacus accountant that wrote the ledger — and
compared with the logged epsilon (RDP: within 1e-6 relative, both evaluate the same integer Renyi
orders exactly; PRV: the logged value must be at least dp-accounting's PLD epsilon minus its stated
error), and with the logged budget. A ledger without releases fails: it proves nothing. Prints one
row per release (``--json``: one object with the verdict and every release: round, sigma, q, steps,
epsilon after it, digests); the first problem ends it with one ``FAILED: ...`` line naming the file
and line, and status 1 — whatever the files hold (not JSON, NaN, a missing or mistyped field, a key
file given as certificate, another federation's CA), never a traceback. With ``--receipts`` (the
aggregator's ``receipts.jsonl``) every receipt of this silo is checked against its certificate and
the ledger must reach each one: a cut tail, invisible in the ledger alone, fails.

``report``: verifies every ledger as ``verify`` does and refuses to draw from one that fails; then a
PNG of epsilon per round, one line per silo, and the same figures as CSV and JSON for the records.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from crypto.pki import certificate_common_name, verify_issued_by
from crypto.signed_log import (LedgerError, Receipt, compare_with_receipt, finite_number, line_digest, parse_line,
                               read_lines, verify_receipt, verify_with_digests)
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
    time: str | None  # when the silo wrote the release (UTC)
    released_sha256: str | None  # digest of the privatised delta the release's items come from
    line_sha256: str  # digest of the ledger line (the next line's prev, a receipt's head_hash)


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


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


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
    """One row per release after checking the chain, signatures, fields and epsilon (AuditError or
    LedgerError naming the line otherwise); an empty ledger gives no rows."""
    rows, releases = [], []
    for number, (entry, digest) in enumerate(verify_with_digests(ledger, cert_pem), start=1):
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
                             float(entry["epsilon_budget"]), _text(entry.get("time")),
                             _text(entry.get("released_sha256")), digest))
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


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read {what} ({exc.strerror or type(exc).__name__})") from None


def _certificate(cert: Path, what: str = "certificate", usual: str = "silo-NAME.pem") -> tuple[bytes, str]:
    """The PEM bytes and common name; LedgerError naming the file for anything else (a key file, say)."""
    pem = _read(cert, f"the {what}")
    try:
        return pem, certificate_common_name(pem)
    except PkiError:
        hint = f" (that is a private key; pass the {what} {usual})" if b"PRIVATE KEY" in pem else ""
        raise LedgerError(f"{cert}: not a PEM X.509 {what}{hint}") from None


def _release_time(rows: list[AuditRow]) -> datetime | None:
    """When the last release was written (its ``time`` field), for checking the certificate then."""
    try:
        return datetime.strptime(rows[-1].time, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except (IndexError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Verified:
    """A ledger that passed every check: whose it is and what it released."""

    ledger: Path
    silo: str
    rows: list[AuditRow]
    receipts: int | None  # receipts of this silo the ledger reaches; None without --receipts

    def as_json(self) -> dict[str, Any]:
        return {"verdict": "ok", "ledger": str(self.ledger), "silo": self.silo, "releases": [asdict(r) for r in self.rows],
                "epsilon": self.rows[-1].logged_epsilon, "epsilon_budget": self.rows[-1].budget,
                "receipts_checked": self.receipts}


def verify_ledger(ledger: Path, cert: Path, ca: Path, receipts: Path | None = None) -> Verified:
    """Every check an auditor needs, in order: the certificate is a certificate issued by the CA (valid
    when the last release was written), the ledger holds at least one release, its chain, signatures,
    fields and epsilon (:func:`audit`), and with ``receipts`` that no tail was cut. LedgerError or
    AuditError (one line, naming the file) for the first failure."""
    cert_pem, silo = _certificate(cert)
    ca_pem, _ = _certificate(ca, "CA certificate", "ca.pem")
    rows = audit(ledger, cert_pem)
    try:
        verify_issued_by(cert_pem, ca_pem, at=_release_time(rows))
    except PkiError as exc:
        raise AuditError(f"{cert}: {exc}") from None
    held = load_receipts(receipts, silo, cert_pem) if receipts is not None else None
    check_receipts(ledger, held or [])  # first: an emptied ledger the receipts contradict says so
    if not rows:
        raise AuditError(f"{ledger}: no releases (an empty ledger proves nothing; with --receipts a cut one shows)"
                         if receipts is None else f"{ledger}: no releases, and the aggregator holds no receipt of "
                         f"silo {silo}")
    return Verified(ledger, silo, rows, None if held is None else len(held))


def run_verify(ledger: Path, cert: Path, ca: Path, receipts: Path | None = None, as_json: bool = False) -> int:
    """Exit status 0 (every check passed) or 1 with exactly one ``FAILED: ...`` line (with ``as_json``,
    one JSON object either way)."""
    try:
        verified = verify_ledger(ledger, cert, ca, receipts)
    except (LedgerError, AuditError) as exc:
        print(json.dumps({"verdict": "failed", "ledger": str(ledger), "reason": str(exc)}) if as_json
              else f"FAILED: {exc}")
        return 1
    if as_json:
        print(json.dumps(verified.as_json()))
        return 0
    rows = verified.rows
    print(table(rows))
    anchored = (f", reaches all {verified.receipts} aggregator receipts" if verified.receipts is not None
                else "; no --receipts given: a cut tail would not show")
    print(f"OK: {len(rows)} releases of silo {verified.silo}, certificate issued by the CA, chain and signatures "
          f"verify, epsilon reproduced, {rows[-1].logged_epsilon:.6g} of {rows[-1].budget:g} spent" + anchored)
    return 0


CSV_FIELDS = ("silo", "ledger", *(f.name for f in fields(AuditRow)))


def run_report(ledgers: list[Path], certs: list[Path], ca: Path, out: Path) -> int:
    """Verify every ledger first (one ``FAILED`` line and status 1, nothing written, if any fails);
    then epsilon per round, one line per silo: ``out`` (PNG), and the same figures as CSV and JSON
    beside it."""
    if len(certs) != len(ledgers):
        print(f"FAILED: {len(ledgers)} ledgers but {len(certs)} certificates (--cert, one per ledger, in order)")
        return 1
    try:
        verified = [verify_ledger(ledger, cert, ca) for ledger, cert in zip(ledgers, certs)]
    except (LedgerError, AuditError) as exc:
        print(f"FAILED: {exc}")
        return 1
    csv_path, json_path = out.with_suffix(".csv"), out.with_suffix(".json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_epsilon(verified, out)
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS)
            writer.writeheader()
            for v in verified:
                writer.writerows({"silo": v.silo, "ledger": str(v.ledger), **asdict(r)} for r in v.rows)
        json_path.write_text(json.dumps({"ledgers": [v.as_json() for v in verified]}, indent=1) + "\n")
    except OSError as exc:
        print(f"FAILED: {exc.filename or out}: cannot write ({exc.strerror or type(exc).__name__})")
        return 1
    print(f"verified {len(verified)} ledgers; wrote {out}, {csv_path}, {json_path}")
    return 0


def plot_epsilon(verified: list[Verified], out: Path) -> list[float]:
    """Epsilon after each round, one line per silo told apart by colour, marker and dash (readable in
    grey print too), integer round ticks (returned: the x ticks drawn); a ledger spanning several runs
    is drawn per release."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    markers, dashes = "osD^vP*X", ["-", "--", "-.", ":"]
    by_release = any(len({r.run_id for r in v.rows}) > 1 for v in verified)
    names = [v.silo for v in verified]
    for i, v in enumerate(verified):
        label = v.silo if names.count(v.silo) == 1 else f"{v.silo} ({v.ledger.name})"
        xs = list(range(1, len(v.rows) + 1)) if by_release else [r.round for r in v.rows]
        line, = ax.plot(xs, [r.logged_epsilon for r in v.rows], marker=markers[i % len(markers)],
                        linestyle=dashes[i % len(dashes)], label=label)
        ax.axhline(v.rows[-1].budget, linestyle=":", linewidth=1, color=line.get_color(), alpha=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("release (the ledger spans several runs)" if by_release else "round")
    ax.set_ylabel("epsilon spent")
    ax.set_title("privacy spent per silo (dotted: each silo's budget)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    low, high = ax.get_xlim()
    ticks = [float(t) for t in ax.get_xticks() if low <= t <= high]
    plt.close(fig)
    return ticks
