"""silo_agent/update.py: each unit's delta is clipped on its own and keeps its direction."""

import numpy as np

from silo_agent.update import clip_units, scaled_payload, unit_deltas


def test_clip_units_bounds_each_unit_and_keeps_direction():
    deltas = {"a": np.array([3.0, 4.0], np.float32), "b": np.array([0.3, 0.4], np.float32)}
    clipped, norms = clip_units(deltas, 1.0)
    assert norms == {"a": 5.0, "b": 0.5} or np.allclose(list(norms.values()), [5.0, 0.5])
    np.testing.assert_allclose(clipped["a"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(clipped["b"], deltas["b"])  # under the bound: untouched
    np.testing.assert_array_equal(clip_units(deltas, 0.0)[0]["a"], deltas["a"])  # 0 disables
    payload = scaled_payload(unit_deltas({"a": np.ones(2)}, {"a": np.zeros(2)}), {"a": 3.0})
    np.testing.assert_array_equal(payload["a"], [3.0, 3.0])
