"""One silo's side of a masked round (secure aggregation, ``mode: masking``; docs/protocol.md).

TRAIN: fresh X25519 keys for this attempt, advertised signed with the silo's certificate key.
SHARE: every peer's advert is checked against the silo's *own* CA (the aggregator relays them and is
not trusted with them); the silo draws a self-mask seed and Shamir-shares it and its mask key among
the reporters, each peer's pair sealed under the pairwise channel key.
UPLOAD: opens the shares its peers sent it, then sends ``fixed_point(alpha * delta) + masks`` per
unit, where the pairwise masks run only among the members of the unit's group.
The run secret (whose derived keys, e.g. the sketch key, the silos share and the aggregator must not
know) rides along: the dealer named in the SHARE task seals it for every reporter that lacks it, and
they open it with their shares at UPLOAD.
UNMASK: for every peer reveals the self-seed share (peer survived) or the mask-key share (peer
dropped out), never both, and only when every group keeps at least the silo's own minimum size.

Any check that fails raises :class:`SecAggError`; the agent then refuses the round (it goes on
without this silo) instead of sending something that could expose its update.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from crypto import masking, shamir
from crypto.fixed_point import FixedPoint, FixedPointError
from crypto.key_agreement import (
    AdvertError,
    ChannelError,
    KeyAdvert,
    RoundKeys,
    open_sealed,
    pairwise_secret,
    seal,
    verify_advert,
)
from crypto.pki import PkiPaths, read_pem
from crypto.secagg import (
    RUN_SECRET_BYTES,
    RUN_SECRET_TAG,
    SecAggError,
    advert_of,
    mask_label,
    mask_seed,
    pack_shares,
    run_secret_digest,
    share_aad,
    share_x,
    unpack_shares,
)
from crypto.shamir import Share, ShamirError
from fcmoe.timing import timed
from protos import fcmoe_pb2 as pb


class MaskingSession:
    """Keys, shares and masks of one silo for one attempt of one round."""

    def __init__(self, run_id: str, session: int, silo: str, pki_dir, min_group_size: int,
                 run_secret: bytes | None = None):
        paths = PkiPaths(pki_dir)
        self.run_id, self.session, self.silo = run_id, session, silo
        self.min_group_size = min_group_size
        self._ca = read_pem(paths.ca_cert)
        self._cert = read_pem(paths.silo_cert(silo))
        self._identity_key = read_pem(paths.silo_key(silo))
        self._keys = RoundKeys(run_id, session, silo)
        self.run_secret = run_secret  # the run secret this silo holds (dealt or drawn), if any
        self._dealer = ""
        self._reporters: dict[str, KeyAdvert] = {}
        self._threshold = 0
        self._self_seed = b""
        self._received: dict[str, tuple[Share, Share]] = {}  # owner -> (self-seed share, mask-key share)
        self._peers: list[str] = []  # U2: who masks with whom
        self._groups: dict[str, dict[str, int]] = {}  # unit -> peer -> group
        self.seconds = 0.0  # in secure-aggregation work this attempt (fcmoe.timing.timed)
        self._revealed = False

    @timed
    def advert(self) -> pb.KeyAdvert:
        digest = run_secret_digest(self.run_id, self.run_secret) if self.run_secret else b""
        signed = self._keys.advert(self._identity_key, digest)
        return pb.KeyAdvert(silo=self.silo, session=self.session, mask_public=signed.mask_public,
                            channel_public=signed.channel_public, signature=signed.signature,
                            certificate_pem=self._cert, secret_digest=digest)

    # -- SHARE ---------------------------------------------------------------------------------
    @timed
    def make_shares(self, instructions: pb.ShareInstructions) -> tuple[list[pb.SealedShare], list[pb.SealedShare]]:
        """Verify every peer's advert, then seal shares of this silo's secrets for each peer; the
        dealer also seals the run secret for the listed recipients. Returns (shares, secrets)."""
        if self._reporters:
            raise SecAggError("shares for this attempt were already made")
        names = [a.silo for a in instructions.adverts]
        if names != sorted(set(names)):
            raise SecAggError("adverts must be sorted by silo with no silo twice")
        reporters: dict[str, KeyAdvert] = {}
        for message in instructions.adverts:
            advert = advert_of(message, self.run_id)
            if advert.silo == self.silo:
                if (advert.mask_public, advert.channel_public) != (self._keys.mask_public, self._keys.channel_public):
                    raise SecAggError("the relayed advert of this silo is not the one it sent")
            else:
                try:
                    verify_advert(advert, bytes(message.certificate_pem), self._ca, self.run_id, self.session)
                except AdvertError as exc:
                    raise SecAggError(f"refusing the round: {exc}") from None
            reporters[advert.silo] = advert
        if self.silo not in reporters:
            raise SecAggError("this silo's advert is missing from the share instructions")
        n, t = len(reporters), instructions.threshold
        if not (t >= 2 and 2 * t > n and t <= n):
            raise SecAggError(f"threshold t={t} for n={n} silos: need a majority, 2 <= t <= n")
        if instructions.min_group_size < self.min_group_size:
            raise SecAggError(f"min_group_size {instructions.min_group_size} is below this silo's "
                              f"{self.min_group_size}")
        self._reporters, self._threshold = reporters, t
        self._self_seed = os.urandom(masking.SEED_BYTES)
        seed_shares = shamir.split(self._self_seed, n, t)
        key_shares = shamir.split(self._keys.mask_private_bytes(), n, t)
        out = []
        for peer, advert in reporters.items():
            x = share_x(list(reporters), peer)
            packed = pack_shares(seed_shares[x - 1], key_shares[x - 1])
            if peer == self.silo:
                self._received[peer] = (seed_shares[x - 1], key_shares[x - 1])
                continue
            ciphertext = seal(self._channel_key(peer), packed, share_aad(self.run_id, self.session, self.silo, peer))
            out.append(pb.SealedShare(sender=self.silo, recipient=peer, ciphertext=ciphertext))
        return out, self._deal(instructions)

    def _deal(self, instructions: pb.ShareInstructions) -> list[pb.SealedShare]:
        self._dealer = instructions.dealer
        if instructions.dealer not in ("", *self._reporters):
            raise SecAggError(f"dealer {instructions.dealer!r} is not a reporter")
        if instructions.dealer != self.silo:
            return []
        recipients = list(instructions.secret_recipients)
        if not set(recipients) <= set(self._reporters) - {self.silo} or len(set(recipients)) != len(recipients):
            raise SecAggError("run-secret recipients must be other reporters, each once")
        if self.run_secret is None:
            self.run_secret = os.urandom(RUN_SECRET_BYTES)
        return [pb.SealedShare(sender=self.silo, recipient=r, ciphertext=seal(
            self._channel_key(r), self.run_secret, share_aad(self.run_id, self.session, self.silo, r, RUN_SECRET_TAG)))
            for r in recipients]

    def _channel_key(self, peer: str) -> bytes:
        return pairwise_secret(self._keys.channel_private, self._reporters[peer].channel_public,
                               self.run_id, self.session, self.silo, peer, "channel")

    # -- UPLOAD --------------------------------------------------------------------------------
    @timed
    def masked_payload(self, instructions: pb.UploadInstructions, deltas: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``encode(alpha * delta) + self mask + pairwise masks`` per unit, as uint words."""
        if not self._reporters:
            raise SecAggError("upload before shares were made")
        units, peers = list(instructions.units), list(instructions.peers)
        if peers != sorted(set(peers)) or not set(peers) <= set(self._reporters) or self.silo not in peers:
            raise SecAggError("upload peers must be sorted reporters that include this silo")
        if len(peers) < self._threshold:
            raise SecAggError(f"{len(peers)} peers sent shares, threshold is {self._threshold}")
        if len(instructions.groups) != len(units) * len(peers) or len(instructions.coefficients) != len(units):
            raise SecAggError("upload instructions: group matrix or coefficients have the wrong size")
        self._open_shares(instructions.shares, peers)
        if instructions.HasField("run_secret"):
            self._open_run_secret(instructions.run_secret)
        groups = {u: dict(zip(peers, instructions.groups[i * len(peers):(i + 1) * len(peers)]))
                  for i, u in enumerate(units)}
        self._check_group_sizes(groups, set(peers))
        try:
            fixed = FixedPoint(instructions.fixed_point_bits, instructions.fixed_point_frac_bits)
        except FixedPointError as exc:
            raise SecAggError(f"upload instructions: {exc}") from None
        self._peers, self._groups = peers, groups
        pair_seeds: dict[str, bytes] = {}
        out = {}
        for unit, alpha in zip(units, instructions.coefficients):
            mine = groups[unit][self.silo]
            members = [p for p in peers if p != self.silo and groups[unit][p] == mine]
            for peer in members:
                if peer not in pair_seeds:
                    pair_seeds[peer] = mask_seed(self._keys.mask_private_bytes(), self._reporters[peer].mask_public,
                                                 self.run_id, self.session, self.silo, peer)
            try:
                encoded = fixed.encode(np.float64(alpha) * deltas[unit].astype(np.float64))
            except FixedPointError as exc:
                raise SecAggError(f"unit {unit}: {exc}") from None
            out[unit] = masking.mask(encoded, self.silo, self._self_seed, {p: pair_seeds[p] for p in members},
                                     mask_label(self.run_id, self.session, unit, mine))
        return out

    def _open_shares(self, sealed: Sequence[pb.SealedShare], peers: list[str]) -> None:
        expected = set(peers) - {self.silo}
        got = [s.sender for s in sealed]
        if sorted(got) != sorted(expected) or any(s.recipient != self.silo for s in sealed):
            raise SecAggError("upload instructions must carry exactly one sealed share from every other peer")
        my_x = share_x(list(self._reporters), self.silo)
        for s in sealed:
            try:
                seed_share, key_share = unpack_shares(open_sealed(self._channel_key(s.sender), bytes(s.ciphertext),
                                                                  share_aad(self.run_id, self.session, s.sender, self.silo)))
            except (ChannelError, ShamirError) as exc:
                raise SecAggError(f"share from {s.sender!r} does not open: {exc}") from None
            if seed_share.x != my_x:
                raise SecAggError(f"share from {s.sender!r} is for x={seed_share.x}, this silo is x={my_x}")
            self._received[s.sender] = (seed_share, key_share)

    def _open_run_secret(self, sealed: pb.SealedShare) -> None:
        if not self._dealer or sealed.sender != self._dealer or sealed.recipient != self.silo:
            raise SecAggError(f"run secret from {sealed.sender!r}, but the dealer is {self._dealer!r}")
        try:
            secret = open_sealed(self._channel_key(sealed.sender), bytes(sealed.ciphertext),
                                 share_aad(self.run_id, self.session, sealed.sender, self.silo, RUN_SECRET_TAG))
        except ChannelError as exc:
            raise SecAggError(f"run secret from {sealed.sender!r} does not open: {exc}") from None
        if len(secret) != RUN_SECRET_BYTES:
            raise SecAggError(f"run secret is {len(secret)} bytes, expected {RUN_SECRET_BYTES}")
        self.run_secret = secret

    def _check_group_sizes(self, groups: Mapping[str, Mapping[str, int]], present: set[str]) -> None:
        """Every (unit, group) among ``present`` keeps at least this silo's own minimum size."""
        for unit, by_peer in groups.items():
            sizes: dict[int, int] = {}
            for peer, group in by_peer.items():
                if peer in present:
                    sizes[group] = sizes.get(group, 0) + 1
            small = {g: c for g, c in sizes.items() if c < self.min_group_size}
            if small:
                group, count = next(iter(small.items()))
                raise SecAggError(f"unit {unit} group {group} would sum only {count} silos "
                                  f"(this silo's minimum is {self.min_group_size})")

    # -- UNMASK --------------------------------------------------------------------------------
    @timed
    def reveal(self, instructions: pb.UnmaskInstructions) -> list[pb.RevealedShare]:
        """Self-seed shares of survivors and mask-key shares of dropped peers; once per attempt."""
        if self._revealed:
            raise SecAggError("shares for this attempt were already revealed")
        if not self._peers:
            raise SecAggError("unmask before this silo uploaded")
        survivors, dropped = set(instructions.survivors), set(instructions.dropped)
        if survivors & dropped or survivors | dropped != set(self._peers) or self.silo not in survivors:
            raise SecAggError("survivors and dropped must split this round's peers, this silo among the survivors")
        if len(survivors) < self._threshold:
            raise SecAggError(f"{len(survivors)} survivors, threshold is {self._threshold}")
        self._check_group_sizes(self._groups, survivors)
        self._revealed = True
        out = [pb.RevealedShare(owner=o, mask_key=False, share=self._received[o][0].to_bytes()) for o in sorted(survivors)]
        out += [pb.RevealedShare(owner=o, mask_key=True, share=self._received[o][1].to_bytes()) for o in sorted(dropped)]
        return out
