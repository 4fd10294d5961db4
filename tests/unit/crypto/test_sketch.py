"""crypto/sketch.py: keyed count-sketches are linear, keep inner products in expectation, and refuse bad
parameters."""

import os

import numpy as np
import pytest

from aggregator.strategies.fcmoe import consensus
from crypto.sketch import SketchError, count_sketch, derive_key, sketch_units

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
