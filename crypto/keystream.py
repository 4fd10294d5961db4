"""The one cryptographic pseudo-random generator: HKDF-SHA256 key derivation and AES-256-CTR words.

Keyed sketches and secure-aggregation masks both need long streams of uniform words that only the
key holders can reproduce. A key is derived per purpose and label (run, round, unit, ...), so a stream
is never reused; the stream is AES-256-CTR over zeros with a zero nonce, safe because every key is
used for exactly one stream. Streams are produced in blocks to bound memory for any length.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
BLOCK_WORDS = 1 << 20
_NONCE = bytes(16)
_WORDS = {32: np.dtype("<u4"), 64: np.dtype("<u8")}


def derive_key(secret: bytes, info: str) -> bytes:
    """A 32-byte key bound to ``info`` (callers put a versioned purpose tag first)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info.encode()).derive(bytes(secret))


def word_blocks(key: bytes, length: int, bits: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, words)``: ``length`` uniform little-endian words of ``bits`` (32 or 64), in blocks."""
    dtype = _WORDS[bits]
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_NONCE)).encryptor()
    zeros = bytes(dtype.itemsize * min(length, BLOCK_WORDS))
    for start in range(0, length, BLOCK_WORDS):
        count = min(BLOCK_WORDS, length - start)
        yield start, np.frombuffer(encryptor.update(zeros[: dtype.itemsize * count]), dtype=dtype)
