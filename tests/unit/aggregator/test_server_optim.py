"""aggregator/server_optim.py against the FedOpt formulas (Reddi et al. 2021), step by step."""

from __future__ import annotations

import numpy as np

from aggregator.server_optim import adam_step, momentum_step, sgd_step

X = np.array([1.0, -2.0], np.float32)
D1, D2 = np.array([0.5, -0.25], np.float32), np.array([-0.1, 0.3], np.float32)


def test_sgd_moves_by_lr_times_the_averaged_delta():
    out = sgd_step(X, D1, 0.5)
    assert out.dtype == np.float32 and out.tolist() == [1.25, -2.125]


def test_momentum_starts_from_the_delta_then_accumulates():
    x1, v1 = momentum_step(X, D1, None, 1.0, 0.9)
    np.testing.assert_allclose(v1, D1)
    np.testing.assert_allclose(x1, X + D1)
    x2, v2 = momentum_step(x1, D2, v1, 0.5, 0.9)
    np.testing.assert_allclose(v2, 0.9 * D1 + D2, rtol=1e-6)
    np.testing.assert_allclose(x2, x1 + 0.5 * (0.9 * D1 + D2), rtol=1e-6)


def test_adam_without_bias_correction_and_tau_bounding_the_adaptivity():
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    x1, m1, v1 = adam_step(X, D1, None, None, lr, b1, b2, tau)
    np.testing.assert_allclose(m1, (1 - b1) * D1, rtol=1e-6)
    np.testing.assert_allclose(v1, b2 * tau**2 + (1 - b2) * D1**2, rtol=1e-6)  # v starts at tau^2
    np.testing.assert_allclose(x1, X + lr * m1 / (np.sqrt(v1) + tau), rtol=1e-6)
    x2, m2, v2 = adam_step(x1, D2, m1, v1, lr, b1, b2, tau)
    np.testing.assert_allclose(m2, b1 * m1 + (1 - b1) * D2, rtol=1e-6)
    np.testing.assert_allclose(v2, b2 * v1 + (1 - b2) * D2**2, rtol=1e-6)
    np.testing.assert_allclose(x2, x1 + lr * m2 / (np.sqrt(v2) + tau), rtol=1e-6)
    zero, _, _ = adam_step(X, np.zeros(2, np.float32), None, None, lr, b1, b2, tau)
    np.testing.assert_array_equal(zero, X)  # no update, no move
