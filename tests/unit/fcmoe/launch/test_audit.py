"""The auditor's `fcmoe audit verify` on real signed ledgers: what passes, and every tampering it names."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import PRVAccountant

from crypto.pki import ensure_pki, read_pem
from crypto.signed_log import SignedLog
from fcmoe.launch.audit import audit, plot_epsilon, verify_ledger
from fcmoe.launch.cli import main
from silo_agent.dp.accounting import PrivacyBudget
from silo_agent.dp.ledger import PrivacyLedger

RELEASES = [(1.1, 0.02, 40), (1.1, 0.02, 40), (0.9, 0.05, 25), (1.3, 0.01, 100)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return ensure_pki(tmp_path_factory.mktemp("pki"), ["silo0", "silo1"])


def write_ledger(path, pki, accountant="rdp", budget=20.0, releases=RELEASES):
    ledger = PrivacyLedger(path, pki.directory, "silo0")
    spent = PrivacyBudget(accountant, 1e-5, budget)
    for round_, release in enumerate(releases, start=1):
        ledger.record_training(run_id="run1", round_=round_, session=round_ << 16, release=release,
                               max_grad_norm=1.0, delta=1e-5, accountant=accountant, epsilon=spent.record(release),
                               budget=budget, units={})
    return path


def lines(path):
    return path.read_bytes().splitlines(keepends=True)


def test_a_true_ledger_verifies_and_epsilon_is_reproduced_within_1e_6(tmp_path, pki, capsys):
    path = write_ledger(tmp_path / "l.jsonl", pki)
    rows = audit(path, read_pem(pki.silo_cert("silo0")))
    assert len(rows) == 4
    for r in rows:
        assert abs(r.logged_epsilon - r.recomputed_epsilon) <= 1e-6 * r.logged_epsilon
    assert rows[-1].logged_epsilon > rows[0].logged_epsilon
    assert main(["audit", "verify", str(path), "--cert", str(pki.silo_cert("silo0")), "--ca", str(pki.ca_cert)]) == 0
    out = capsys.readouterr().out
    assert "OK: 4 releases of silo silo0, certificate issued by the CA" in out and "recomputed" in out


def test_prv_ledger_verifies_against_an_independent_pld(tmp_path, pki):
    path = write_ledger(tmp_path / "prv.jsonl", pki, accountant="prv", releases=RELEASES[:2])
    rows = audit(path, read_pem(pki.silo_cert("silo0")))
    assert [r.round for r in rows] == [1, 2]
    for row, upto in zip(rows, (1, 2)):  # the silo's figure is Opacus's PRV accountant's
        accountant = PRVAccountant()
        for noise, rate, steps in RELEASES[:upto]:
            accountant.history.append((noise, rate, steps))
        assert row.logged_epsilon == pytest.approx(accountant.get_epsilon(1e-5, eps_error=0.01), rel=1e-9)
        # never below the independent figure by more than that error (overstating is safe), and near it
        assert row.recomputed_epsilon * 0.99 <= row.logged_epsilon <= row.recomputed_epsilon * 1.05
    assert rows[1].logged_epsilon > rows[0].logged_epsilon


def _fails(path, pki, match, capsys):
    assert main(["audit", "verify", str(path), "--cert", str(pki.silo_cert("silo0")), "--ca", str(pki.ca_cert)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED") and match in out, out


def test_one_changed_byte_fails_naming_the_line(tmp_path, pki, capsys):
    path = write_ledger(tmp_path / "l.jsonl", pki)
    data = lines(path)
    data[2] = data[2].replace(b'"steps":25', b'"steps":24')
    path.write_bytes(b"".join(data))
    _fails(path, pki, "l.jsonl: line 3: signature does not verify", capsys)


def test_a_removed_line_fails_naming_the_line(tmp_path, pki, capsys):
    path = write_ledger(tmp_path / "l.jsonl", pki)
    data = lines(path)
    del data[1]
    path.write_bytes(b"".join(data))
    _fails(path, pki, "l.jsonl: line 2: index 2, expected 1", capsys)


def test_a_line_signed_with_another_key_fails(tmp_path, pki, capsys):
    path = write_ledger(tmp_path / "l.jsonl", pki)
    other = SignedLog(tmp_path / "x.jsonl", read_pem(pki.silo_key("silo1")), read_pem(pki.silo_cert("silo1")))
    data = lines(path)
    last = json.loads(data[-1])
    forged_body = {k: v for k, v in last.items() if k not in ("signature", "index", "prev")}
    other.entries, other._prev = [None] * last["index"], last["prev"]  # continue silo0's chain under silo1's key
    other.append(forged_body)
    path.write_bytes(b"".join(data[:-1]) + lines(tmp_path / "x.jsonl")[0])
    _fails(path, pki, "l.jsonl: line 4: signature does not verify", capsys)


def test_a_signed_but_understated_epsilon_fails_naming_the_line(tmp_path, pki, capsys):
    path = tmp_path / "l.jsonl"
    log = SignedLog(path, read_pem(pki.silo_key("silo0")), read_pem(pki.silo_cert("silo0")))
    log.append({"kind": "dp_sgd", "run_id": "r", "round": 1, "noise_multiplier": 1.0, "sample_rate": 0.05,
                "steps": 50, "delta": 1e-5, "accountant": "rdp", "rdp_orders": [2, 256], "epsilon": 0.5,
                "epsilon_budget": 10.0})
    _fails(path, pki, "l.jsonl: line 1: logged epsilon 0.5 but the parameters give", capsys)


def test_spending_past_the_budget_fails(tmp_path, pki, capsys):
    path = write_ledger(tmp_path / "l.jsonl", pki, budget=2.0)
    _fails(path, pki, "exceeds the budget", capsys)


def test_json_verdict_lists_every_release_and_its_epsilon_is_dp_accountings(tmp_path, pki, capsys):
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    path = write_ledger(tmp_path / "l.jsonl", pki)
    assert main(["audit", "verify", str(path), "--cert", str(pki.silo_cert("silo0")), "--ca", str(pki.ca_cert),
                 "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    verdict = json.loads(out[0])
    assert verdict["verdict"] == "ok" and verdict["silo"] == "silo0" and len(verdict["releases"]) == 4
    logged = [json.loads(line) for line in lines(path)]
    low, high = logged[0]["rdp_orders"]
    accountant = rdp_privacy_accountant.RdpAccountant(orders=list(range(low, high + 1)))
    for release, (sigma, q, steps), entry in zip(verdict["releases"], RELEASES, logged):
        accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        assert (release["round"], release["noise_multiplier"], release["sample_rate"], release["steps"]) == (
            entry["round"], sigma, q, steps)
        assert release["logged_epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        assert release["released_sha256"] == entry["released_sha256"]
    assert verdict["releases"][1]["line_sha256"] == logged[2]["prev"]
    assert verdict["epsilon"] == verdict["releases"][-1]["logged_epsilon"]


def test_a_ledger_with_no_release_fails(tmp_path, pki, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert main(["audit", "verify", str(path), "--cert", str(pki.silo_cert("silo0")), "--ca", str(pki.ca_cert)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"FAILED: {path}: no releases (an empty ledger proves nothing; with --receipts a cut one shows)"]
    assert main(["audit", "verify", str(path), "--cert", str(pki.silo_cert("silo0")), "--ca", str(pki.ca_cert),
                 "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {"verdict": "failed", "ledger": str(path), "reason": (
        f"{path}: no releases (an empty ledger proves nothing; with --receipts a cut one shows)")}


def test_a_certificate_from_another_ca_or_a_ca_that_is_not_a_certificate_fails(tmp_path, pki, capsys):
    path = write_ledger(tmp_path / "l.jsonl", pki)
    other = ensure_pki(tmp_path / "other", ["silo0"])
    for ca, expected in ((other.ca_cert, "does not verify against CA"),
                         (tmp_path / "absent.pem", "cannot read the CA certificate (No such file or directory)"),
                         (pki.ca_key, "not a PEM X.509 CA certificate")):
        assert main(["audit", "verify", str(path), "--cert", str(pki.silo_cert("silo0")), "--ca", str(ca)]) == 1
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 1 and out[0].startswith("FAILED: ") and expected in out[0], out


def test_report_verifies_then_writes_png_csv_and_json_one_line_per_silo(tmp_path, pki, capsys):
    first = write_ledger(tmp_path / "silo0.jsonl", pki)
    second = write_ledger(tmp_path / "silo0-again.jsonl", pki, releases=RELEASES[:2])
    out = tmp_path / "report" / "eps.png"
    assert main(["audit", "report", str(first), str(second), "--cert", str(pki.silo_cert("silo0")),
                 str(pki.silo_cert("silo0")), "--ca", str(pki.ca_cert), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("verified 2 ledgers; wrote")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert rows[0].startswith("silo,ledger,line,run_id,round,") and len(rows) == 1 + 4 + 2
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [len(v["releases"]) for v in saved["ledgers"]] == [4, 2]
    ticks = plot_epsilon([verify_ledger(first, pki.silo_cert("silo0"), pki.ca_cert)], tmp_path / "one.png")
    assert ticks and all(t == int(t) for t in ticks)  # whole rounds, never 1.5


def test_report_refuses_a_tampered_ledger_and_writes_nothing(tmp_path, pki, capsys):
    good = write_ledger(tmp_path / "good.jsonl", pki)
    bad = write_ledger(tmp_path / "bad.jsonl", pki)
    data = lines(bad)
    bad.write_bytes(b"".join(data[:2] + [data[2].replace(b'"steps":25', b'"steps":5')] + data[3:]))
    out = tmp_path / "eps.png"
    cert = str(pki.silo_cert("silo0"))
    assert main(["audit", "report", str(good), str(bad), "--cert", cert, cert, "--ca", str(pki.ca_cert),
                 "--out", str(out)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"FAILED: {bad}: line 3: signature does not verify against the certificate"]
    assert main(["audit", "report", str(good), str(bad), "--cert", cert, "--ca", str(pki.ca_cert),
                 "--out", str(out)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "FAILED: 2 ledgers but 1 certificates (--cert, one per ledger, in order)"]
    assert list(tmp_path.glob("eps.*")) == []


def test_a_restarted_silo_resumes_its_epsilon_from_the_ledger_and_refuses_a_broken_one(tmp_path, pki):
    path = write_ledger(tmp_path / "l.jsonl", pki)
    logged = json.loads(lines(path)[-1])["epsilon"]
    resumed = PrivacyLedger(path, pki.directory, "silo0")  # what a restarted silo reads
    assert resumed.releases() == [tuple(r) for r in RELEASES]
    assert PrivacyBudget("rdp", 1e-5, 20.0, resumed.releases()).spent == pytest.approx(logged, rel=1e-12)
    data = lines(path)
    path.write_bytes(b"".join(data[:1] + data[2:]))
    from crypto.signed_log import LedgerError

    with pytest.raises(LedgerError, match="l.jsonl: line 2"):
        PrivacyLedger(path, pki.directory, "silo0")
