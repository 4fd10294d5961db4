"""Fixed-point encoding and Bonawitz-style masking: exact cancellation, dropouts, no leakage."""

from __future__ import annotations

import itertools
import math
import secrets

import numpy as np
import pytest

from crypto.fixed_point import FixedPoint, FixedPointError, plan_fixed_point
from crypto.masking import MaskingError, mask, prg, unmask_sum
from fcmoe.errors import FcMoeError

LABEL = "run-7|round-3|unit-layers.0.experts.5|group-0"


def silo_ids(n: int) -> list[str]:
    return [f"silo{i:02d}" for i in range(n)]


def make_seeds(silos: list[str]) -> tuple[dict[str, bytes], dict[frozenset[str], bytes]]:
    """One self seed per silo and one seed per unordered pair, as key agreement would produce."""
    self_seeds = {s: secrets.token_bytes(32) for s in silos}
    pair = {frozenset(p): secrets.token_bytes(32) for p in itertools.combinations(silos, 2)}
    return self_seeds, pair


def pair_seeds_of(silo: str, silos: list[str], pair: dict[frozenset[str], bytes]) -> dict[str, bytes]:
    return {peer: pair[frozenset((silo, peer))] for peer in silos if peer != silo}


def wrapping_sum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for v in vectors:
        total += v  # numpy unsigned arrays wrap mod 2**bits
    return total


# --- fixed point -----------------------------------------------------------------------------


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


# --- masking ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(2, 11))
def test_all_survive_masks_cancel_exactly(n: int) -> None:
    rng = np.random.default_rng(n)
    silos = silo_ids(n)
    xs = {s: rng.normal(scale=0.1, size=1_000) for s in silos}
    fp = plan_fixed_point(n, max(np.linalg.norm(x) for x in xs.values()), 1.0)
    self_seeds, pair = make_seeds(silos)
    encoded = {s: fp.encode(xs[s]) for s in silos}
    masked = [mask(encoded[s], s, self_seeds[s], pair_seeds_of(s, silos, pair), LABEL) for s in silos]
    unmasked = unmask_sum(wrapping_sum(masked), LABEL, self_seeds, {})
    assert np.array_equal(unmasked, wrapping_sum(list(encoded.values())))
    float_sum = np.sum(list(xs.values()), axis=0)
    assert np.max(np.abs(fp.decode(unmasked) - float_sum)) <= fp.sum_error_bound(n)


@pytest.mark.parametrize("n", range(3, 11))
def test_dropouts_after_masking_are_unmasked_exactly(n: int) -> None:
    rng = np.random.default_rng(100 + n)
    silos = silo_ids(n)
    fp = FixedPoint(64, 24)
    self_seeds, pair = make_seeds(silos)
    encoded = {s: fp.encode(rng.normal(size=257)) for s in silos}
    masked = {s: mask(encoded[s], s, self_seeds[s], pair_seeds_of(s, silos, pair), LABEL) for s in silos}
    for k in range(1, n - 1):
        dropped = set(rng.choice(silos, size=k, replace=False).tolist())
        survivors = [s for s in silos if s not in dropped]
        arrived = wrapping_sum([masked[s] for s in survivors])
        result = unmask_sum(
            arrived, LABEL,
            {s: self_seeds[s] for s in survivors},
            {(s, d): pair[frozenset((s, d))] for s in survivors for d in dropped},
        )
        assert np.array_equal(result, wrapping_sum([encoded[s] for s in survivors]))


@pytest.mark.parametrize("bits", [32, 64])
def test_masked_vector_uncorrelated_with_input(bits: int) -> None:
    rng = np.random.default_rng(3)
    fp = FixedPoint(bits, 16)
    x = rng.normal(size=1_000_000)
    peers = {"silo0": secrets.token_bytes(32), "silo9": secrets.token_bytes(32)}
    y = mask(fp.encode(x), "silo5", secrets.token_bytes(32), peers, LABEL)
    assert abs(np.corrcoef(fp.decode(y), x)[0, 1]) < 0.01


def test_mask_depends_on_label_only_deterministically() -> None:
    zeros = np.zeros(1_000, dtype=np.uint64)
    self_seed, peer_seed = secrets.token_bytes(32), secrets.token_bytes(32)
    a = mask(zeros, "silo1", self_seed, {"silo2": peer_seed}, LABEL)
    b = mask(zeros, "silo1", self_seed, {"silo2": peer_seed}, LABEL)
    c = mask(zeros, "silo1", self_seed, {"silo2": peer_seed}, LABEL.replace("round-3", "round-4"))
    assert np.array_equal(a, b)
    assert np.count_nonzero(a == c) < 5
    assert np.array_equal(zeros, np.zeros(1_000, dtype=np.uint64))  # input untouched


def test_pair_masks_have_opposite_signs() -> None:
    seed = secrets.token_bytes(32)
    zeros = np.zeros(64, dtype=np.uint32)
    low = mask(zeros, "a", bytes(32), {"b": seed}, LABEL)
    high = mask(zeros, "b", bytes(32), {"a": seed}, LABEL)
    own = prg(bytes(32), LABEL, 64, 32)
    assert np.array_equal(low - own, prg(seed, LABEL, 64, 32))
    assert np.array_equal((low - own) + (high - own), zeros)


def test_prg_streams_in_blocks_consistently() -> None:
    seed = secrets.token_bytes(32)
    long = prg(seed, LABEL, (1 << 20) + 3, 32)
    assert np.array_equal(long[:1000], prg(seed, LABEL, 1000, 32))
    assert np.array_equal(long[(1 << 20) - 2 :], prg(seed, LABEL, (1 << 20) + 3, 32)[(1 << 20) - 2 :])
    assert prg(seed, LABEL, 10, 64).dtype == np.uint64
    assert prg(seed, LABEL, 0, 64).shape == (0,)


def test_short_seeds_refused() -> None:
    short = secrets.token_bytes(31)
    ok = secrets.token_bytes(32)
    zeros = np.zeros(8, dtype=np.uint64)
    with pytest.raises(MaskingError, match="at least 32 bytes"):
        prg(short, LABEL, 8, 64)
    with pytest.raises(MaskingError):
        mask(zeros, "a", short, {}, LABEL)
    with pytest.raises(MaskingError):
        mask(zeros, "a", ok, {"b": short}, LABEL)
    with pytest.raises(MaskingError):
        unmask_sum(zeros, LABEL, {"a": ok}, {("a", "b"): short})


def test_bad_masking_inputs_refused() -> None:
    seed = secrets.token_bytes(32)
    with pytest.raises(MaskingError):
        mask(np.zeros(4, dtype=np.int64), "a", seed, {}, LABEL)
    with pytest.raises(MaskingError):
        mask(np.zeros(4, dtype=np.uint64), "a", seed, {"a": seed}, LABEL)
    with pytest.raises(MaskingError):
        mask(np.zeros(4, dtype=np.uint64), "a", seed, {}, "")
    with pytest.raises(MaskingError):
        prg(seed, LABEL, 4, 16)
    with pytest.raises(MaskingError, match="survived"):
        unmask_sum(np.zeros(4, dtype=np.uint64), LABEL, {"a": seed, "b": seed}, {("a", "b"): seed})
    with pytest.raises(MaskingError, match="not a survivor"):
        unmask_sum(np.zeros(4, dtype=np.uint64), LABEL, {"a": seed}, {("c", "b"): seed})
