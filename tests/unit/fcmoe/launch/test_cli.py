"""fcmoe certs: creates the federation's PKI and keeps an existing one."""

import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.subprocess
def test_certs_command_creates_and_keeps_pki(tmp_path):
    cmd = [sys.executable, "-m", "fcmoe", "certs", "--dir", str(tmp_path / "pki"), "--silos", "a,b"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    names = sorted(p.name for p in (tmp_path / "pki").iterdir())
    assert names == ["aggregator.key", "aggregator.pem", "ca.key", "ca.pem",
                     "silo-a.key", "silo-a.pem", "silo-b.key", "silo-b.pem"]
    ca = (tmp_path / "pki" / "ca.pem").read_bytes()
    assert subprocess.run(cmd, capture_output=True, timeout=60, cwd=ROOT).returncode == 0
    assert (tmp_path / "pki" / "ca.pem").read_bytes() == ca
    bad = subprocess.run(cmd[:-1] + ["bad name"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith("fcmoe: error:") and len(bad.stderr.splitlines()) == 1
