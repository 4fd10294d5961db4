"""What silos and the aggregator must agree on in a masked round (Bonawitz et al. 2017).

Both roles import this module, neither imports the other: session numbers, mask labels, the
threshold rule, which Shamir share x belongs to which silo, how a sender's two shares are packed
and sealed for one recipient, and the pairwise mask seed (computed by the two silos of a pair, or by
the aggregator once ``t`` survivors revealed the mask key of a silo that dropped out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from crypto import shamir
from crypto.key_agreement import KeyAgreementError, encode_fields, pairwise_secret
from crypto.shamir import Share

SHARE_TAG = "fcmoe/shares/v1"
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


def share_aad(run_id: str, session: int, sender: str, recipient: str) -> bytes:
    """Associated data of a sealed share: a share cannot be moved to another pair, round or run."""
    return encode_fields(SHARE_TAG, [run_id.encode(), session.to_bytes(8, "big"), sender.encode(),
                                     recipient.encode()])


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
