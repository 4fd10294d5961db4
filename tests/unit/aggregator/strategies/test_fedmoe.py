"""FedMoE-style aggregation: coefficients against a hand computation, and one in-process federation."""

import math

import numpy as np
from conftest import silo_config, smoke_config

from aggregator.accumulate import PlaintextAccumulator, floor_coefficients
from aggregator.strategies import FedAvg, FedMoe, SiloReport, build_strategy
from fcmoe.config import FedMoeConfig, LocalTrainingConfig
from fcmoe.launch.inprocess import run_in_process
from fcmoe.model.layout import UnitKey

UNITS = ["L0.shared", "L0.E0", "L0.E1", "L0.E2"]
# b never routed a token to E0; nobody routed one to E2; shared units report 1.0
REPORTS = {
    "a": SiloReport(1, 1.0, {"L0.shared": 1.0, "L0.E0": 0.7, "L0.E1": 0.3, "L0.E2": 0.0}),
    "b": SiloReport(2, 1.0, {"L0.shared": 1.0, "L0.E0": 0.0, "L0.E1": 1.0, "L0.E2": 0.0}),
    "c": SiloReport(3, 1.0, {"L0.shared": 1.0, "L0.E0": 0.5, "L0.E1": 0.5, "L0.E2": 0.0}),
}
DELTAS = {"a": np.array([1.0, 0.0], np.float32), "b": np.array([0.0, 4.0], np.float32),
          "c": np.array([2.0, 2.0], np.float32)}


def _aggregate(strategy, plan, x):
    acc = PlaintextAccumulator({u: 2 for u in UNITS}, plan)
    for silo, delta in DELTAS.items():
        acc.add(silo, {u: plan.alpha[silo][u] * delta for u in UNITS})
    return strategy.aggregate(1, x, acc.result())


def test_coefficients_and_aggregate_by_hand():
    s = FedMoe()
    plan = s.coefficients(1, UNITS, REPORTS)
    alpha = {u: [plan.alpha[x][u] for x in "abc"] for u in UNITS}
    assert alpha["L0.E0"] == [1.0, 0.0, 3.0]  # b left out
    assert alpha["L0.E1"] == [1.0, 2.0, 3.0]
    assert alpha["L0.E2"] == [0.0, 0.0, 0.0]
    assert all(g == 0 for groups in plan.group.values() for g in groups.values())
    assert s.diagnostics == {"inactive_assignments": 4.0}  # b on E0, everyone on E2
    x = {u: np.zeros(2, np.float32) for u in UNITS}
    out = _aggregate(s, plan, x)
    # E0: (1*[1,0] + 3*[2,2]) / 4; E1: (1*[1,0] + 2*[0,4] + 3*[2,2]) / 6
    np.testing.assert_allclose(out["L0.E0"], [7 / 4, 6 / 4], rtol=1e-6)
    np.testing.assert_allclose(out["L0.E1"], [7 / 6, 14 / 6], rtol=1e-6)


def test_non_expert_units_are_fedavg():
    units = ["L0.shared"]
    ours, theirs = FedMoe().coefficients(1, units, REPORTS), FedAvg().coefficients(1, units, REPORTS)
    assert ours.alpha == theirs.alpha and ours.group == theirs.group


def test_a_unit_nobody_activated_stays_unchanged_also_when_floored():
    s = FedMoe()
    x = {u: np.full(2, 5.0, np.float32) for u in UNITS}
    for plan in (s.coefficients(1, UNITS, REPORTS), floor_coefficients(s.coefficients(1, UNITS, REPORTS), 0.1)):
        out = _aggregate(s, plan, x)
        assert out["L0.E2"].tolist() == [5.0, 5.0]
        assert not np.array_equal(out["L0.E0"], x["L0.E0"])
    floored = floor_coefficients(s.coefficients(1, UNITS, REPORTS), 0.1)
    assert math.isclose(floored.alpha["b"]["L0.E0"], 0.3)  # the floor: 0.1 of the largest (c's 3)


def test_round_plan_asks_for_routing_without_sketches_and_builder():
    plan = FedMoe().configure_round(2, LocalTrainingConfig(), seed=0)
    assert plan.needs_signals and plan.sketch_buckets == 0 and plan.retention_lambda == 0.0
    assert build_strategy(FedMoeConfig()).name == "fedmoe"


def test_in_process_federation_meters_routing_shares(tmp_path, monkeypatch):
    seen: list[dict[str, SiloReport]] = []
    original = FedMoe.coefficients

    def recording(self, round_, units, reports, agreement=None):
        seen.append(dict(reports))
        return original(self, round_, units, reports, agreement)

    monkeypatch.setattr(FedMoe, "coefficients", recording)
    # every: 2 makes round 2 one without evaluation: silos must still meter routing (needs_signals)
    config = smoke_config(tmp_path, min_silos=3, rounds=2, min_group_size=1, strategy={"name": "fedmoe"},
                          evaluation={"every": 2})
    silos = [silo_config(config, f"silo{i}", 0, index=i, num_silos=3) for i in range(3)]
    coord = run_in_process(config, silos)
    assert coord.machine.succeeded and coord.machine.version == 2
    rows = coord.metrics.rows()
    losses = [r["global_loss"] for r in rows if r.get("global_loss") is not None]
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses)
    assert all("inactive_assignments" in r for r in rows[1:])
    assert len(seen) == 2 and all(len(reports) == 3 for reports in seen)
    for reports in seen:  # round 1 evaluated, round 2 did not: both metered
        for report in reports.values():
            experts = {u: v for u, v in report.routing_share.items() if UnitKey.parse(u).is_expert}
            assert experts and sum(v > 0 for v in experts.values()) > 0
            assert all(v == 1.0 for u, v in report.routing_share.items() if not UnitKey.parse(u).is_expert)
