"""Fixed-point encoding of float deltas into Z/2^bits, with a plan that provably never overflows.

Masking (:mod:`crypto.masking`) works in the ring of integers mod ``2**bits``: masks cancel only
under exact modular arithmetic, so float deltas must first become integers. We encode
``q = round(x * 2**f) mod 2**bits`` (two's complement) and sum with wrapping unsigned adds. The sum
decodes correctly if and only if the true integer sum fits in the signed range; a wrapped sum
decodes to garbage that looks like a valid update. :func:`plan_fixed_point` therefore chooses ``f``
from bounds the training code enforces, never from observed data.

Proof that a plan from :func:`plan_fixed_point` cannot overflow
----------------------------------------------------------------

Notation: ``n`` silos, clip norm ``C``, coefficients ``0 <= a_i <= a_max``, word size ``bits``,
``f`` fractional bits, ``B = n * a_max * C``.

1. Clipping. Each silo clips the delta of every unit to L2 norm at most ``C``:
   ``D <- D * min(1, C / ||D||_2)``. For every coordinate ``j``,
   ``|D_j| = sqrt(D_j^2) <= sqrt(sum_k D_k^2) = ||D||_2 <= C``.
2. Coefficients. Silo ``i`` contributes ``a_i * D_ij`` (it applies its own aggregation weight,
   because the aggregator only ever sees the masked sum). With ``0 <= a_i <= a_max``,
   ``|a_i * D_ij| <= a_max * C``.
3. Floating-point slack. Steps 1 and 2 run in floating point, so a coordinate can exceed
   ``a_max * C`` by a few ulps. In float32 or wider each op errs by at most ``2**-24`` relative, and
   the computed norm is never below ``|D_j|`` by more than a few ulps (a float sum of non-negative
   squares is monotone), so ``(1 + 2**-24)**k`` stays below ``1 + SLACK = 1 + 2**-6`` for any
   ``k < 2**18`` ops. We budget ``B' = B * (1 + SLACK)``; the cost is under 0.03 bits of headroom.
4. Sum of values. By the triangle inequality,
   ``|sum_i a_i D_ij| <= sum_i |a_i D_ij| <= n * a_max * C * (1 + SLACK) = B'``.
5. Sum of encodings. Silo ``i`` sends ``q_ij = round(a_i D_ij 2^f)`` with
   ``|q_ij - a_i D_ij 2^f| <= 1/2``. Hence ``|sum_i q_ij| <= sum_i (|a_i D_ij| 2^f + 1/2)
   <= B' 2^f + n/2``.
6. No overflow. The plan requires ``B' 2^f + n/2 < 2^(bits-1)``. Then the integer ``sum_i q_ij``
   lies in ``(-2^(bits-1), 2^(bits-1))``. The aggregator obtains exactly ``sum_i q_ij mod 2^bits``
   (wrapping adds; masks cancel mod ``2^bits``), and two's-complement decoding is a bijection from
   residues onto ``[-2^(bits-1), 2^(bits-1))``, so :meth:`FixedPoint.decode` returns the true
   integer sum divided by ``2^f``. Each single ``q_ij`` obeys the same bound (one term of the sum),
   so no silo's :meth:`FixedPoint.encode` refuses a clipped value either.
7. Rounding error. By step 5, ``|decode(sum_i q_ij) - sum_i a_i D_ij| <= n * 2^-(f+1)`` (plus the
   float64 conversion in :meth:`FixedPoint.decode`, at most ``2**-53`` relative). The plan takes
   the smallest ``f >= 8`` with ``n * 2^-(f+1) <= error``, capped at the largest ``f`` that
   satisfies step 6; the bits above are headroom. If even ``f = 8`` violates step 6 there is no
   safe plan and :class:`FixedPointError` is raised (below 8 fractional bits the resolution is too
   coarse for model deltas to be worth aggregating).

The check in step 6 runs in exact rational arithmetic (:class:`fractions.Fraction`), so the float
rounding of the check itself cannot void the proof.

What the proof assumes: every silo really clips and really uses ``a_i <= a_max``. Encoding refuses
a single out-of-range value, but cannot see other silos; a silo that skips clipping can make the
sum wrap. Masking hides inputs, it does not validate them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from fcmoe.errors import FcMoeError

WORD_BITS = (32, 64)
MIN_FRAC_BITS = 8
SLACK = Fraction(1, 64)  # relative budget for float rounding in clipping and weighting (step 3)

_UINT = {32: np.dtype(np.uint32), 64: np.dtype(np.uint64)}
_INT = {32: np.dtype(np.int32), 64: np.dtype(np.int64)}


class FixedPointError(FcMoeError):
    """A value cannot be encoded without loss of range, or no overflow-free plan exists."""


def _largest_float_at_most(value: int) -> float:
    """Largest float64 that is <= ``value``: ``float(2**63 - 1)`` rounds UP to ``2**63``."""
    out = float(value)
    if int(out) > value:
        out = math.nextafter(out, 0.0)
    return out


@dataclass(frozen=True)
class FixedPoint:
    """Signed fixed point with ``frac_bits`` fractional bits in a ``bits``-bit unsigned word."""

    bits: int
    frac_bits: int

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in WORD_BITS:
            raise FixedPointError(f"fixed-point bits must be one of {WORD_BITS}, got {self.bits!r}")
        if (isinstance(self.frac_bits, bool) or not isinstance(self.frac_bits, int)
                or not 0 <= self.frac_bits < self.bits):
            raise FixedPointError(f"frac_bits must be an int in [0, {self.bits}), got {self.frac_bits!r}")

    @property
    def modulus(self) -> int:
        """``2**bits``: the ring that encodings, masks and sums live in."""
        return 1 << self.bits

    @property
    def dtype(self) -> np.dtype:
        """Unsigned numpy dtype of encodings; its overflow is the wrap mod ``2**bits``."""
        return _UINT[self.bits]

    @property
    def _max_scaled(self) -> float:
        """Largest float64 ``|round(x * 2**f)|`` that is a valid signed value (``<= 2**(bits-1) - 1``)."""
        return _largest_float_at_most((1 << (self.bits - 1)) - 1)

    @property
    def max_abs(self) -> float:
        """Largest ``|x|`` (a float64) that :meth:`encode` accepts: its encoding fits the signed range."""
        return math.ldexp(self._max_scaled, -self.frac_bits)

    def sum_error_bound(self, num_terms: int) -> float:
        """Worst-case rounding error per coordinate of a sum of ``num_terms`` encodings (step 7)."""
        return math.ldexp(float(num_terms), -(self.frac_bits + 1))

    def encode(self, x: np.ndarray) -> np.ndarray:
        """``round(x * 2**frac_bits) mod 2**bits`` per element; same shape, dtype ``self.dtype``.

        Refuses (never clips) non-finite or out-of-range values: a clipped value would be a silent
        bias in the aggregate, and a wrapped one would flip sign.
        """
        values = np.asarray(x, dtype=np.float64)
        if values.size == 0:
            return np.zeros(values.shape, dtype=self.dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = np.rint(np.ldexp(values, self.frac_bits))
            ok = np.abs(scaled) <= self._max_scaled  # False for nan and inf too
        if not ok.all():
            largest = float(np.max(np.abs(values)))
            raise FixedPointError(
                f"cannot encode: largest |x| is {largest:.6g}, limit is {self.max_abs:.6g} "
                f"(bits={self.bits}, frac_bits={self.frac_bits})")
        return scaled.astype(_INT[self.bits]).view(self.dtype)

    def decode(self, v: np.ndarray) -> np.ndarray:
        """Two's-complement signed value of each word divided by ``2**frac_bits``, as float64.

        Exact for ``|value| <= 2**53`` in grid units; beyond that the float64 conversion rounds to
        nearest (relative error at most ``2**-53``).
        """
        words = np.asarray(v)
        if words.dtype != self.dtype:
            raise FixedPointError(f"cannot decode dtype {words.dtype}: expected {self.dtype} for bits={self.bits}")
        signed = words.view(_INT[self.bits])
        return np.ldexp(signed.astype(np.float64), -self.frac_bits)


def _positive_finite(name: str, value: float) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise FixedPointError(f"{name} must be a positive finite number, got {value!r}")
    return Fraction(value)


def plan_fixed_point(num_silos: int, clip_norm: float, max_coefficient: float, bits: int = 64,
                     error: float = 1e-6) -> FixedPoint:
    """Fixed point for summing ``num_silos`` clipped, weighted deltas without overflow.

    Picks the smallest ``frac_bits >= 8`` whose sum rounding error ``n * 2**-(f+1)`` is at most
    ``error``; if overflow safety caps ``frac_bits`` below that, returns the finest safe plan (check
    ``plan.sum_error_bound(num_silos)`` against your tolerance). See the module docstring for the proof.
    """
    if isinstance(num_silos, bool) or not isinstance(num_silos, int) or num_silos < 1:
        raise FixedPointError(f"num_silos must be a positive int, got {num_silos!r}")
    if isinstance(bits, bool) or bits not in WORD_BITS:
        raise FixedPointError(f"fixed-point bits must be one of {WORD_BITS}, got {bits!r}")
    clip = _positive_finite("clip_norm", clip_norm)
    coefficient = _positive_finite("max_coefficient", max_coefficient)
    target = _positive_finite("error", error)

    bound = num_silos * coefficient * clip * (1 + SLACK)  # B' of step 3
    half_units = Fraction(num_silos, 2)  # rounding of step 5
    signed_limit = 1 << (bits - 1)

    def overflow_safe(frac_bits: int) -> bool:
        return bound * (1 << frac_bits) + half_units < signed_limit

    safe = [f for f in range(MIN_FRAC_BITS, bits) if overflow_safe(f)]
    if not safe:
        raise FixedPointError(
            f"no overflow-free fixed point: {num_silos} silos x max_coefficient {max_coefficient:g} x "
            f"clip_norm {clip_norm:g} does not fit {bits} bits with frac_bits >= {MIN_FRAC_BITS}")
    finest = max(safe)
    frac_bits = MIN_FRAC_BITS
    while frac_bits < finest and Fraction(num_silos, 1 << (frac_bits + 1)) > target:
        frac_bits += 1
    return FixedPoint(bits=bits, frac_bits=frac_bits)
