"""crypto/fixed_point.py: encoding error bounds, two's complement, refusal of what does not fit, and the
overflow-safe plan."""

from __future__ import annotations

import math

import numpy as np
import pytest

from crypto.fixed_point import FixedPoint, FixedPointError, plan_fixed_point
from fcmoe.errors import FcMoeError


def wrapping_sum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for v in vectors:
        total += v  # numpy unsigned arrays wrap mod 2**bits
    return total


@pytest.mark.parametrize("bits,frac_bits", [(32, 16), (64, 24), (64, 40)])
def test_round_trip_error_bound(bits: int, frac_bits: int) -> None:
    fp = FixedPoint(bits, frac_bits)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=10_000) * min(fp.max_abs, 1e3)
    encoded = fp.encode(x)
    assert encoded.dtype == (np.uint32 if bits == 32 else np.uint64)
    assert np.max(np.abs(fp.decode(encoded) - x)) <= 2.0 ** -(frac_bits + 1)


def test_sum_of_encodings_within_stated_error() -> None:
    fp = FixedPoint(64, 20)
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=5_000) for _ in range(7)]
    total = fp.decode(wrapping_sum([fp.encode(x) for x in xs]))
    assert np.max(np.abs(total - np.sum(xs, axis=0))) <= fp.sum_error_bound(7)


def test_negative_values_are_twos_complement() -> None:
    fp = FixedPoint(32, 8)
    assert fp.encode(np.array([-1.0]))[0] == 2**32 - 256
    assert fp.modulus == 2**32


@pytest.mark.parametrize("bits", [32, 64])
def test_max_abs_is_accepted_and_beyond_is_refused(bits: int) -> None:
    fp = FixedPoint(bits, 10)
    edge = np.array([fp.max_abs, -fp.max_abs])
    assert np.array_equal(fp.decode(fp.encode(edge)), edge)
    with pytest.raises(FixedPointError, match="largest"):
        fp.encode(np.array([0.0, math.ldexp(1.0, bits - 1 - 10)]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e30])
def test_out_of_range_and_non_finite_refused_not_clipped(bad: float) -> None:
    fp = FixedPoint(64, 24)
    with pytest.raises(FixedPointError) as err:
        fp.encode(np.array([0.5, bad, -0.25]))
    assert "\n" not in str(err.value)
    assert isinstance(err.value, FcMoeError)


def test_decode_refuses_wrong_dtype() -> None:
    with pytest.raises(FixedPointError):
        FixedPoint(64, 16).decode(np.zeros(3, dtype=np.uint32))


@pytest.mark.parametrize("bits,frac_bits", [(16, 8), (64, 64), (64, -1), (32, 40)])
def test_bad_fixed_point_refused(bits: int, frac_bits: int) -> None:
    with pytest.raises(FixedPointError):
        FixedPoint(bits, frac_bits)


def test_plan_meets_error_target() -> None:
    fp = plan_fixed_point(num_silos=10, clip_norm=1.0, max_coefficient=1.0, bits=64, error=1e-6)
    assert fp.bits == 64 and fp.frac_bits >= 8
    assert fp.sum_error_bound(10) <= 1e-6
    assert fp.sum_error_bound(10) > 1e-6 / 2  # smallest such frac_bits: the rest is headroom


def test_plan_refuses_impossible() -> None:
    with pytest.raises(FixedPointError, match="no overflow-free"):
        plan_fixed_point(num_silos=10**6, clip_norm=1e3, max_coefficient=1.0, bits=32)


def test_plan_caps_precision_at_overflow_safety() -> None:
    fp = plan_fixed_point(num_silos=10, clip_norm=1.0, max_coefficient=1.0, bits=32, error=1e-30)
    assert fp.sum_error_bound(10) > 1e-30
    assert 10 * 1.0 * 2**fp.frac_bits + 5 < 2**31


@pytest.mark.parametrize("bits,n,clip,alpha", [(32, 10, 1.0, 1.0), (64, 10, 1.0, 1.0),
                                               (32, 100, 0.5, 3.0), (64, 1000, 7.0, 0.25)])
def test_overflow_proof_holds_at_the_bound(bits: int, n: int, clip: float, alpha: float) -> None:
    """n silos each at +-alpha_max*C in every coordinate: the extreme sums decode exactly."""
    fp = plan_fixed_point(n, clip, alpha, bits=bits, error=1e-30)  # finest overflow-safe plan
    edge = alpha * clip
    rng = np.random.default_rng(2)
    signs = np.vstack([np.ones((1, n)), -np.ones((1, n)), rng.choice([-1.0, 1.0], size=(62, n))])
    vectors = [signs[:, i] * edge for i in range(n)]  # column i is silo i's vector
    total = fp.decode(wrapping_sum([fp.encode(v) for v in vectors]))
    assert np.array_equal(total, signs.sum(axis=1) * edge)


def test_overflow_bound_is_tight_enough_to_matter() -> None:
    """One more fractional bit than the plan allows and the same extreme inputs wrap."""
    n = 10
    fp = plan_fixed_point(n, 1.0, 1.0, bits=32, error=1e-30)
    too_fine = FixedPoint(32, fp.frac_bits + 1)
    vectors = [np.ones(4) for _ in range(n)]
    assert not np.array_equal(too_fine.decode(wrapping_sum([too_fine.encode(v) for v in vectors])), n * np.ones(4))
