"""FC-MoE's pure maths: keyed sketches, importance, consensus, partition, projection, retention."""

import os

import numpy as np
import pytest

from aggregator.strategies.fcmoe import consensus
from aggregator.accumulate import GroupSum
from aggregator.strategies.fcmoe.projection import combine, project_off
from aggregator.strategies import FcMoe, SiloReport
from crypto.sketch import AGREEMENT_STEP, SketchError, count_sketch, derive_key, own_agreement, sketch_units
from fcmoe.config import FCMOE_SKETCH_VARIANT, FcMoeConfig, LocalTrainingConfig
from silo_agent.retention import anchor, importance_scale

SECRET = bytes(range(32))


def test_sketch_is_linear_keyed_and_preserves_inner_products_in_expectation():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(20_000).astype(np.float32), rng.standard_normal(20_000).astype(np.float32)
    b = (0.6 * a + 0.8 * b).astype(np.float32)
    key = derive_key(SECRET, "run", 1, "L0.E0")
    np.testing.assert_allclose(count_sketch(a + b, key, 512), count_sketch(a, key, 512) + count_sketch(b, key, 512),
                               rtol=1e-4, atol=1e-3)
    estimates = []
    for r in range(40):
        k = derive_key(SECRET, "run", r, "L0.E0")
        estimates.append(float(count_sketch(a, k, 512) @ count_sketch(b, k, 512)))
    assert abs(np.mean(estimates) - float(a @ b)) < 4 * np.std(estimates) / np.sqrt(40)
    # the key changes with round, unit and secret; the norm is preserved in expectation
    assert derive_key(SECRET, "run", 1, "L0.E0") != derive_key(SECRET, "run", 2, "L0.E0")
    assert derive_key(SECRET, "run", 1, "L0.E0") != derive_key(SECRET, "run", 1, "L0.E1")
    assert derive_key(SECRET, "run", 1, "u") != derive_key(os.urandom(32), "run", 1, "u")
    y = sketch_units({"u": a}, SECRET, "run", 1, 1024)["u"]
    assert y.shape == (1024,) and abs(float(y @ y) / float(a @ a) - 1) < 0.2


def test_sketched_cosines_of_million_dim_pairs_at_1024_buckets():
    """Cosines estimated from k = 1024 buckets, against the true cosine of 10^6-dim random pairs.

    A k-bucket linear sketch estimates a cosine rho with standard deviation about (1 - rho^2)/sqrt(k):
    0.031 for unrelated pairs at k = 1024, so ±0.05 is a 1.6-sigma band there and about one such
    pair in nine falls outside it (a limit of random k-dimensional projections, not of this sketch);
    correlated pairs are estimated more tightly.
    Checked: at least 85 % of all estimates within ±0.05 (about 95 % expected), none beyond ±0.15
    (about 5 sigma), and the spread at each rho as the formula says, within what 10 draws allow (a
    biased or badly hashed sketch fails all three)."""
    rng = np.random.default_rng(7)
    size, buckets, pairs = 1_000_000, 1024, 10
    errors: dict[float, list[float]] = {}
    for rho in (-0.5, 0.0, 0.3, 0.6, 0.9):
        unit = f"rho{rho}"
        for p in range(pairs):
            a = rng.standard_normal(size).astype(np.float32)
            b = (rho * a + np.sqrt(1 - rho**2) * rng.standard_normal(size)).astype(np.float32)
            # two silos' deltas of the same unit: the same (run, round, unit) key
            ya, yb = (sketch_units({unit: x}, SECRET, "cosine", p, buckets)[unit] for x in (a, b))
            estimate = consensus.agreement(np.stack([ya, yb]), np.full(2, 0.5))[0][0]  # the aggregator's cosine
            truth = float(a @ b) / float(np.linalg.norm(a) * np.linalg.norm(b))
            errors.setdefault(rho, []).append(estimate - truth)
    every = np.abs(np.concatenate(list(errors.values())))
    assert (every <= 0.05).mean() >= 0.85 and every.max() <= 0.15
    for rho, e in errors.items():
        expected = (1 - rho**2) / np.sqrt(buckets)
        assert 0.35 * expected <= np.std(e) <= 1.8 * expected, (rho, np.std(e), expected)


def test_sketch_refuses_bad_parameters():
    with pytest.raises(SketchError, match="power of two"):
        count_sketch(np.ones(4), bytes(32), 100)
    with pytest.raises(SketchError, match="at least 32 bytes"):
        derive_key(b"short", "r", 1, "u")


def test_importance_and_normalisation_by_hand():
    s = consensus.importance(np.array([100, 300]), np.array([0.5, 1.0]), np.array([[0.8, 0.2], [0.1, 0.9]]))
    np.testing.assert_allclose(s, [[40.0, 10.0], [30.0, 270.0]])
    w = consensus.normalise(s)
    np.testing.assert_allclose(w, [[40 / 70, 10 / 280], [30 / 70, 270 / 280]])
    off = consensus.importance(np.array([100, 300]), np.array([0.5, 1.0]), np.zeros((2, 2)), use_routing=False,
                               use_reliability=False)
    np.testing.assert_allclose(consensus.normalise(off), [[0.25, 0.25], [0.75, 0.75]])
    np.testing.assert_allclose(consensus.normalise(np.zeros((2, 1))), [[0.5], [0.5]])


def test_agreement_flags_the_opposing_silo():
    rng = np.random.default_rng(1)
    common = rng.standard_normal(256)
    y = np.stack([common + 0.1 * rng.standard_normal(256) for _ in range(4)] + [-common])
    cos, sign = consensus.agreement(y, np.full(5, 0.2))
    score = consensus.agreement_score(cos, sign)
    assert np.all(cos[:4] > 0.9) and cos[4] < -0.9 and np.all(sign[:4] > 0.9) and sign[4] < 0.1
    groups = consensus.partition(score, min_group_size=1)
    assert groups.tolist() == [0, 0, 0, 0, 1]
    assert consensus.partition(score, min_group_size=2).tolist() == [0] * 5  # a group of 1 is merged
    alpha = consensus.coefficients(np.full(5, 0.2), consensus.phi(score, 0.1))
    assert alpha.sum() == pytest.approx(1.0) and alpha[4] < alpha[0] / 5


def test_projection_removes_only_the_opposing_component():
    cons, conf = np.array([1.0, 0.0], np.float32), np.array([-1.0, 1.0], np.float32)
    np.testing.assert_allclose(project_off(conf, cons), [0.0, 1.0])
    np.testing.assert_array_equal(project_off(np.array([1.0, 1.0]), cons), [1.0, 1.0])  # agreeing: untouched
    groups = {0: GroupSum(np.array([2.0, 0.0], np.float32), 1.0, 3), 1: GroupSum(np.array([-2.0, 2.0], np.float32), 1.0, 3)}
    np.testing.assert_allclose(combine(groups, project=True), [1.0, 1.0])  # ([2,0] + [0,2]) / 2
    np.testing.assert_allclose(combine(groups, project=False), [0.0, 1.0])  # plain weighted mean


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


def test_retention_anchor_and_importance_scale():
    shares = {"L0.E0": 0.6, "L0.E1": 0.3, "L0.E2": 0.0, "L0.shared": 1.0, "L1.E0": 0.2, "L1.E1": 0.1}
    scale = importance_scale(shares)
    assert scale == {"L0.E0": 1.0, "L0.E1": 0.5, "L0.E2": 0.0, "L0.shared": 1.0, "L1.E0": 1.0, "L1.E1": 0.5}
    g = {"L0.E1": np.zeros(2, np.float32)}
    local = {"L0.E1": np.array([2.0, -2.0], np.float32)}
    np.testing.assert_allclose(anchor(g, local, 0.5, scale)["L0.E1"], [0.5, -0.5])
    np.testing.assert_allclose(anchor(g, local, 1.0)["L0.E1"], [2.0, -2.0])  # local-only
    np.testing.assert_allclose(anchor(g, local, 0.0)["L0.E1"], [0.0, 0.0])  # FedAvg


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


def test_reliability_weight_screens_out_unhelpful_rounds_without_ranking_healthy_ones():
    rel = np.array([-0.2, 0.0, 0.004, 0.01, 0.15, 0.6])
    np.testing.assert_allclose(consensus.reliability_weight(rel, 0.05, 0.01), [0.05, 0.05, 0.4, 1.0, 1.0, 1.0])
    # saturation 1 is the unsaturated relative gain, floored
    np.testing.assert_allclose(consensus.reliability_weight(rel, 0.05, 1.0), [0.05, 0.05, 0.05, 0.05, 0.15, 0.6])
