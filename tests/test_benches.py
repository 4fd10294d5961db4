"""Benchmarks keep their contract: run as modules, print one JSON object last (tiny sizes here)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_secagg_bench_runs_every_mode_with_a_dropout_round(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benches.secagg", "--silos", "4", "--params", "20000", "--rounds", "3",
                           "--local-steps", "1", "--no-flower", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["modes"]) == {"none", "masking", "ckks"}
    for mode, r in result["modes"].items():
        assert r["completed"] and r["dropout_round"]["updates"] == 3, (mode, r["outcome"])
    for mode in ("none", "masking"):  # 32-bit fixed point: as many bytes as float32
        assert result["modes"][mode]["upload_bytes_per_parameter"] == 4.0
    assert result["modes"]["ckks"]["upload_bytes_per_parameter"] > 20
    assert result["modes"]["masking"]["aggregator_secure_seconds_median"] > 0
    assert result["flower_secaggplus"]["available"] is False
