"""The FC-MoE paper's mechanisms as options (issue 23): silo-side projection, residual re-anchoring,
importance from activation x update norm. Pure maths by hand, then short in-process runs."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from conftest import silo_config, smoke_config
from pydantic import ValidationError

from aggregator.strategies.fcmoe import consensus
from aggregator.accumulate import GroupSum
from aggregator.strategies.fcmoe.consensus import CONFLICT, CONSENSUS
from aggregator.coordinator import norm_refusal
from aggregator.strategies import FcMoe, SiloReport
from fcmoe.config import FCMOE_SKETCH_VARIANT, FcMoeConfig, LocalTrainingConfig
from silo_agent.projection import (GlobalHistory, ResidualBook, opposed_units, project_against, project_units,
                                   reanchor)


# --- silo-side projection --------------------------------------------------------------------------


def test_projection_of_a_conflicting_2d_delta_by_hand():
    # delta (1, 2), direction (-1, 0): <x, d> = -1 < 0, ||d||^2 = 1
    # removed = (-1 / 1) * (-1, 0) = (1, 0); kept = (1, 2) - (1, 0) = (0, 2), orthogonal to d
    kept, removed = project_against(np.array([1.0, 2.0]), np.array([-1.0, 0.0]))
    np.testing.assert_array_equal(kept, [0.0, 2.0])
    np.testing.assert_array_equal(removed, [1.0, 0.0])


def test_projection_of_a_conflicting_3d_delta_by_hand():
    # delta (3, -1, 2), direction (-1, 2, 2): <x, d> = -3 - 2 + 4 = -1, ||d||^2 = 1 + 4 + 4 = 9
    # removed = (-1/9) (-1, 2, 2) = (1/9, -2/9, -2/9); kept = (26/9, -7/9, 20/9); <kept, d> = (-26 - 14 + 40)/9 = 0
    delta, direction = np.array([3.0, -1.0, 2.0]), np.array([-1.0, 2.0, 2.0])
    kept, removed = project_against(delta, direction)
    np.testing.assert_allclose(removed, [1 / 9, -2 / 9, -2 / 9], rtol=1e-15)
    np.testing.assert_allclose(kept, [26 / 9, -7 / 9, 20 / 9], rtol=1e-15)
    assert abs(float(kept @ direction)) < 1e-14
    np.testing.assert_allclose(kept + removed, delta, rtol=1e-15)
    # a float32 delta stays float32 (what silos upload)
    k32, r32 = project_against(delta.astype(np.float32), direction)
    assert k32.dtype == r32.dtype == np.float32
    np.testing.assert_allclose(k32, [26 / 9, -7 / 9, 20 / 9], rtol=1e-6)


def test_no_projection_when_the_cosine_is_not_negative():
    for delta, direction in (([1.0, 1.0], [1.0, 0.0]),      # cos = 0.707
                             ([0.0, 1.0], [1.0, 0.0]),      # orthogonal: cos = 0
                             ([2.0, -1.0, 0.5], [2.0, -1.0, 0.5])):  # same direction
        kept, removed = project_against(np.array(delta), np.array(direction))
        np.testing.assert_array_equal(kept, delta)
        np.testing.assert_array_equal(removed, np.zeros(len(delta)))


def test_zero_direction_and_zero_delta_are_left_alone():
    kept, removed = project_against(np.array([1.0, -2.0]), np.zeros(2))
    np.testing.assert_array_equal(kept, [1.0, -2.0])
    np.testing.assert_array_equal(removed, [0.0, 0.0])
    kept, removed = project_against(np.zeros(3), np.array([-1.0, 2.0, 2.0]))
    np.testing.assert_array_equal(kept, np.zeros(3))
    np.testing.assert_array_equal(removed, np.zeros(3))
    with pytest.raises(ValueError, match="numbers"):
        project_against(np.ones(3), np.ones(2))


def test_projection_per_unit_and_the_previous_global_update_as_direction():
    history = GlobalHistory()
    history.keep(0, {"a": np.array([0.0, 0.0], np.float32), "b": np.array([1.0, 1.0], np.float32)})
    assert history.direction(0) == (None, None)  # first round: nothing to project against
    kept, removed = project_units({"a": np.array([1.0, 2.0], np.float32)}, None)
    np.testing.assert_array_equal(kept["a"], [1.0, 2.0])
    np.testing.assert_array_equal(removed["a"], [0.0, 0.0])
    history.keep(1, {"a": np.array([-1.0, 0.0], np.float32), "b": np.array([1.0, 3.0], np.float32)})
    direction, since = history.direction(1)
    assert since == 0
    np.testing.assert_array_equal(direction["a"], [-1.0, 0.0])  # G1 - G0
    np.testing.assert_array_equal(direction["b"], [0.0, 2.0])
    deltas = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([5.0, 1.0], np.float32)}
    kept, removed = project_units(deltas, direction)
    np.testing.assert_array_equal(kept["a"], [0.0, 2.0])  # conflicts: projected (as by hand above)
    np.testing.assert_array_equal(removed["a"], [1.0, 0.0])
    np.testing.assert_array_equal(kept["b"], [5.0, 1.0])  # agrees: kept whole
    np.testing.assert_array_equal(removed["b"], [0.0, 0.0])
    history.keep(2, {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)})
    assert sorted(history.versions) == [1, 2]  # only the last two are held
    assert history.direction(2)[1] == 1


# --- residual re-anchoring ---------------------------------------------------------------------------


def test_reanchoring_restores_the_residual_exactly_with_lambda_one_and_an_unchanged_global():
    # dyadic numbers: every sum below is exact in floating point
    glob = {"a": np.array([0.5, -1.25, 2.0]), "b": np.array([1.0, 0.0, -0.5])}
    delta = {"a": np.array([1.0, 2.0, 0.0]), "b": np.array([0.25, 0.5, 0.75])}
    direction = {"a": np.array([-1.0, 0.0, 0.0]), "b": np.array([1.0, 0.0, 0.0])}
    kept, removed = project_units(delta, direction)
    np.testing.assert_array_equal(removed["a"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(removed["b"], np.zeros(3))
    book = ResidualBook()
    book.keep(1, removed)
    assert book.before(1) is None  # round 1 starts from the global model
    start = reanchor(glob, book.before(2), 1.0)  # round 2, the global unchanged
    for u in glob:
        np.testing.assert_array_equal(start[u] - glob[u], removed[u])  # the projected-away part, restored
    # one silo, whose kept part the global absorbed: lambda = 1 gives back exactly its own trained model
    absorbed = {u: glob[u] + kept[u] for u in glob}
    start = reanchor(absorbed, book.before(2), 1.0)
    for u in glob:
        np.testing.assert_array_equal(start[u], glob[u] + delta[u])
    # lambda = 0.5 (the paper's): half of it; lambda = 0: the global itself
    np.testing.assert_array_equal(reanchor(glob, removed, 0.5)["a"], glob["a"] + [0.5, 0.0, 0.0])
    np.testing.assert_array_equal(reanchor(glob, removed, 0.0)["a"], glob["a"])
    assert reanchor(glob, None, 1.0)["a"] is not glob["a"]


def test_residual_book_serves_a_redone_round_the_same_residual():
    book = ResidualBook()
    book.keep(1, {"u": np.array([1.0])})
    book.keep(2, {"u": np.array([2.0])})  # round 2 trained once ...
    assert book.before(2)["u"][0] == 1.0  # ... and trained afresh (a redo) re-anchors round 1's again
    assert book.before(3)["u"][0] == 2.0
    book.keep(3, {"u": np.array([3.0])})
    assert sorted(book.rounds) == [2, 3]


def test_float32_reanchoring_is_the_rounded_exact_sum():
    rng = np.random.default_rng(0)
    g, r = rng.standard_normal(1000).astype(np.float32), rng.standard_normal(1000).astype(np.float32)
    out = reanchor({"u": g}, {"u": r}, 0.5)["u"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, (g.astype(np.float64) + 0.5 * r.astype(np.float64)).astype(np.float32))


# --- importance from activation x update norm --------------------------------------------------------


def test_activation_norm_importance_by_hand():
    # units: expert e0, expert e1, shared (share 1); silos a, b
    share = np.array([[0.8, 0.2, 1.0], [0.1, 0.9, 1.0]])
    norm = np.array([[2.0, 1.0, 3.0], [4.0, 0.5, 1.0]])
    s = consensus.activation_norm_importance(share, norm)
    np.testing.assert_allclose(s, [[1.6, 0.2, 3.0], [0.4, 0.45, 1.0]])
    np.testing.assert_allclose(consensus.normalise(s), [[0.8, 0.2 / 0.65, 0.75], [0.2, 0.45 / 0.65, 0.25]])
    # a unit neither silo moved is shared equally
    np.testing.assert_allclose(consensus.normalise(consensus.activation_norm_importance(share, np.zeros((2, 3)))),
                               np.full((2, 3), 0.5))


def _reports():
    units = ["L0.E0", "L0.E1", "L0.shared"]
    # sample counts and reliabilities differ, and play no part in activation_norm
    return units, {
        "a": SiloReport(100, 0.0, dict(zip(units, [0.8, 0.2, 1.0])), dict(zip(units, [2.0, 1.0, 3.0]))),
        "b": SiloReport(900, 1.0, dict(zip(units, [0.1, 0.9, 1.0])), dict(zip(units, [4.0, 0.5, 1.0]))),
    }


def test_strategy_weighs_by_activation_norm_and_leaves_projection_to_the_silos():
    units, reports = _reports()
    strategy = FcMoe(FcMoeConfig(importance_measure="activation_norm", projection_side="silo", reanchor_lambda=0.5),
                     min_group_size=1)
    plan = strategy.configure_round(2, LocalTrainingConfig(), seed=0)
    assert plan.report_norms and plan.silo_projection == "previous_global" and plan.reanchor_lambda == 0.5
    assert plan.sketch_buckets == 0  # no sketch stage: the consensus is the last global update
    expected = {"a": [0.8, 0.2 / 0.65, 0.75], "b": [0.2, 0.45 / 0.65, 0.25]}
    w = strategy.sketch_weights(2, units, reports)
    # one group and alpha = w even with agreement scores that would have split groups aggregator-side
    c = strategy.coefficients(2, units, reports, {"a": {u: -1.0 for u in units}, "b": {u: 1.0 for u in units}})
    for silo, values in expected.items():
        np.testing.assert_allclose([w.alpha[silo][u] for u in units], values)
        np.testing.assert_allclose([c.alpha[silo][u] for u in units], values)
        assert set(c.group[silo].values()) == {CONSENSUS}
    # nor does the aggregator project (the silos did, before masking)
    groups = {CONSENSUS: GroupSum(np.array([1.0, 0.0], np.float32), 1.0, 3),
              CONFLICT: GroupSum(np.array([-1.0, 1.0], np.float32), 1.0, 3)}
    np.testing.assert_allclose(strategy.combine("L0.E0", groups), [0.0, 0.5])
    aggregator_side = FcMoe(FcMoeConfig(**FCMOE_SKETCH_VARIANT), min_group_size=1)
    # the sketch variant: the conflict sum (-1, 1) opposes (1, 0) and becomes (0, 1) first
    np.testing.assert_allclose(aggregator_side.combine("L0.E0", groups), [0.5, 0.5])
    sketch = aggregator_side.configure_round(2, LocalTrainingConfig(), seed=0)
    assert not sketch.report_norms and sketch.silo_projection == "" and sketch.reanchor_lambda == 0.0
    assert sketch.sketch_buckets == 256
    with pytest.raises(ValueError, match="no unit norms"):
        strategy.sketch_weights(2, units, {"a": SiloReport(1, 1.0, dict(zip(units, [1.0] * 3)))})


def test_config_refuses_reanchoring_without_silo_side_projection():
    with pytest.raises(ValidationError, match="projection_side: silo"):
        FcMoeConfig(reanchor_lambda=0.5, projection_side="aggregator")
    with pytest.raises(ValidationError, match="projection_side: silo"):
        FcMoeConfig(reanchor_lambda=0.5, projection_side="silo", projection=False)
    with pytest.raises(ValidationError):
        FcMoeConfig(consensus_direction="sketch_sum")  # not offered: docs/algorithm.md says why
    assert FcMoeConfig(reanchor_lambda=0.5, projection_side="silo").reanchor_lambda == 0.5


def test_defaults_are_the_papers_mechanisms_with_the_adapter():
    """The measured defaults (docs/algorithm.md, "The paper's setting, measured"); re-anchoring's 0.5 is
    the default only where silo-side projection runs, so switching projection off needs nothing else."""
    default = FcMoeConfig()
    assert (default.importance_measure, default.projection_side, default.retention) == ("activation_norm", "silo", True)
    assert default.reanchor == 0.5 and FcMoeConfig(reanchor_lambda=0.2).reanchor == 0.2
    assert FcMoeConfig(projection=False).reanchor == 0.0 and FcMoeConfig(**FCMOE_SKETCH_VARIANT).reanchor == 0.0
    plan = FcMoe(default, min_group_size=2).configure_round(1, LocalTrainingConfig(), 0)
    assert (plan.silo_projection, plan.reanchor_lambda, plan.report_norms, plan.sketch_buckets) == (
        "previous_global", 0.5, True, 0)
    assert plan.personal_adapter


def test_unit_norms_in_a_report_are_checked():
    assert norm_refusal([0.5, 1.0], 2, 1.0) is None
    assert "2 units" in norm_refusal([0.5], 2, 1.0)
    assert "negative" in norm_refusal([-0.1, 1.0], 2, 1.0)
    assert "not finite" in norm_refusal([float("nan"), 1.0], 2, 0.0)
    assert "over the clip" in norm_refusal([0.5, 1.5], 2, 1.0)
    assert norm_refusal([0.5, 1.5], 2, 0.0) is None  # no clip, no ceiling


def test_opposed_units_count_the_updates_with_a_negative_cosine_by_hand():
    deltas = {"a": np.array([1.0, 0.0]), "b": np.array([-1.0, 0.5]), "c": np.array([0.0, 0.0]),
              "d": np.array([0.0, 2.0]), "e": np.array([-3.0, -1.0])}
    directions = {"a": np.array([1.0, 1.0]), "b": np.array([1.0, 1.0]), "c": np.array([1.0, 0.0]),
                  "d": np.array([1.0, 0.0]), "e": np.array([0.0, 0.0])}
    # a: cos > 0; b: -1 + 0.5 < 0; c: zero delta and e: zero direction are not compared; d: cos = 0
    assert opposed_units(deltas, directions) == (1, 3)
    assert opposed_units(deltas, directions, ["a", "b"]) == (1, 2)
    assert opposed_units(deltas, None) == (0, 0)  # first round: no previous global update
    # exactly the units project_units would project
    _, removed = project_units(deltas, directions)
    assert sum(bool(r.any()) for r in removed.values()) == opposed_units(deltas, directions)[0]


# --- in process: the options wired through coordinator and silo agents -------------------------------


@pytest.mark.parametrize("mode", ["none", "masking"])
def test_silo_side_projection_and_reanchoring_in_process(tmp_path, caplog, mode):
    from crypto.pki import ensure_pki
    from fcmoe.launch.inprocess import run_in_process

    strategy = {"name": "fcmoe", "fcmoe": {"importance_measure": "activation_norm", "projection_side": "silo",
                                           "reanchor_lambda": 0.5}}
    config = smoke_config(tmp_path, strategy, min_silos=3, rounds=4, min_group_size=2, max_round_retries=0,
                          secure_aggregation={"mode": mode, "threshold": 0.6, "phase_timeout_s": 30})
    names = [f"silo{i}" for i in range(3)]
    if mode == "masking":
        ensure_pki(config.aggregator.pki_dir, names)
    silos = [silo_config(config, s, 0, index=i, num_silos=3) for i, s in enumerate(names)]
    silos = [c.model_copy(update={"silo": c.silo.model_copy(update={"measure_conflict": True})}) for c in silos]
    agents: list = []
    with caplog.at_level(logging.INFO):
        coord = run_in_process(config, silos, run_id=f"paper-{mode}", agents=agents)
    assert coord.machine.succeeded and coord.machine.version == 4
    rows = coord.metrics.rows()
    assert all(np.isfinite(r["global_loss"]) for r in rows)
    assert rows[-1]["global_loss"] < rows[0]["global_loss"]
    projections = [dict(re.findall(r"(\w+)=(\S+)", r.getMessage())) for r in caplog.records
                   if "event=silo_projection" in r.getMessage()]
    assert len(projections) == 12  # 3 silos x 4 rounds
    first = [p for p in projections if p["round"] == "1"]
    assert all(p["since_version"] == "None" and float(p["removed_norm"]) == 0 for p in first)
    later = [p for p in projections if p["round"] != "1"]
    assert all(p["since_version"] == str(int(p["round"]) - 2) for p in later)
    # the silos' updates conflict with the last global update on some units: those were projected
    assert sum(int(p["projected"]) for p in later) > 0 and max(float(p["removed_norm"]) for p in later) > 0
    # silo.measure_conflict counts the same opposed expert updates (every LoRA unit here is an expert's)
    for agent in agents:
        assert agent.state.conflicts[1] == (0, 0)  # no previous global update yet
        assert all(agent.state.conflicts[r][1] > 0 for r in (2, 3, 4))
    assert (sum(agent.state.conflicts[r][0] for agent in agents for r in (2, 3, 4))
            == sum(int(p["projected"]) for p in later))
    reanchored = [dict(re.findall(r"(\w+)=(\S+)", r.getMessage())) for r in caplog.records
                  if "event=reanchored" in r.getMessage()]
    assert {p["round"] for p in reanchored} <= {"2", "3", "4"} and len(reanchored) == 9
    assert any(float(p["residual_norm"]) > 0 for p in reanchored)  # the removed part came back next round
    # no sketch stage: the consensus is known to every silo
    assert all(not s.get("sketch_bytes") for s in rows[1]["silos"].values())


def test_a_silo_refuses_projection_settings_it_should_not_trust():
    """The aggregator sends these settings; a malicious one could ask for a direction the silo cannot
    compute or a re-anchoring factor that throws its start far from the global model."""
    from silo_agent.projection import instruction_refusal

    assert instruction_refusal("", 0.0) is None and instruction_refusal("previous_global", 0.5) is None
    assert "unknown to this silo" in instruction_refusal("sketch_sum", 0.5)
    for bad in (-0.1, 1.5, 100.0, float("nan")):
        assert "outside [0, 1]" in instruction_refusal("previous_global", bad)
