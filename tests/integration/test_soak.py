"""The soak benchmark keeps its contract at a tiny size: real aggregator process, silos as threads in
worker processes, masking on; one JSON object last, every round completed, nothing failed."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import ROOT

if str(ROOT) not in sys.path:  # benches/ is not an installed package: import it from the checkout
    sys.path.insert(0, str(ROOT))

from benches.soak import main  # noqa: E402

pytestmark = [pytest.mark.subprocess, pytest.mark.tls, pytest.mark.slow]


def test_soak_four_silos_two_rounds(tmp_path, capsys):
    code = main(["--silos", "4", "--rounds", "2", "--silo-procs", "2", "--out", str(tmp_path), "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["ok"], result
    assert result["silos"] == 4 and result["rounds"] == 2 and result["completed_rounds"] == 2
    assert set(result["failures"]) >= {"rounds_missing", "rounds_failed", "round_retries", "silos_exited_nonzero"}
    assert not any(result["failures"].values()), result["failures"]
    assert result["round_seconds_median"] > 0 and result["round_seconds_max"] >= result["round_seconds_median"]
    assert result["aggregator_peak_rss_mib"] > 0
    (size,) = result["sweep"]
    assert size["updates_min"] == 4 and len(size["round_seconds"]) == 2 and size["silo_procs"] == 2
    assert size["aggregator_secure_seconds_median"] > 0  # masking was on
    codes = {}
    for path in (tmp_path / "silos-4" / "workers").glob("worker*.json"):
        codes.update(json.loads(path.read_text()))
    assert codes == {f"silo{i}": 0 for i in range(4)}
