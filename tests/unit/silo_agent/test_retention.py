"""Local knowledge retention: the anchor between global and local models, scaled by routing importance."""

import numpy as np

from silo_agent.retention import anchor, importance_scale


def test_retention_anchor_and_importance_scale():
    shares = {"L0.E0": 0.6, "L0.E1": 0.3, "L0.E2": 0.0, "L0.shared": 1.0, "L1.E0": 0.2, "L1.E1": 0.1}
    scale = importance_scale(shares)
    assert scale == {"L0.E0": 1.0, "L0.E1": 0.5, "L0.E2": 0.0, "L0.shared": 1.0, "L1.E0": 1.0, "L1.E1": 0.5}
    g = {"L0.E1": np.zeros(2, np.float32)}
    local = {"L0.E1": np.array([2.0, -2.0], np.float32)}
    np.testing.assert_allclose(anchor(g, local, 0.5, scale)["L0.E1"], [0.5, -0.5])
    np.testing.assert_allclose(anchor(g, local, 1.0)["L0.E1"], [2.0, -2.0])  # local-only
    np.testing.assert_allclose(anchor(g, local, 0.0)["L0.E1"], [0.0, 0.0])  # FedAvg
