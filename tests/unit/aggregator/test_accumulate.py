"""aggregator/accumulate.py: group sums, the plan's regrouping and floors, the plaintext adder."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.accumulate import (Coefficients, GroupSum, PlaintextAccumulator, clip_bound, floor_coefficients,
                                   merge_small_groups, regroup, weighted_mean)
from crypto.secagg import RoundView, cells, weight_policy_violation
from fcmoe.errors import ProtocolError

UNITS = ("u0", "u1")
PLAN = Coefficients(alpha={"a": {"u0": 1.0, "u1": 0.5}, "b": {"u0": 2.0, "u1": 0.001}, "c": {"u0": 3.0, "u1": 0.4}},
                    group={"a": {"u0": 0, "u1": 0}, "b": {"u0": 1, "u1": 0}, "c": {"u0": 1, "u1": 1}})


def test_group_sums_are_float64_and_the_weighted_mean_is_float32():
    groups = {0: GroupSum(np.array([1, 2], dtype=np.float32), 1.0, 1), 1: GroupSum(np.array([3.0, 2.0]), 3.0, 2)}
    assert groups[0].vector.dtype == np.float64
    mean = weighted_mean(groups)
    assert mean.dtype == np.float32 and np.allclose(mean, [1.0, 1.0])
    with pytest.raises(ProtocolError, match="no weight"):
        weighted_mean({0: GroupSum(np.zeros(2), 0.0, 1)})


def test_small_groups_merge_into_one_and_large_ones_stay():
    sums = {"u0": {0: GroupSum(np.ones(2), 1.0, 1), 1: GroupSum(np.ones(2) * 2, 2.0, 3)},
            "u1": {0: GroupSum(np.ones(2), 1.0, 2), 1: GroupSum(np.ones(2), 1.0, 2)}}
    merged = merge_small_groups(sums, 2)
    assert list(merged["u0"]) == [0] and merged["u0"][0].count == 4 and merged["u0"][0].weight == 3.0
    assert np.array_equal(merged["u0"][0].vector, [3.0, 3.0])
    assert all(merged["u1"][g] is sums["u1"][g] for g in (0, 1))


def test_regroup_drops_the_silos_that_left_and_merges_what_they_leave_too_small():
    plan = regroup(PLAN, {"a", "c"}, 2)
    assert set(plan.alpha) == set(plan.group) == {"a", "c"}
    assert plan.group == {"a": {"u0": 0, "u1": 0}, "c": {"u0": 0, "u1": 0}}  # each group held one of the two
    assert regroup(PLAN, {"a", "b", "c"}, 1).group == PLAN.group


def test_floored_plans_pass_the_weight_policy_silos_check():
    """The honest aggregator never makes a plan the silos refuse: b's 0.001 on u1 is raised to a tenth
    of a's 0.5, its group's largest; the floors are per (unit, group)."""
    peers = sorted(PLAN.alpha)

    def refusal(plan: Coefficients) -> str | None:
        view = RoundView("run", 1, "update", tuple(peers), UNITS, cells(plan.group, peers, UNITS),
                         cells(plan.alpha, peers, UNITS), 32, 16)
        return weight_policy_violation(view, set(peers), 1, 0.1)

    assert "under the minimum ratio 0.1" in refusal(PLAN)
    floored = floor_coefficients(PLAN, 0.1)
    assert refusal(floored) is None
    assert floored.alpha["b"]["u1"] == pytest.approx(0.05)
    assert floored.alpha["c"]["u1"] == 0.4  # alone in group 1: its own largest
    assert floored.alpha["a"] == PLAN.alpha["a"] and floored.group == PLAN.group


def test_the_plaintext_adder_keeps_only_group_sums_and_refuses_what_the_plan_does_not_allow():
    sizes = {"u0": 2, "u1": 1}
    adder = PlaintextAccumulator(sizes, PLAN, clip_norm=1.0)
    adder.add("a", {"u0": np.array([0.6, 0.0]), "u1": np.array([0.5])})
    adder.add("c", {"u0": np.array([0.0, 3.0]), "u1": np.array([-0.4])})
    for silo, payload, why in [
        ("a", {"u0": np.zeros(2), "u1": np.zeros(1)}, "already contributed"),
        ("d", {"u0": np.zeros(2), "u1": np.zeros(1)}, "no coefficients"),
        ("b", {"u0": np.zeros(2)}, "do not match the layout"),
        ("b", {"u0": np.array([np.nan, 0.0]), "u1": np.zeros(1)}, "NaN or infinity"),
        ("b", {"u0": np.array([2.1, 0.0]), "u1": np.zeros(1)}, "u0 exceeds alpha \\* clip_norm"),  # 2.0 * 1.0
    ]:
        with pytest.raises(ProtocolError, match=why):
            adder.add(silo, payload)
    assert adder.members == {"a", "c"}
    result = adder.result()
    assert set(result["u0"]) == {0, 1} and set(result["u1"]) == {0, 1}
    assert np.array_equal(result["u0"][1].vector, [0.0, 3.0]) and result["u0"][1].weight == 3.0
    assert result["u1"][0].count == 1 and result["u1"][1].weight == 0.4
    assert clip_bound(-2.0, 1.0) == clip_bound(2.0, 1.0) > 2.0
