"""Keyed count-sketch: inner products of deltas survive, coordinates do not.

``y[b] = sum_{j : h(j) = b} s(j) * x[j]`` with bucket ``h(j)`` and sign ``s(j)`` read from an
AES-256-CTR keystream whose key is derived (HKDF-SHA256) from a secret the silos share and the
aggregator does not have, bound to the run, round and unit. So ``<y_a, y_b>`` is an unbiased estimate
of ``<x_a, x_b>`` (Charikar et al. 2002), while the aggregator, not knowing ``h`` and ``s``, cannot map a
bucket back to coordinates; a fresh key per round and unit stops it from correlating across rounds.

Why not numpy.random: a non-cryptographic generator seeded from the key is predictable from its
outputs; the keystream is not.
"""

from __future__ import annotations

import numpy as np

from crypto import keystream
from crypto.keystream import KEY_BYTES
from fcmoe.errors import FcMoeError


class SketchError(FcMoeError):
    """Bad sketch parameters or key."""


def derive_key(secret: bytes, run_id: str, round_: int, unit: str) -> bytes:
    if len(secret) < KEY_BYTES:
        raise SketchError(f"sketch secret must be at least {KEY_BYTES} bytes, got {len(secret)}")
    return keystream.derive_key(secret, f"fcmoe/sketch/v1|{run_id}|{round_}|{unit}")


def count_sketch(vector: np.ndarray, key: bytes, buckets: int) -> np.ndarray:
    """Count-sketch of a 1-D float vector into ``buckets`` (a power of two) float32 values."""
    if buckets < 1 or buckets & (buckets - 1):
        raise SketchError(f"buckets={buckets} must be a power of two")
    if len(key) != KEY_BYTES:
        raise SketchError(f"sketch key must be {KEY_BYTES} bytes")
    x = np.asarray(vector, dtype=np.float32).reshape(-1)
    out = np.zeros(buckets, dtype=np.float64)
    for start, words in keystream.word_blocks(key, x.size, 32):
        block = x[start : start + words.size]
        signed = np.where(words >> 31, -block, block)
        out += np.bincount(words & (buckets - 1), weights=signed, minlength=buckets)
    return out.astype(np.float32)


def sketch_units(units: dict[str, np.ndarray], secret: bytes, run_id: str, round_: int,
                 buckets: int) -> dict[str, np.ndarray]:
    """One sketch per unit, each under its own (run, round, unit) key."""
    return {u: count_sketch(v, derive_key(secret, run_id, round_, u), buckets) for u, v in units.items()}


def agreement(own: np.ndarray, others: np.ndarray) -> tuple[float, float]:
    """Cosine of ``own`` with the consensus of the others, and the magnitude-weighted share of
    ``own``'s buckets whose sign matches it (0.5 when ``own`` is zero)."""
    y, loo = np.asarray(own, dtype=np.float64), np.asarray(others, dtype=np.float64)
    norms = float(np.linalg.norm(y) * np.linalg.norm(loo))
    cos = float(y @ loo) / norms if norms > 0 else 0.0
    mag = np.abs(y)
    total = float(mag.sum())
    match = (np.sign(y) == np.sign(loo)) & (loo != 0)
    sign = float((mag * match).sum()) / total if total > 0 else 0.5
    return cos, sign


def agreement_score(cos: float | np.ndarray, sign: float | np.ndarray) -> float | np.ndarray:
    """``z = (cos + (2 sign - 1)) / 2``, in [-1, 1]."""
    return (np.asarray(cos) + 2.0 * np.asarray(sign) - 1.0) / 2.0


AGREEMENT_STEP = 2.0 ** -16  # agreement scores travel rounded to this: bounded, fixed-point scalars


def own_agreement(own_weighted: np.ndarray, weighted_sum: np.ndarray) -> float:
    """A silo's agreement score for one unit, from its own contribution ``w_i y_i`` to the unmasked sum
    ``C = sum_j w_j y_j``: its direction against the others' ``C - w_i y_i`` (the leave-one-out
    consensus), rounded to :data:`AGREEMENT_STEP`. Computed by the silo; only the scalar leaves it."""
    own = np.asarray(own_weighted, dtype=np.float64)
    cos, sign = agreement(own, np.asarray(weighted_sum, dtype=np.float64) - own)
    z = float(np.clip(agreement_score(cos, sign), -1.0, 1.0))
    return round(z / AGREEMENT_STEP) * AGREEMENT_STEP
