"""What silos and the aggregator must agree on in a masked round (Bonawitz et al. 2017).

Both roles import this module, neither imports the other: session numbers, mask labels, the
threshold rule, which Shamir share x belongs to which silo, how a sender's shares are packed
and sealed for one recipient, the pairwise mask seed (computed by the two silos of a pair, or by
the aggregator once ``t`` survivors revealed the mask key of a silo that dropped out), the round
view every silo signs before it reveals anything (the consistency check of the malicious model), and
the weight policy each silo checks on every masked sum.

A masked round has up to two **stages**, each a masked sum followed by an unmask: ``sketch`` (FC-MoE's
importance-weighted keyed sketches, whose sums drive the consensus) and ``update`` (the weighted
deltas). Each stage has its own self-mask seed and its own X25519 mask key pair, so what is revealed
to unmask one stage (a survivor's seed, a dropped silo's mask key) says nothing about the other's
masks: a silo that survives the sketch stage and then drops out of the update stage is never exposed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

import numpy as np

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
from fcmoe.config import masking_threshold

SHARE_TAG = "fcmoe/shares/v1"
RUN_SECRET_TAG = "fcmoe/run-secret/v1"
VIEW_TAG = "fcmoe/round-view/v1"
CHECK_TAG = "fcmoe/consistency/v1"
RUN_SECRET_BYTES = 32
STAGES = ("sketch", "update")  # the masked sums of a round, in order; each has its own self seed
PACKED_SHARES_BYTES = 2 * len(STAGES) * shamir.SHARE_BYTES  # per stage: self-seed share, mask-key share


class SecAggError(KeyAgreementError):
    """A masked round cannot go on safely (bad peer set, group too small, share that does not open)."""


def threshold_for(num_silos: int, fraction: float) -> int:
    """The masking threshold (:func:`fcmoe.config.masking_threshold`) of a round of ``num_silos``."""
    if num_silos < 2:
        raise SecAggError(f"masking needs at least 2 silos, got {num_silos}")
    return masking_threshold(num_silos, fraction)


def mask_label(run_id: str, session: int, unit: str, group: int, stage: str = "update") -> str:
    """Every vector a silo masks gets its own keystream: run, attempt, stage, unit and group are bound in."""
    return f"{run_id}|{session}|{stage}|{unit}|{group}"


def share_x(peers: Sequence[str], silo: str) -> int:
    """The Shamir x of ``silo``: its 1-based position among the silos that exchange shares (sorted)."""
    return sorted(peers).index(silo) + 1


def share_aad(run_id: str, session: int, sender: str, recipient: str, tag: str = SHARE_TAG) -> bytes:
    """Associated data of a sealed message: it cannot be moved to another pair, attempt, run or purpose."""
    return encode_fields(tag, [run_id.encode(), session.to_bytes(8, "big"), sender.encode(), recipient.encode()])


def advert_of(message: Any, run_id: str) -> KeyAdvert:
    """The :class:`KeyAdvert` carried by a wire message (a ``KeyAdvert`` protobuf) of ``run_id``."""
    return KeyAdvert(run_id, message.session, message.silo, bytes(message.mask_public),
                     bytes(message.channel_public), bytes(message.signature), bytes(message.secret_digest),
                     bytes(message.sketch_mask_public))


def stage_mask_public(advert: KeyAdvert | Any, stage: str) -> bytes:
    """The X25519 public key of a silo's pairwise masks in ``stage``."""
    return bytes(advert.sketch_mask_public if stage == "sketch" else advert.mask_public)


# -- the run secret: what the silos share and the aggregator must not know --------------------------
# One silo (the dealer) draws it; the others receive it sealed under their pairwise channel keys
# (:func:`share_aad` with RUN_SECRET_TAG). Keys for silo-only purposes are derived from it.


def run_secret_digest(run_id: str, secret: bytes) -> bytes:
    """What a silo advertises about the run secret it holds: equal digests, equal secrets."""
    return hashlib.sha256(encode_fields(RUN_SECRET_TAG, [run_id.encode(), secret])).digest()


def sketch_key(secret: bytes) -> bytes:
    """The keyed-sketch secret (crypto/sketch.py) of a run, from its run secret."""
    return keystream.derive_key(secret, "fcmoe/run-secret/sketch/v1")


StageShares = dict[str, tuple[Share, Share]]  # stage -> (self-seed share, mask-key share)


def pack_shares(shares: StageShares) -> bytes:
    """Per stage (in :data:`STAGES` order) the self-seed share, then the mask-key share; one x for all."""
    flat = [share for stage in STAGES for share in shares[stage]]
    if len({s.x for s in flat}) != 1:
        raise SecAggError("the shares for one recipient must all have the same x")
    return b"".join(s.to_bytes() for s in flat)


def unpack_shares(data: bytes) -> StageShares:
    if len(data) != PACKED_SHARES_BYTES:
        raise SecAggError(f"packed shares must be {PACKED_SHARES_BYTES} bytes, got {len(data)}")
    size = shamir.SHARE_BYTES
    flat = [Share.from_bytes(data[i * size:(i + 1) * size]) for i in range(2 * len(STAGES))]
    if len({s.x for s in flat}) != 1:
        raise SecAggError("packed shares disagree on x")
    return {stage: (flat[2 * i], flat[2 * i + 1]) for i, stage in enumerate(STAGES)}


# -- the round view and the consistency check (malicious aggregator) --------------------------------
# Before it masks, a silo is shown the view of the stage: who takes part, every peer's group and
# coefficient per unit, the fixed point. Before it reveals any share it signs the digest of that view
# plus the survivor list it is shown, and requires ``t`` such signatures from distinct peers over the
# very same bytes: an aggregator that shows different silos different groups, coefficients or
# dropout stories cannot collect ``t`` matching signatures, so nothing is unmasked.


@dataclass(frozen=True)
class RoundView:
    """What one stage of one masked round is, as every silo must see it."""

    run_id: str
    session: int
    stage: str
    peers: tuple[str, ...]
    units: tuple[str, ...]
    groups: tuple[int, ...]  # group of peers[p] for units[u] at [u * len(peers) + p]
    coefficients: tuple[float, ...]  # same layout as groups
    fixed_point_bits: int
    fixed_point_frac_bits: int
    sketch_buckets: int = 0

    def digest(self) -> bytes:
        parts = [self.run_id.encode(), self.session.to_bytes(8, "big"), self.stage.encode(),
                 "\0".join(self.peers).encode(), "\0".join(self.units).encode(),
                 np.asarray(self.groups, dtype="<u4").tobytes(), np.asarray(self.coefficients, dtype="<f8").tobytes(),
                 bytes([self.fixed_point_bits, self.fixed_point_frac_bits]), self.sketch_buckets.to_bytes(4, "big")]
        return hashlib.sha256(encode_fields(VIEW_TAG, parts)).digest()

    def table(self, values: Sequence) -> dict[str, dict[str, Any]]:
        """unit -> peer -> value, from a flat [u * len(peers) + p] list (:func:`cells` writes them)."""
        n = len(self.peers)
        return {u: dict(zip(self.peers, values[i * n:(i + 1) * n])) for i, u in enumerate(self.units)}


def cells(by_silo: Mapping[str, Mapping[str, Any]], peers: Sequence[str], units: Sequence[str]) -> tuple:
    """A plan's silo -> unit -> value (a group, a coefficient) as the flat [u * len(peers) + p] list the
    view is signed over and the wire carries (:meth:`RoundView.table` reads it back)."""
    return tuple(by_silo[p][u] for u in units for p in peers)


def check_bytes(view_digest: bytes, survivors: Sequence[str], dropped: Sequence[str]) -> bytes:
    """What a survivor signs in the consistency check: the view it masked under and who survived."""
    return encode_fields(CHECK_TAG, [view_digest, "\0".join(sorted(survivors)).encode(),
                                     "\0".join(sorted(dropped)).encode()])


def weight_policy_violation(view: RoundView, present: set[str] | frozenset[str], min_group_size: int,
                            min_weight_ratio: float) -> str | None:
    """Why a masked sum of ``view`` over the ``present`` peers could expose one silo, or None.

    Every (unit, group) must hold at least ``min_group_size`` present peers, and no present member
    may weigh less than ``min_weight_ratio`` of the group's largest coefficient: a sum in which the
    others weigh (almost) nothing is one silo's vector. Negative or non-finite coefficients never pass."""
    groups, coefficients = view.table(view.groups), view.table(view.coefficients)
    for unit in view.units:
        members: dict[int, list[float]] = {}
        for peer in view.peers:
            if peer in present:
                members.setdefault(groups[unit][peer], []).append(coefficients[unit][peer])
        for group, alphas in sorted(members.items()):
            if len(alphas) < min_group_size:
                return f"unit {unit} group {group} would sum only {len(alphas)} silos (minimum {min_group_size})"
            if not all(math.isfinite(a) and a >= 0 for a in alphas):
                return f"unit {unit} group {group} has a negative or non-finite coefficient"
            largest = max(alphas)
            if min(alphas) < min_weight_ratio * largest * (1 - 1e-9):
                return (f"unit {unit} group {group}: a member weighs {min(alphas) / largest:.3g} of the largest "
                        f"coefficient, under the minimum ratio {min_weight_ratio}")
    return None


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
