"""Attacks on the privacy ledger by the silo's own operator (who holds the silo's key), against the real
ledger, aggregator, silo agent and auditor: a cut tail, an emptied ledger, NaN and other malformed lines.

Each must fail safely with one clear line: the auditor prints one ``FAILED: ...`` line (status 1), the
restarted silo stops before training (status 2), the aggregator refuses a shorter receipt.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TaskDriver, silo_config, smoke_config

from aggregator.receipts import RECEIPTS_FILE, ReceiptBook, to_message
from crypto.pki import PkiPaths, ensure_pki, read_pem
from crypto.signed_log import SignedLog
from fcmoe.launch.cli import main
from fcmoe.config import Config, dump_config, parse_config
from fcmoe.errors import ProtocolError
from protos import fcmoe_pb2 as pb
from silo_agent.agent import SiloAgent
from silo_agent.dp.accounting import PrivacyBudget
from silo_agent.dp.ledger import PrivacyLedger

pytestmark = [pytest.mark.subprocess, pytest.mark.tls]

K = pb.Task.Kind
RELEASES = [(1.1, 0.02, 40), (1.1, 0.02, 40), (0.9, 0.05, 25), (1.3, 0.01, 100)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return ensure_pki(tmp_path_factory.mktemp("pki"), ["silo0", "silo1"])


def _ledger_with_receipts(tmp_path, pki):
    """A silo's real ledger of 4 releases, with the receipt of each round kept by the aggregator's real book."""
    path = tmp_path / "silo0.ledger.jsonl"
    ledger = PrivacyLedger(path, pki.directory, "silo0")
    book = ReceiptBook(tmp_path / RECEIPTS_FILE)
    spent = PrivacyBudget("rdp", 1e-5, 20.0)
    for round_, release in enumerate(RELEASES, start=1):
        ledger.record_training(run_id="run1", round_=round_, session=round_ << 16, release=release,
                               max_grad_norm=1.0, delta=1e-5, accountant="rdp", epsilon=spent.record(release),
                               budget=20.0, units={})
        book.keep("silo0", "run1", round_, to_message(ledger.receipt("run1", round_)),
                  read_pem(pki.silo_cert("silo0")))
    return path, tmp_path / RECEIPTS_FILE


def _verify(capsys, ledger, cert, receipts=None) -> tuple[int, list[str]]:
    argv = ["audit", "verify", str(ledger), "--cert", str(cert), "--ca", str(Path(cert).parent / "ca.pem")]
    argv += ["--receipts", str(receipts)] if receipts else []
    status = main(argv)
    return status, capsys.readouterr().out.splitlines()


def test_attack_cut_tail_is_caught_by_audit_with_the_aggregators_receipts(tmp_path, pki, capsys):
    ledger, receipts = _ledger_with_receipts(tmp_path, pki)
    cert = pki.silo_cert("silo0")
    status, out = _verify(capsys, ledger, cert, receipts)
    assert status == 0 and out[-1].startswith("OK: 4 releases") and "reaches all 4 aggregator receipts" in out[-1]

    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(b"".join(lines[:2]))  # the operator deletes the last two releases
    status, out = _verify(capsys, ledger, cert)
    assert status == 0 and "a cut tail would not show" in out[-1]  # the ledger alone cannot tell
    status, out = _verify(capsys, ledger, cert, receipts)
    assert status == 1 and out == [f"FAILED: {ledger}: ledger has 2 entries but the aggregator holds a receipt "
                                   "for 4 (run run1, round 4): cut tail"]

    ledger.write_bytes(b"")  # ... or empties it
    status, out = _verify(capsys, ledger, cert, receipts)
    assert status == 1 and len(out) == 1 and "ledger has 0 entries but the aggregator holds a receipt for 4" in out[0]
    status, out = _verify(capsys, ledger, cert)  # without receipts an empty ledger still proves nothing
    assert status == 1 and out == [f"FAILED: {ledger}: no releases (an empty ledger proves nothing; with "
                                   "--receipts a cut one shows)"]


def test_attack_a_ledger_rewritten_under_a_self_made_certificate_fails_against_the_federations_ca(
        tmp_path, pki, capsys):
    """The operator rewrites the whole ledger (less noise spent, every line re-signed and chained) under a
    certificate for 'silo0' from a CA of their own, and hands the auditor both files."""
    forged = ensure_pki(tmp_path / "forged", ["silo0"])
    path = tmp_path / "l.jsonl"
    ledger = PrivacyLedger(path, forged.directory, "silo0")
    spent = PrivacyBudget("rdp", 1e-5, 20.0)
    for round_, release in enumerate(RELEASES[:2], start=1):
        ledger.record_training(run_id="run1", round_=round_, session=round_ << 16, release=release,
                               max_grad_norm=1.0, delta=1e-5, accountant="rdp", epsilon=spent.record(release),
                               budget=20.0, units={})
    argv = ["audit", "verify", str(path), "--cert", str(forged.silo_cert("silo0"))]
    assert main(argv + ["--ca", str(forged.ca_cert)]) == 0  # consistent in itself ...
    capsys.readouterr()
    assert main(argv + ["--ca", str(pki.ca_cert)]) == 1  # ... but not issued by the federation's CA
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"FAILED: {forged.silo_cert('silo0')}: certificate 'CN=silo0")
    assert "does not verify against CA" in out[0]


def test_attack_shorter_or_forged_receipt_is_refused_by_the_aggregator(tmp_path, pki, caplog):
    ledger_path, receipts = _ledger_with_receipts(tmp_path, pki)
    book = ReceiptBook(receipts)  # after an aggregator restart: read back from the file
    assert book.newest("silo0", "run1").length == 4
    lines = ledger_path.read_bytes().splitlines(keepends=True)
    ledger_path.write_bytes(b"".join(lines[:3]))
    cut = PrivacyLedger(ledger_path, pki.directory, "silo0")  # the cut ledger still verifies on its own
    caplog.set_level(logging.WARNING)
    with pytest.raises(ProtocolError, match="shorter than the 4 this aggregator holds") as refused:
        book.keep("silo0", "run1", 5, to_message(cut.receipt("run1", 5)), read_pem(pki.silo_cert("silo0")))
    assert refused.value.status == "FAILED_PRECONDITION"
    forged = to_message(cut.receipt("run1", 5))
    forged.length = 9  # a longer claim not signed by the silo
    with pytest.raises(ProtocolError, match="not signed by the silo's certificate key"):
        book.keep("silo0", "run1", 5, forged, read_pem(pki.silo_cert("silo0")))
    assert [r.getMessage().split()[0] for r in caplog.records] == ["event=ledger_receipt_refused"] * 2
    assert book.newest("silo0", "run1").length == 4 and len(receipts.read_text().splitlines()) == 4


def _tamper(tmp_path, pki, how: str):
    """The ledger after one tampering by the operator (who may also re-sign with the silo's key)."""
    path = tmp_path / "l.jsonl"
    if how in ("nan", "infinity", "not_json", "not_utf8", "a_list", "truncated_line"):
        path, _ = _ledger_with_receipts(tmp_path, pki)
        lines = path.read_bytes().splitlines(keepends=True)
        line = lines[1]
        head, _, tail = line.partition(b'"epsilon":')
        number_end = tail.index(b",")
        edited = {"nan": head + b'"epsilon":NaN' + tail[number_end:],
                  "infinity": head + b'"epsilon":Infinity' + tail[number_end:],
                  "not_json": b"this is not json\n", "not_utf8": b'{"\xff\xfe": 1}\n', "a_list": b"[1, 2]\n",
                  "truncated_line": line[: len(line) // 2] + b"\n"}[how]
        lines[1] = edited
        path.write_bytes(b"".join(lines))
        return path
    log = SignedLog(path, read_pem(pki.silo_key("silo0")), read_pem(pki.silo_cert("silo0")))
    entry = {"kind": "dp_sgd", "run_id": "r", "round": 1, "noise_multiplier": 1.0, "sample_rate": 0.05,
             "steps": 50, "delta": 1e-5, "accountant": "rdp", "rdp_orders": [2, 256], "epsilon": 1.0,
             "epsilon_budget": 10.0}
    changes = {"steps_as_string": {"steps": "50"}, "zero_noise": {"noise_multiplier": 0.0},
               "bool_round": {"round": True}, "huge_orders": {"rdp_orders": [2, 10**9]},
               "orders_not_a_list": {"rdp_orders": "2-256"}, "unknown_accountant": {"accountant": "gdp"}}
    if how == "missing_delta":
        entry.pop("delta")
    else:
        entry.update(changes[how])
    log.append(entry)
    return path


MALFORMED = {
    "nan": "line 2: not a JSON line", "infinity": "line 2: not a JSON line", "not_json": "line 2: not a JSON line",
    "not_utf8": "line 2: not UTF-8", "a_list": "line 2: not a JSON object", "truncated_line": "line 2: not a JSON line",
    "steps_as_string": "line 1: steps = '50' is not a non-negative integer",
    "zero_noise": "line 1: noise_multiplier, sample_rate, delta, epsilon or epsilon_budget out of range",
    "bool_round": "line 1: round = True", "huge_orders": "line 1: rdp_orders", "orders_not_a_list": "line 1: rdp_orders",
    "unknown_accountant": "line 1: accountant 'gdp'", "missing_delta": "line 1: missing delta",
}


@pytest.mark.parametrize("how", list(MALFORMED))
def test_attack_malformed_line_gives_one_failed_line(tmp_path, pki, capsys, how):
    path = _tamper(tmp_path, pki, how)
    status, out = _verify(capsys, path, pki.silo_cert("silo0"))
    assert status == 1 and len(out) == 1 and out[0].startswith(f"FAILED: {path}: {MALFORMED[how]}"), out


def test_attack_nan_line_through_the_real_cli_gives_one_failed_line_no_traceback(tmp_path, pki):
    path = _tamper(tmp_path, pki, "nan")
    done = subprocess.run([sys.executable, "-m", "fcmoe", "audit", "verify", str(path), "--cert",
                           str(pki.silo_cert("silo0")), "--ca", str(pki.ca_cert), "--receipts", str(tmp_path / RECEIPTS_FILE)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == [f"FAILED: {path}: line 2: not a JSON line (NaN is not a JSON number)"]
    assert "Traceback" not in done.stderr


def test_attack_wrong_files_give_one_failed_line(tmp_path, pki, capsys):
    path, receipts = _ledger_with_receipts(tmp_path, pki)
    status, out = _verify(capsys, path, pki.silo_key("silo0"))  # the key passed as --cert
    assert status == 1 and out == [f"FAILED: {pki.silo_key('silo0')}: not a PEM X.509 certificate "
                                   "(that is a private key; pass the certificate silo-NAME.pem)"]
    status, out = _verify(capsys, tmp_path / "absent.jsonl", pki.silo_cert("silo0"))
    assert status == 1 and out == [f"FAILED: {tmp_path / 'absent.jsonl'}: cannot read (No such file or directory)"]
    status, out = _verify(capsys, path, pki.silo_cert("silo1"), receipts)  # another silo's certificate
    assert status == 1 and len(out) == 1 and "line 1: signature does not verify" in out[0]
    lines = receipts.read_bytes().splitlines(keepends=True)
    receipts.write_bytes(b"".join(lines[:-1]) + lines[-1].replace(b'"length":4', b'"length":3'))
    status, out = _verify(capsys, path, pki.silo_cert("silo0"), receipts)  # an edited receipt
    assert status == 1 and out == [f"FAILED: {receipts}: line 4: receipt of silo 'silo0' (run run1, round 4) is not "
                                   "signed by the silo's certificate key"]


def _dp_silo(config: Config, port: int, tmp_path) -> Config:
    data = silo_config(config, "silo0", port, index=0, num_silos=1).model_dump(mode="json")
    data["silo"]["dp"] = {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5,
                          "epsilon_budget": 50.0, "ledger": str(tmp_path / "silo0.ledger.jsonl")}
    return parse_config(data)


def test_attack_silo_restarted_from_a_cut_ledger_refuses_to_rejoin(tmp_path, aggregator_factory, caplog):
    config = smoke_config(tmp_path, min_silos=1, quorum=1, rounds=3, min_group_size=1, silo_lease_s=3)
    ensure_pki(config.aggregator.pki_dir, ["silo0"])
    agg = aggregator_factory(config)
    silo = _dp_silo(config, agg.port, tmp_path)
    driver = TaskDriver([SiloAgent(silo)])
    try:
        driver.run_until(K.TRAIN, 3)  # rounds 1 and 2 trained under DP and uploaded, each with a receipt
    finally:
        driver.close()  # the silo process "crashes"
    receipts = config.run.output_dir / RECEIPTS_FILE
    assert len(receipts.read_text().splitlines()) == 2
    assert ReceiptBook(receipts).newest("silo0", agg.coordinator.run_id).length == 2

    ledger = silo.silo.dp.ledger
    lines = ledger.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2
    ledger.write_bytes(lines[0])  # the operator cuts round 2's release: epsilon would resume lower
    cfg = tmp_path / "silo0.yaml"
    dump_config(silo, cfg)
    done = subprocess.run([sys.executable, "-m", "fcmoe", "silo", str(cfg), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("fcmoe: error:")]
    assert errors == [f"fcmoe: error: {ledger}: ledger has 1 entries but the aggregator holds a receipt for 2 "
                      f"(run {agg.coordinator.run_id}, round 2): cut tail; restore the full ledger (the privacy "
                      "budget belongs to the data, it does not restart)"]
    assert "event=ledger_receipt_mismatch" in done.stderr and "event=trained" not in done.stderr
    assert "Traceback" not in done.stderr
    assert len(ledger.read_bytes().splitlines()) == 1  # nothing trained, nothing released

    paths = PkiPaths(config.aggregator.pki_dir)
    status = main(["audit", "verify", str(ledger), "--cert", str(paths.silo_cert("silo0")), "--ca", str(paths.ca_cert),
                   "--receipts", str(receipts)])
    assert status == 1
