"""One silo's side of a masked round (secure aggregation, ``mode: masking``; docs/protocol.md).

On top of :class:`~silo_agent.secure_session.SecureSession` (keys, adverts, the run secret):
SHARE: the silo draws a self-mask seed and Shamir-shares it and its mask key among the reporters,
each peer's pair sealed under the pairwise channel key.
UPLOAD: opens the shares its peers sent it, then sends ``fixed_point(alpha * delta) + masks`` per
unit, where the pairwise masks run only among the members of the unit's group.
UNMASK: for every peer reveals the self-seed share (peer survived) or the mask-key share (peer
dropped out), never both, and only when every group keeps at least the silo's own minimum size.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from crypto import masking, shamir
from crypto.fixed_point import FixedPoint, FixedPointError
from crypto.key_agreement import ChannelError, open_sealed, seal
from crypto.secagg import SecAggError, mask_label, mask_seed, pack_shares, share_aad, share_x, unpack_shares
from crypto.shamir import Share, ShamirError
from fcmoe.timing import timed
from protos import fcmoe_pb2 as pb
from silo_agent.secure_session import SecureSession


class MaskingSession(SecureSession):
    """Shares, masks and reveals of one silo for one attempt of one round."""

    def __init__(self, run_id: str, session: int, silo: str, pki_dir, min_group_size: int,
                 run_secret: bytes | None = None):
        super().__init__(run_id, session, silo, pki_dir, min_group_size, run_secret)
        self._threshold = 0
        self._self_seed = b""
        self._received: dict[str, tuple[Share, Share]] = {}  # owner -> (self-seed share, mask-key share)
        self._revealed = False

    # -- SHARE ---------------------------------------------------------------------------------
    @timed
    def make_shares(self, instructions: pb.ShareInstructions) -> tuple[list[pb.SealedShare], list[pb.SealedShare]]:
        """Verify every peer's advert, then seal shares of this silo's secrets for each peer; the
        dealer also seals the run secret for the listed recipients. Returns (shares, secrets)."""
        n, t = len(instructions.adverts), instructions.threshold
        if not (t >= 2 and 2 * t > n and t <= n):
            raise SecAggError(f"threshold t={t} for n={n} silos: need a majority, 2 <= t <= n")
        secrets = self.accept_peers(instructions)
        self._threshold = t
        self._self_seed = os.urandom(masking.SEED_BYTES)
        seed_shares = shamir.split(self._self_seed, n, t)
        key_shares = shamir.split(self._keys.mask_private_bytes(), n, t)
        out = []
        for peer in self._reporters:
            x = share_x(list(self._reporters), peer)
            packed = pack_shares(seed_shares[x - 1], key_shares[x - 1])
            if peer == self.silo:
                self._received[peer] = (seed_shares[x - 1], key_shares[x - 1])
                continue
            ciphertext = seal(self._channel_key(peer), packed, share_aad(self.run_id, self.session, self.silo, peer))
            out.append(pb.SealedShare(sender=self.silo, recipient=peer, ciphertext=ciphertext))
        return out, secrets

    # -- UPLOAD --------------------------------------------------------------------------------
    @timed
    def masked_payload(self, instructions: pb.UploadInstructions, deltas: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``encode(alpha * delta) + self mask + pairwise masks`` per unit, as uint words."""
        units = self.accept_upload_plan(instructions, self._threshold)
        peers, groups = self._peers, self._groups
        self._open_shares(instructions.shares, peers)
        try:
            fixed = FixedPoint(instructions.fixed_point_bits, instructions.fixed_point_frac_bits)
        except FixedPointError as exc:
            raise SecAggError(f"upload instructions: {exc}") from None
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
        self.check_group_sizes(self._groups, survivors)
        self._revealed = True
        out = [pb.RevealedShare(owner=o, mask_key=False, share=self._received[o][0].to_bytes()) for o in sorted(survivors)]
        out += [pb.RevealedShare(owner=o, mask_key=True, share=self._received[o][1].to_bytes()) for o in sorted(dropped)]
        return out
