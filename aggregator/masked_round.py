"""The aggregator's side of a masked round (``mode: masking``; docs/protocol.md): relay, sum, unmask.

What it holds for one attempt: signed adverts (public keys), sealed shares it cannot open, running
sums mod ``2**bits`` of masked vectors per (unit, group), and, once ``t`` survivors revealed their
shares, the self seed of every survivor and the mask key of every silo that dropped out — never both
for one silo: each silo reveals one or the other per peer, and a masked vector arriving after its
sender was declared dropped is refused (the upload phase is closed by then). So what it can compute
is the group sums, and the group sums only; it never holds one silo's update, masked or not, on its
own (:meth:`MaskedRound.add` adds into the sums and keeps nothing else).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator.accumulate import Coefficients, GroupSum, UnitSums, clip_bound
from aggregator.secure_round import SecureRound, bad_input
from crypto import shamir
from crypto.fixed_point import FixedPoint, FixedPointError, plan_fixed_point
from crypto.key_agreement import NONCE_BYTES, TAG_BYTES, AdvertError
from crypto.masking import MaskingError, unmask_sum
from crypto.secagg import PACKED_SHARES_BYTES, SecAggError, mask_label, mask_seed, share_x, threshold_for
from crypto.shamir import Share, ShamirError
from fcmoe.config import SecureAggregationConfig
from fcmoe.errors import ProtocolError
from fcmoe.timing import timed
from protos import fcmoe_pb2 as pb
from protos.codec import TensorSpec

SEALED_SHARE_BYTES = NONCE_BYTES + PACKED_SHARES_BYTES + TAG_BYTES


class MaskedRound(SecureRound):
    """One attempt of one masked round, driven by the coordinator phase by phase."""

    def __init__(self, run_id: str, session: int, unit_sizes: Mapping[str, int], settings: SecureAggregationConfig,
                 min_group_size: int, ca_pem: bytes):
        super().__init__(run_id, session, unit_sizes, settings, min_group_size, ca_pem)
        self.threshold = 0
        self._inbox: dict[str, dict[str, pb.SealedShare]] = {}  # sender -> recipient -> sealed share
        self.fixed: FixedPoint | None = None
        self._clip = 0.0
        self._sums: dict[tuple[str, int], np.ndarray] = {}
        self._revealed: dict[str, list[pb.RevealedShare]] = {}

    # -- SHARING -------------------------------------------------------------------------------
    def open_sharing(self, reporters: set[str], force_dealer: bool = False) -> None:
        super().open_sharing(reporters, force_dealer)
        self.threshold = threshold_for(len(self.reporters), self.settings.threshold)

    def share_instructions(self) -> pb.ShareInstructions:
        instructions = super().share_instructions()
        instructions.threshold = self.threshold
        return instructions

    @timed
    def add_shares(self, silo: str, submission: pb.ShareSubmission) -> None:
        expected = set(self.reporters) - {silo}
        recipients = [s.recipient for s in submission.shares]
        if sorted(recipients) != sorted(expected):
            raise bad_input(f"shares must go to each other reporter exactly once ({len(expected)} expected)")
        for s in submission.shares:
            if s.sender != silo or len(s.ciphertext) != SEALED_SHARE_BYTES:
                raise bad_input(f"sealed share for {s.recipient!r}: wrong sender or {len(s.ciphertext)} bytes "
                                f"(expected {SEALED_SHARE_BYTES})")
        self.add_dealt_secrets(silo, submission)
        self._inbox[silo] = {s.recipient: s for s in submission.shares}

    # -- UPLOADING -----------------------------------------------------------------------------
    def open_upload(self, sharers: set[str], plan: Coefficients, clip_norm: float, minimum: int = 0) -> None:
        """U2 = the silos whose shares arrived; plan groups and the overflow-free fixed point for them."""
        self.plan_groups(sharers, plan, max(self.threshold, minimum))
        largest = max((abs(a) for alpha in self.plan.alpha.values() for a in alpha.values()), default=0.0)
        try:
            self.fixed = plan_fixed_point(len(self.peers), clip_norm, largest or 1.0, self.settings.fixed_point_bits)
        except FixedPointError as exc:
            raise ProtocolError(f"cannot plan the fixed-point encoding: {exc} "
                                "(federation.secure_aggregation.fixed_point_bits: 64 widens the range)") from None
        self._clip = clip_norm

    def upload_instructions(self, silo: str) -> pb.UploadInstructions:
        assert self.fixed is not None
        instructions = super().upload_instructions(silo)
        instructions.fixed_point_bits = self.fixed.bits
        instructions.fixed_point_frac_bits = self.fixed.frac_bits
        instructions.shares.extend(self._inbox[p][silo] for p in self.peers if p != silo)
        return instructions

    def update_specs(self) -> dict[str, TensorSpec]:
        bits = self.settings.fixed_point_bits
        return {u: TensorSpec(f"uint{bits}", (n,)) for u, n in self.unit_sizes.items()}

    @timed
    def add(self, silo: str, payload: Mapping[str, np.ndarray]) -> None:
        """Masked words go into the (unit, group) sums, mod ``2**bits``, and nowhere else."""
        assert self.plan is not None and self.fixed is not None
        self.check_member(silo)
        if set(payload) != set(self.unit_sizes) or any(v.dtype != self.fixed.dtype for v in payload.values()):
            raise bad_input(f"silo {silo!r}: masked payload units or dtype do not match")
        for unit, words in payload.items():
            key = (unit, self.plan.group[silo][unit])
            if key not in self._sums:
                self._sums[key] = np.zeros(self.unit_sizes[unit], dtype=self.fixed.dtype)
            np.add(self._sums[key], words, out=self._sums[key])  # wraps mod 2**bits
        self._members.add(silo)

    # -- UNMASKING -----------------------------------------------------------------------------
    def unmask_instructions(self) -> pb.UnmaskInstructions:
        """Survivors and dropouts; refused (nothing revealed) when a group would be too small."""
        survivors = self.members
        if len(survivors) < self.threshold:
            raise ProtocolError(f"{len(survivors)} survivors, threshold {self.threshold}")
        self.check_group_sizes()
        return pb.UnmaskInstructions(survivors=sorted(survivors),
                                     dropped=sorted(set(self.peers) - survivors))

    @timed
    def add_reveal(self, silo: str, submission: pb.UnmaskSubmission) -> None:
        survivors = self.members
        owners = [r.owner for r in submission.shares]
        if sorted(owners) != self.peers:
            raise bad_input("revealed shares must cover every peer of the round exactly once")
        x = share_x(self.reporters, silo)
        for r in submission.shares:
            if r.mask_key == (r.owner in survivors):
                raise bad_input(f"share of {r.owner!r}: a survivor's self seed or a dropped silo's mask key, never the other")
            try:
                share = Share.from_bytes(r.share)
            except ShamirError as exc:
                raise bad_input(f"share of {r.owner!r}: {exc}") from None
            if share.x != x:
                raise bad_input(f"share of {r.owner!r} has x={share.x}, {silo!r} holds x={x}")
        self._revealed[silo] = list(submission.shares)

    def _secret(self, owner: str) -> bytes:
        """Rebuild one secret; with more than t shares, two different t-subsets must agree."""
        shares = [Share.from_bytes(r.share) for got in self._revealed.values() for r in got if r.owner == owner]
        t = self.threshold
        secret = shamir.combine(shares, t)
        if len(shares) > t and shamir.combine(shares[-t:], t) != secret:
            raise ProtocolError(f"revealed shares of {owner!r} are inconsistent")
        return secret

    @timed
    def result(self) -> UnitSums:
        """Unmasked, decoded group sums; ProtocolError if anything does not add up."""
        assert self.plan is not None and self.fixed is not None
        survivors = self.members
        dropped = sorted(set(self.peers) - survivors)
        try:
            seeds = {s: self._secret(s) for s in sorted(survivors)}
            keys = {d: self._secret(d) for d in dropped}
            pair: dict[tuple[str, str], bytes] = {}
            out: dict[str, dict[int, GroupSum]] = {u: {} for u in self.unit_sizes}
            everyone = self.group_members(set(self.peers))
            for (unit, group), words in self._sums.items():
                members = everyone[(unit, group)]
                alive = [s for s in members if s in survivors]
                gone = [d for d in members if d not in survivors]
                for s in alive:
                    for d in gone:
                        if (s, d) not in pair:
                            pair[(s, d)] = mask_seed(keys[d], self._adverts[s].mask_public, self.run_id,
                                                     self.session, d, s)
                plain = unmask_sum(words, mask_label(self.run_id, self.session, unit, group),
                                   {s: seeds[s] for s in alive}, {(s, d): pair[(s, d)] for s in alive for d in gone})
                vector = self.fixed.decode(plain)
                weight = float(sum(self.plan.alpha[s][unit] for s in alive))
                bound = sum(clip_bound(self.plan.alpha[s][unit], self._clip) for s in alive)
                bound += self.fixed.sum_error_bound(len(alive)) * np.sqrt(vector.size)
                if float(np.linalg.norm(vector)) > bound:
                    raise ProtocolError(f"unit {unit} group {group}: unmasked sum exceeds its clip bound "
                                        "(a wrong share or payload)")
                out[unit][group] = GroupSum(vector.astype(np.float32), weight, len(alive))
        except (ShamirError, SecAggError, MaskingError, AdvertError) as exc:
            raise ProtocolError(f"unmasking failed: {exc}") from None
        return out
