"""Benchmarks keep their contract: run as modules, print one JSON object last (tiny sizes here)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_secagg_bench_runs_every_mode_with_a_dropout_round(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benches.secagg", "--silos", "4", "--params", "20000", "--rounds", "3",
                           "--local-steps", "1", "--no-flower", "--fcmoe", "--json"],
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
    # FC-MoE's masked rounds: the sketch stage too, with its own consistency check, and the dropout round
    fcmoe = result["fcmoe_modes"]
    assert set(fcmoe) == {"none", "masking"} and all(r["completed"] for r in fcmoe.values())
    assert fcmoe["masking"]["dropout_round"]["updates"] == 3
    assert result["target"]["fcmoe_masking_round_ratio"] == fcmoe["masking"]["round_ratio_to_none"]


def test_convergence_bench_on_shakespeare_silos_reports_per_silo_losses(tmp_path):
    """The bench's contract on a Shakespeare setting, with a tiny built-in model (the SmolLM2 figures
    come from configs/bench_shakespeare.yaml, far too slow for the suite)."""
    from fcmoe.config import dump_config, load_config, parse_config

    data = load_config(ROOT / "configs" / "bench_shakespeare.yaml").model_dump(mode="json")
    data["model"] = load_config(ROOT / "configs" / "smoke.yaml").model_dump(mode="json")["model"]
    data["run"]["output_dir"] = str(tmp_path / "run")
    data["federation"].update({"rounds": 1, "local": {"local_steps": 1, "batch_size": 4, "clip_norm": 0.0}})
    data["benchmark"].update({"upcycle": None, "methods": ["fedavg", "fcmoe"]})
    data["benchmark"]["settings"][0]["shakespeare"].update({"examples_per_silo": 16})
    data["data"]["max_length"] = 24
    config = tmp_path / "bench.yaml"
    dump_config(parse_config(data), config)
    proc = subprocess.run([sys.executable, "-m", "benches.convergence", "--config", str(config), "--seeds", "1",
                           "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    res = result["results"]["shakespeare-genre"]
    assert set(res) == {"fedavg", "fcmoe"} and result["all_runs_completed"]
    for method in res.values():
        for kind in ("global", "personalised"):
            by_silo = method[f"final_{kind}_loss_by_domain"]
            assert set(by_silo) == {"comedy", "history", "tragedy", "poem"}
            assert all(v["perplexity"] > 1 for v in by_silo.values())
        assert method["seconds_per_run"] > 0


def test_convergence_summary_counts_rounds_to_fedavgs_final_losses():
    """Hand-built curves: rounds to FedAvg's final global and personalised loss, and the targets."""
    from benches.convergence import check_targets, summarise

    def run(method, seed, global_, local):
        return {"setting": "s", "method": method, "seed": seed, "ok": True, "seconds": 1.0, "global": global_,
                "local": local, "global_by_domain": {}, "local_by_domain": {}}

    runs = [run("fedavg", 0, [5.0, 4.0, 3.0], [None, 3.0, 2.0]),
            run("fcmoe", 0, [5.0, 2.9, 2.5], [None, 1.9, 1.5]),
            run("fedavg", 1, [5.0, 4.0, 3.2], [None, 3.0, 2.2]),
            run("fcmoe", 1, [5.0, 3.5, 3.1], [None, 2.5, 2.0])]
    res = summarise(runs, ["fedavg", "fcmoe"], ["s"])["s"]
    assert res["fcmoe"]["rounds_to_fedavg_final_per_seed"] == [1, 2]
    assert res["fcmoe"]["rounds_to_fedavg_final"] == 1.5 and res["fedavg"]["rounds_to_fedavg_final"] == 2
    assert res["fcmoe"]["rounds_to_fedavg_final_personalised"] == 1.5  # rounds 1 and 2
    assert res["fcmoe"]["final_personalised_loss"] == 1.75 and res["fedavg"]["final_personalised_loss"] == 2.1
    targets = check_targets({"s": res})["s"]
    assert targets["global_le_fedavg"] and targets["personalised_10pct_below_fedavg"]
    assert targets["rounds_ratio"] == 0.75 and not targets["rounds_ratio_le_0.7"]
