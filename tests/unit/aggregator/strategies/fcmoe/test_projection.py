"""FC-MoE's gradient consensus projection: only the opposing component is removed; groups combine with or
without it."""

import numpy as np

from aggregator.accumulate import GroupSum
from aggregator.strategies.fcmoe.projection import combine, project_off


def test_projection_removes_only_the_opposing_component():
    cons, conf = np.array([1.0, 0.0], np.float32), np.array([-1.0, 1.0], np.float32)
    np.testing.assert_allclose(project_off(conf, cons), [0.0, 1.0])
    np.testing.assert_array_equal(project_off(np.array([1.0, 1.0]), cons), [1.0, 1.0])  # agreeing: untouched
    groups = {0: GroupSum(np.array([2.0, 0.0], np.float32), 1.0, 3), 1: GroupSum(np.array([-2.0, 2.0], np.float32), 1.0, 3)}
    np.testing.assert_allclose(combine(groups, project=True), [1.0, 1.0])  # ([2,0] + [0,2]) / 2
    np.testing.assert_allclose(combine(groups, project=False), [0.0, 1.0])  # plain weighted mean
