"""crypto/masking.py: Bonawitz-style masks cancel exactly, dropouts unmask exactly, masked words carry
nothing of the input."""

from __future__ import annotations

import itertools
import secrets

import numpy as np
import pytest

from crypto.fixed_point import FixedPoint, plan_fixed_point
from crypto.masking import MaskingError, mask, prg, unmask_sum

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
