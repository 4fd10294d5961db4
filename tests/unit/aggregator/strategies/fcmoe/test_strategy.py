"""The FC-MoE strategy on reports: sketch weights, agreement scored by each silo against the sum, groups
and coefficients, ablations."""

import numpy as np
import pytest

from aggregator.strategies import FcMoe, SiloReport
from aggregator.strategies.fcmoe import consensus
from crypto.sketch import AGREEMENT_STEP, own_agreement
from fcmoe.config import FCMOE_SKETCH_VARIANT, FcMoeConfig, LocalTrainingConfig


def test_fcmoe_coefficients_end_to_end_on_reports():
    rng = np.random.default_rng(2)
    common = rng.standard_normal(64).astype(np.float32)
    reports, sketches = {}, {}
    for i in range(6):
        y = (common if i < 4 else -common) + 0.05 * rng.standard_normal(64).astype(np.float32)
        reports[f"s{i}"] = SiloReport(100, 0.5, {"L0.E0": 0.9 if i == 0 else 0.3, "L0.shared": 1.0})
        sketches[f"s{i}"] = {"L0.E0": y, "L0.shared": common}
    s = FcMoe(FcMoeConfig(**FCMOE_SKETCH_VARIANT), min_group_size=2)
    units = ["L0.E0", "L0.shared"]
    # the sketch stage: the sum of w * y per unit, then each silo scores its own part against it
    w = s.sketch_weights(1, units, reports).alpha
    sums = {u: sum(w[x][u] * sketches[x][u].astype(np.float64) for x in reports) for u in units}
    agreement = {x: {u: own_agreement(w[x][u] * sketches[x][u].astype(np.float64), sums[u]) for u in units}
                 for x in reports}
    plan = s.coefficients(1, units, reports, agreement)
    assert [plan.group[f"s{i}"]["L0.E0"] for i in range(6)] == [0, 0, 0, 0, 1, 1]
    assert all(plan.group[f"s{i}"]["L0.shared"] == 0 for i in range(6))
    a = {k: v["L0.E0"] for k, v in plan.alpha.items()}
    assert sum(a.values()) == pytest.approx(1.0)
    assert a["s0"] > a["s1"] > a["s4"]  # more routing mass, then agreement, raise alpha
    ablated = FcMoe(FcMoeConfig(**{**FCMOE_SKETCH_VARIANT, "importance": False, "projection": False}), min_group_size=2)
    flat = ablated.coefficients(1, ["L0.E0", "L0.shared"], reports, agreement)
    assert [v["L0.E0"] for v in flat.alpha.values()] == pytest.approx([1 / 6] * 6)
    assert {g["L0.E0"] for g in flat.group.values()} == {0}
    no_retention = FcMoe(FcMoeConfig(**{**FCMOE_SKETCH_VARIANT, "retention": False, "retention_lambda": 1.0}), min_group_size=2)
    off = no_retention.configure_round(1, LocalTrainingConfig(), 0)
    assert off.retention_lambda == 0.0 and not off.personal_adapter
    on = s.configure_round(1, LocalTrainingConfig(), 0)
    assert on.personal_adapter and on.retention_lambda == 0.0  # weight-space re-anchoring is opt-in
    assert s.configure_round(1, LocalTrainingConfig(), 0).sketch_buckets == 256


def test_each_silo_scores_itself_against_the_sum_as_the_consensus_formula_says():
    """The silo-side score (own part against the unmasked sum) equals the leave-one-out formula, to
    the fixed-point step it travels in; a silo without a score counts as agreeing."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal(256)
    sketches = np.stack([base + 0.1 * rng.standard_normal(256) for _ in range(3)] + [-base])
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    total = (weights[:, None] * sketches).sum(axis=0)
    own = [own_agreement(weights[i] * sketches[i], total) for i in range(4)]
    full = consensus.agreement_score(*consensus.agreement(sketches, weights))
    np.testing.assert_allclose(own, full, atol=AGREEMENT_STEP)
    assert own[3] < 0 < own[0]
    s = FcMoe(FcMoeConfig(**FCMOE_SKETCH_VARIANT), min_group_size=2)
    reports = {f"s{i}": SiloReport(100, 0.5, {"u": 1.0}) for i in range(4)}
    plan = s.coefficients(1, ["u"], reports, {"s0": {"u": -1.0}, "s1": {"u": -1.0}})
    assert plan.group["s2"]["u"] == plan.group["s3"]["u"] == 0 and plan.group["s0"]["u"] == 1
