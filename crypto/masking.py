"""Pairwise and self masks of Bonawitz et al. 2017 ("Practical Secure Aggregation"), masking only.

Silo ``u`` sends ``y_u = x_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv) mod 2**bits``
where ``x_u`` is its fixed-point encoding (:mod:`crypto.fixed_point`), ``b_u`` its self seed and
``s_uv = s_vu`` the seed it shares with peer ``v`` (peers ordered by string id). In a sum over
survivors every pairwise mask between two survivors appears once with ``+`` and once with ``-``
and cancels; what is left is the survivors' self masks and the masks survivors added for peers that
dropped out, both of which the aggregator removes after reconstructing the seeds (Shamir, in
:mod:`crypto.shamir`; key agreement in :mod:`crypto.key_agreement`).

Why each PRG output hides ``x_u``: the masks are uniform in ``Z/2**bits`` to anyone without the
seed, so ``y_u`` alone is uniform and independent of ``x_u`` (a one-time pad over the ring). The PRG
is an AES-256-CTR keystream under a key derived by HKDF-SHA256 from the seed and a label; never
numpy.random, whose state is recoverable from its outputs and whose seeds are 32 or 64 bits.

Why ``label`` matters: reusing a mask across two vectors leaks their difference
(``y - y' = x - x'``). The label binds run, round, unit and group, so every vector a silo ever
sends is padded by a fresh keystream; the CTR nonce can stay zero because every (seed, label)
yields its own key.

This module is pure arithmetic: no network, no I/O, no knowledge of who may see which seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from crypto import keystream
from fcmoe.errors import FcMoeError

SEED_BYTES = 32
WORD_BITS = (32, 64)
_UINT = {32: np.dtype(np.uint32), 64: np.dtype(np.uint64)}


class MaskingError(FcMoeError):
    """Bad mask seed, label, word size or seed bookkeeping."""


def _check_seed(seed: bytes, what: str) -> None:
    if not isinstance(seed, (bytes, bytearray)):
        raise MaskingError(f"{what} must be bytes, got {type(seed).__name__}")
    if len(seed) < SEED_BYTES:
        raise MaskingError(f"{what} must be at least {SEED_BYTES} bytes, got {len(seed)}")


def _check_label(label: str) -> None:
    if not isinstance(label, str) or not label:
        raise MaskingError("mask label must be a non-empty str binding run, round, unit and group")


def _bits_of(words: np.ndarray, what: str) -> int:
    for bits, dtype in _UINT.items():
        if words.dtype == dtype:
            return bits
    raise MaskingError(f"{what} must have dtype uint32 or uint64, got {words.dtype}")


def _mask_key(seed: bytes, label: str) -> bytes:
    """HKDF-SHA256 of the seed, domain-separated by version and label: one key per (seed, label)."""
    _check_seed(seed, "mask seed")
    _check_label(label)
    return keystream.derive_key(seed, f"fcmoe/mask/v1|{label}")


def _keystream_blocks(seed: bytes, label: str, length: int, bits: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, words)`` blocks of the PRG output."""
    return keystream.word_blocks(_mask_key(seed, label), length, bits)


def _add_prg(out: np.ndarray, seed: bytes, label: str, sign: int) -> None:
    """``out += sign * PRG(seed, label)`` in place, mod ``2**bits``, one block at a time."""
    bits = _bits_of(out, "masked vector")
    for start, words in _keystream_blocks(seed, label, out.size, bits):
        view = out[start : start + words.size]
        if sign > 0:
            np.add(view, words, out=view)
        else:
            np.subtract(view, words, out=view)


def prg(seed: bytes, label: str, length: int, bits: int) -> np.ndarray:
    """``length`` uniform words (uint32 or uint64) from AES-256-CTR under HKDF(seed, label).

    Deterministic in (seed, label), so both holders of a pairwise seed derive the same mask; a
    prefix of a longer output equals a shorter output, so the block size never shows in results.
    """
    if bits not in WORD_BITS:
        raise MaskingError(f"mask bits must be one of {WORD_BITS}, got {bits!r}")
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise MaskingError(f"mask length must be a non-negative int, got {length!r}")
    out = np.zeros(int(length), dtype=_UINT[bits])
    _add_prg(out, seed, label, +1)
    return out


def _pair_sign(owner: str, peer: str) -> int:
    """+1 if ``owner`` adds the pair's mask, -1 if it subtracts it (the peer does the opposite)."""
    if not isinstance(owner, str) or not isinstance(peer, str):
        raise MaskingError(f"silo ids must be str, got {owner!r} and {peer!r}")
    if owner == peer:
        raise MaskingError(f"silo {owner!r} cannot share a pairwise seed with itself")
    return 1 if peer > owner else -1


def mask(encoded: np.ndarray, silo: str, self_seed: bytes, pair_seeds: Mapping[str, bytes],
         label: str) -> np.ndarray:
    """``x + PRG(self_seed) + sum_{peer > silo} PRG(s) - sum_{peer < silo} PRG(s) mod 2**bits``.

    ``encoded`` is a fixed-point encoding (uint32 or uint64, any shape; the word size fixes
    ``bits``). ``pair_seeds`` maps each peer id to the seed this silo shares with it. Returns a new
    array of the same shape and dtype; the input is not modified.
    """
    words = np.asarray(encoded)
    _bits_of(words, "encoded vector")
    _check_seed(self_seed, f"self seed of {silo!r}")
    _check_label(label)
    signs = {peer: _pair_sign(silo, peer) for peer in pair_seeds}
    for peer, seed in pair_seeds.items():
        _check_seed(seed, f"pair seed ({silo!r}, {peer!r})")
    out = words.reshape(-1).copy()
    _add_prg(out, self_seed, label, +1)
    for peer in sorted(pair_seeds):
        _add_prg(out, pair_seeds[peer], label, signs[peer])
    return out.reshape(words.shape)


def unmask_sum(masked_sum: np.ndarray, label: str, survivor_self_seeds: Mapping[str, bytes],
               dropped_pair_seeds: Mapping[tuple[str, str], bytes]) -> np.ndarray:
    """Exact sum mod ``2**bits`` of the survivors' encodings, from the wrapping sum of their masked vectors.

    ``survivor_self_seeds`` holds the self seed of every silo whose masked vector is in
    ``masked_sum``, and nothing else. ``dropped_pair_seeds[(survivor, dropped)]`` is the seed the
    survivor shared with a silo whose masked vector never arrived; the mask the survivor added for
    it (sign by the same ordering rule as :func:`mask`) is removed. Masks between two survivors
    cancel in the sum and need no seed. A missing (survivor, dropped) seed leaves a uniform mask in
    the result, so the caller must pass every such pair of its mask graph.

    Why the aggregator must never hold both a silo's self seed and its pairwise seeds: with
    ``b_u`` it strips ``PRG(b_u)`` from ``y_u``, with every ``s_uv`` it strips the pairwise masks,
    and ``x_u`` is left in the clear. Bonawitz et al. therefore have each honest silo reveal, per
    peer, either the share of its self seed (peer survived) or the share of its mask key (peer
    dropped), never both; and a vector that arrives after its sender was declared dropped must be
    discarded, since its pairwise seeds are by then reconstructible. The self mask is what keeps a
    late vector hidden in that case. The protocol layer enforces this; this function trusts its
    arguments.
    """
    words = np.asarray(masked_sum)
    _bits_of(words, "masked sum")
    _check_label(label)
    for silo, seed in survivor_self_seeds.items():
        _check_seed(seed, f"self seed of {silo!r}")
    for pair, seed in dropped_pair_seeds.items():
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise MaskingError(f"dropped pair key must be a (survivor, dropped) tuple, got {pair!r}")
        survivor, dropped = pair
        if survivor not in survivor_self_seeds:
            raise MaskingError(f"pair ({survivor!r}, {dropped!r}): {survivor!r} is not a survivor")
        if dropped in survivor_self_seeds:
            raise MaskingError(f"pair ({survivor!r}, {dropped!r}): {dropped!r} survived, its pair masks cancel")
        _pair_sign(survivor, dropped)
        _check_seed(seed, f"pair seed ({survivor!r}, {dropped!r})")
    out = words.reshape(-1).copy()
    for silo in sorted(survivor_self_seeds):
        _add_prg(out, survivor_self_seeds[silo], label, -1)
    for survivor, dropped in sorted(dropped_pair_seeds):
        # the survivor added sign * PRG(s); undo it
        _add_prg(out, dropped_pair_seeds[(survivor, dropped)], label, -_pair_sign(survivor, dropped))
    return out.reshape(words.shape)
