"""What silos and the aggregator must agree on in a masked round (Bonawitz et al. 2017).

Both roles import this module, neither imports the other: session numbers, mask labels, the
threshold rule, which Shamir share x belongs to which silo, how a sender's two shares are packed
and sealed for one recipient, and the pairwise mask seed (computed by the two silos of a pair, or by
the aggregator once ``t`` survivors revealed the mask key of a silo that dropped out).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from crypto import keystream, shamir
from crypto.key_agreement import (
    ChannelError,
    KeyAdvert,
    KeyAgreementError,
    encode_fields,
    open_sealed,
    pairwise_secret,
    seal,
)
from crypto.shamir import Share

SHARE_TAG = "fcmoe/shares/v1"
RUN_SECRET_TAG = "fcmoe/run-secret/v1"
RUN_SECRET_BYTES = 32
PACKED_SHARES_BYTES = 2 * shamir.SHARE_BYTES  # self-seed share, then mask-key share


class SecAggError(KeyAgreementError):
    """A masked round cannot go on safely (bad peer set, group too small, share that does not open)."""


def threshold_for(num_silos: int, fraction: float) -> int:
    """``t = max(2, ceil(fraction * n))``, at most ``n``: fewer than ``t`` silos learn nothing of a
    dropped silo's keys, and up to ``n - t`` silos may drop out after sending their shares."""
    if num_silos < 2:
        raise SecAggError(f"masking needs at least 2 silos, got {num_silos}")
    return min(num_silos, max(2, math.ceil(fraction * num_silos - 1e-9)))


def mask_label(run_id: str, session: int, unit: str, group: int) -> str:
    """Every vector a silo masks gets its own keystream: run, attempt, unit and group are bound in."""
    return f"{run_id}|{session}|{unit}|{group}"


def share_x(peers: Sequence[str], silo: str) -> int:
    """The Shamir x of ``silo``: its 1-based position among the silos that exchange shares (sorted)."""
    return sorted(peers).index(silo) + 1


def share_aad(run_id: str, session: int, sender: str, recipient: str, tag: str = SHARE_TAG) -> bytes:
    """Associated data of a sealed message: it cannot be moved to another pair, attempt, run or purpose."""
    return encode_fields(tag, [run_id.encode(), session.to_bytes(8, "big"), sender.encode(), recipient.encode()])


def advert_of(message: Any, run_id: str) -> KeyAdvert:
    """The :class:`KeyAdvert` carried by a wire message (a ``KeyAdvert`` protobuf) of ``run_id``."""
    return KeyAdvert(run_id, message.session, message.silo, bytes(message.mask_public),
                     bytes(message.channel_public), bytes(message.signature), bytes(message.secret_digest))


# -- the run secret: what the silos share and the aggregator must not know --------------------------
# One silo (the dealer) draws it; the others receive it sealed under their pairwise channel keys
# (:func:`share_aad` with RUN_SECRET_TAG). Keys for silo-only purposes are derived from it.


def run_secret_digest(run_id: str, secret: bytes) -> bytes:
    """What a silo advertises about the run secret it holds: equal digests, equal secrets."""
    return hashlib.sha256(encode_fields(RUN_SECRET_TAG, [run_id.encode(), secret])).digest()


def sketch_key(secret: bytes) -> bytes:
    """The keyed-sketch secret (crypto/sketch.py) of a run, from its run secret."""
    return keystream.derive_key(secret, "fcmoe/run-secret/sketch/v1")


def pack_shares(seed_share: Share, key_share: Share) -> bytes:
    if seed_share.x != key_share.x:
        raise SecAggError("the two shares for one recipient must have the same x")
    return seed_share.to_bytes() + key_share.to_bytes()


def unpack_shares(data: bytes) -> tuple[Share, Share]:
    if len(data) != PACKED_SHARES_BYTES:
        raise SecAggError(f"packed shares must be {PACKED_SHARES_BYTES} bytes, got {len(data)}")
    seed, key = Share.from_bytes(data[: shamir.SHARE_BYTES]), Share.from_bytes(data[shamir.SHARE_BYTES:])
    if seed.x != key.x:
        raise SecAggError("packed shares disagree on x")
    return seed, key


def mask_seed(private_raw: bytes, peer_public: bytes, run_id: str, session: int, me: str, peer: str) -> bytes:
    """The pairwise mask seed of ``me`` and ``peer`` from ``me``'s raw X25519 mask key."""
    try:
        private = X25519PrivateKey.from_private_bytes(private_raw)
    except ValueError:
        raise SecAggError(f"mask key of {me!r} is not a 32-byte X25519 key") from None
    return pairwise_secret(private, peer_public, run_id, session, me, peer, "mask")


def _run_secret_aead_key(secret: bytes, purpose: str) -> bytes:
    return keystream.derive_key(secret, f"fcmoe/run-secret/{purpose}/v1")


def seal_with_run_secret(secret: bytes, run_id: str, purpose: str, data: bytes) -> bytes:
    """Large silo-only data (e.g. the CKKS key) encrypted once under the run secret, so the
    aggregator can store and relay it to whoever is dealt the run secret, without reading it."""
    return seal(_run_secret_aead_key(secret, purpose), data, encode_fields(RUN_SECRET_TAG, [run_id.encode(),
                                                                                          purpose.encode()]))


def open_with_run_secret(secret: bytes, run_id: str, purpose: str, blob: bytes) -> bytes:
    try:
        return open_sealed(_run_secret_aead_key(secret, purpose), blob,
                           encode_fields(RUN_SECRET_TAG, [run_id.encode(), purpose.encode()]))
    except ChannelError as exc:
        raise SecAggError(f"{purpose} sealed under the run secret does not open: {exc}") from None


# -- mode ckks: names of the tensors that carry ciphertexts and decrypted sums ----------------------
def ciphertext_name(unit: str, chunk: int) -> str:
    """One ciphertext chunk of a unit's update (uploads)."""
    return f"{unit}#{chunk}"


def sum_name(unit: str, group: int) -> str:
    """A decrypted (unit, group) sum (the key holder's answer)."""
    return f"{unit}/{group}"


def sum_chunk_name(unit: str, group: int, chunk: int) -> str:
    """One ciphertext chunk of an encrypted (unit, group) sum (sent to the key holder)."""
    return ciphertext_name(sum_name(unit, group), chunk)
