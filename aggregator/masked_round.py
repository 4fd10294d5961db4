"""The aggregator's side of a masked round (``mode: masking``; docs/protocol.md): relay, sum, check, unmask.

A round has one or two **stages** (crypto/secagg.py ``STAGES``): ``sketch`` (FC-MoE: the
importance-weighted keyed sketches, whose sums drive the consensus) and ``update`` (the weighted
deltas). Each stage is a masked sum: silos upload ``fixed_point(coefficient * vector) + masks``, the
aggregator adds them into per-(unit, group) sums mod ``2**bits``, every survivor signs the stage's view
and survivor list (the consistency check), and once ``t`` signatures over the same bytes are relayed
back, the survivors reveal the shares that remove the masks.

What it holds: signed adverts (public keys), sealed shares it cannot open, running sums, and, per stage,
once ``t`` survivors revealed their shares, that stage's self seed of every survivor and the mask key of
every silo that dropped out — never both for one silo: each silo reveals one or the other per peer, a
silo dropped in the sketch stage is out of the update stage, and a masked vector arriving after its
sender was declared dropped is refused (the phase is closed by then). So what it can compute is the
group sums, and the group sums only (:meth:`MaskedRound.add` adds into the sums and keeps nothing else).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator.accumulate import Coefficients, GroupSum, UnitSums, clip_bound
from aggregator.round_mode import Next, check_units
from aggregator.rounds import Phase
from aggregator.secure_round import SecureRound, bad_input
from crypto import shamir
from crypto.fixed_point import FixedPoint, FixedPointError, plan_fixed_point
from crypto.key_agreement import NONCE_BYTES, TAG_BYTES, AdvertError, SignatureError, verify_silo_signature
from crypto.masking import MaskingError, unmask_sum
from crypto.secagg import (PACKED_SHARES_BYTES, STAGES, RoundView, SecAggError, cells, check_bytes, mask_label,
                           mask_seed, share_x, stage_mask_public, threshold_for)
from crypto.shamir import Share, ShamirError
from fcmoe.config import SecureAggregationConfig
from fcmoe.errors import ProtocolError
from fcmoe.timing import timed
from protos import fcmoe_pb2 as pb
from protos.codec import TensorSpec

SEALED_SHARE_BYTES = NONCE_BYTES + PACKED_SHARES_BYTES + TAG_BYTES


class MaskedRound(SecureRound):
    """One attempt of one masked round, driven by the coordinator phase by phase."""

    mode = "masking"

    def __init__(self, run_id: str, session: int, unit_sizes: Mapping[str, int], settings: SecureAggregationConfig,
                 min_group_size: int, ca_pem: bytes):
        super().__init__(run_id, session, unit_sizes, settings, min_group_size, ca_pem)
        self.threshold = 0
        self._inbox: dict[str, dict[str, pb.SealedShare]] = {}  # sender -> recipient -> sealed share
        self.stage = ""
        self.view: RoundView | None = None
        self.fixed: FixedPoint | None = None
        self._sizes: dict[str, int] = {}  # floats per unit in this stage
        self._clip = 0.0
        self._sums: dict[tuple[str, int], np.ndarray] = {}
        self._signatures: dict[str, pb.ViewSignature] = {}
        self._check: bytes = b""  # what survivors sign in this stage's consistency check
        self._revealed: dict[str, list[pb.RevealedShare]] = {}
        self._first_stage = ""  # sealed shares travel with the first stage's instructions only
        self.out_of_round: set[str] = set()  # silos whose mask keys were revealed: never again this attempt

    # -- SHARING -------------------------------------------------------------------------------
    def open_sharing(self, reporters: set[str], force_dealer: bool = False) -> None:
        super().open_sharing(reporters, force_dealer)
        self.threshold = threshold_for(len(self.reporters), self.settings.threshold)

    def start_sharing(self, reporters: set[str], quorum: int) -> int:
        self.open_sharing(reporters)
        return self.threshold  # who may drop out after sharing is the threshold's business, not the quorum's

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

    # -- a stage: SKETCHING or UPLOADING ----------------------------------------------------------
    def open_stage(self, stage: str, silos: set[str], plan: Coefficients, clip_norm: float, minimum: int = 0,
                   sketch_buckets: int = 0) -> None:
        """Plan groups among ``silos`` and the overflow-free fixed point; fresh sums for ``stage``."""
        if stage not in STAGES or (self.stage and STAGES.index(stage) <= STAGES.index(self.stage)):
            raise ProtocolError(f"stage {stage!r} cannot follow {self.stage or 'sharing'!r}")
        if silos & self.out_of_round:
            raise ProtocolError(f"{sorted(silos & self.out_of_round)} dropped out of this attempt earlier")
        self.plan_groups(silos, plan, max(self.threshold, minimum))
        assert self.plan is not None
        largest = max((abs(a) for alpha in self.plan.alpha.values() for a in alpha.values()), default=0.0)
        try:
            self.fixed = plan_fixed_point(len(self.peers), clip_norm, largest or 1.0, self.settings.fixed_point_bits)
        except FixedPointError as exc:
            raise ProtocolError(f"cannot plan the fixed-point encoding: {exc} "
                                "(federation.secure_aggregation.fixed_point_bits: 64 widens the range)") from None
        self.stage, self._clip = stage, clip_norm
        self._first_stage = self._first_stage or stage
        self._sizes = {u: sketch_buckets for u in self.unit_sizes} if stage == "sketch" else dict(self.unit_sizes)
        self._sums, self._members, self._signatures, self._revealed, self._check = {}, set(), {}, {}, b""
        units = list(self.unit_sizes)
        self.view = RoundView(self.run_id, self.session, stage, tuple(self.peers), tuple(units),
                              cells(self.plan.group, self.peers, units), cells(self.plan.alpha, self.peers, units),
                              self.fixed.bits, self.fixed.frac_bits, sketch_buckets if stage == "sketch" else 0)

    def open_upload(self, sharers: set[str], plan: Coefficients, clip_norm: float, minimum: int = 0) -> None:
        self.open_stage("update", sharers, plan, clip_norm, minimum)

    def start_stage(self, stage: str, silos: set[str], plan: Coefficients, clip_norm: float, quorum: int,
                    sketch_buckets: int = 0) -> tuple[set[str], int]:
        self.open_stage(stage, silos, plan, clip_norm, quorum, sketch_buckets)
        return set(self.peers), max(self.threshold, quorum)

    def upload_instructions(self, silo: str) -> pb.UploadInstructions:
        assert self.fixed is not None and self.view is not None
        instructions = super().upload_instructions(silo)
        instructions.stage = self.stage
        instructions.sketch_buckets = self.view.sketch_buckets
        instructions.fixed_point_bits = self.fixed.bits
        instructions.fixed_point_frac_bits = self.fixed.frac_bits
        if self.stage == self._first_stage:
            instructions.shares.extend(self._inbox[p][silo] for p in self.peers if p != silo)
        return instructions

    def update_specs(self) -> dict[str, TensorSpec]:
        bits = self.settings.fixed_point_bits
        return {u: TensorSpec(f"uint{bits}", (n,)) for u, n in self._sizes.items()}

    def payload_specs(self, phase: Phase, header: pb.UpdateHeader) -> dict[str, TensorSpec]:
        if phase not in (Phase.UPLOADING, Phase.SKETCHING):
            raise self._none(phase.value)
        return check_units(header, self.update_specs())

    def take_payload(self, phase: Phase, silo: str, payload: Mapping[str, np.ndarray],
                     header: pb.UpdateHeader) -> None:
        self.add(silo, payload)

    def after_stage(self) -> Next:
        return Next.CHECK

    @timed
    def add(self, silo: str, payload: Mapping[str, np.ndarray]) -> None:
        """Masked words go into the (unit, group) sums, mod ``2**bits``, and nowhere else."""
        assert self.plan is not None and self.fixed is not None
        self.check_member(silo)
        if set(payload) != set(self._sizes) or any(v.dtype != self.fixed.dtype for v in payload.values()):
            raise bad_input(f"silo {silo!r}: masked payload units or dtype do not match")
        for unit, words in payload.items():
            key = (unit, self.plan.group[silo][unit])
            if key not in self._sums:
                self._sums[key] = np.zeros(self._sizes[unit], dtype=self.fixed.dtype)
            np.add(self._sums[key], words, out=self._sums[key])  # wraps mod 2**bits
        self._members.add(silo)

    # -- CHECKING: the consistency check ----------------------------------------------------------
    def check_instructions(self) -> pb.CheckInstructions:
        """Survivors and dropouts of this stage; refused (nothing will be revealed) when too few survived
        or a group would be too small."""
        survivors = self.members
        if len(survivors) < self.threshold:
            raise ProtocolError(f"{len(survivors)} survivors of the {self.stage} stage, threshold {self.threshold}")
        self.check_group_sizes()
        dropped = sorted(set(self.peers) - survivors)
        assert self.view is not None
        self._check = check_bytes(self.view.digest(), sorted(survivors), dropped)
        return pb.CheckInstructions(survivors=sorted(survivors), dropped=dropped, stage=self.stage)

    @timed
    def add_check(self, silo: str, submission: pb.CheckSubmission) -> None:
        """A survivor's signature over the view and survivor list; refused early when it does not verify
        against the certificate of the survivor's advert (every silo checks it again itself)."""
        signature = submission.signature
        if signature.silo != silo or silo not in self.members:
            raise bad_input(f"consistency signature of {signature.silo!r} sent by {silo!r}, a survivor must sign its own")
        if bytes(signature.certificate_pem) != bytes(self._adverts[silo].certificate_pem):
            raise bad_input(f"consistency signature of {silo!r} comes with another certificate than its advert's")
        try:
            verify_silo_signature(silo, self._check, bytes(signature.signature), bytes(signature.certificate_pem),
                                  self._ca, f"consistency signature of {silo!r}")
        except SignatureError:
            raise bad_input(f"consistency signature of {silo!r} does not verify (it saw another view or survivor "
                            "list)") from None
        self._signatures[silo] = signature

    @property
    def signers(self) -> list[str]:
        return sorted(self._signatures)

    # -- UNMASKING -----------------------------------------------------------------------------
    def unmask_instructions(self) -> pb.UnmaskInstructions:
        """Survivors, dropouts and the signatures that let each signer check the others saw the same."""
        survivors = self.members
        if len(self._signatures) < self.threshold:
            raise ProtocolError(f"{len(self._signatures)} consistency signatures, threshold {self.threshold}")
        return pb.UnmaskInstructions(survivors=sorted(survivors), dropped=sorted(set(self.peers) - survivors),
                                     stage=self.stage, signatures=[self._signatures[s] for s in self.signers])

    @timed
    def add_reveal(self, silo: str, submission: pb.UnmaskSubmission) -> None:
        survivors = self.members
        owners = [r.owner for r in submission.shares]
        if sorted(owners) != self.peers:
            raise bad_input("revealed shares must cover every peer of the stage exactly once")
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
        """This stage's unmasked, decoded group sums; ProtocolError if anything does not add up."""
        assert self.plan is not None and self.fixed is not None
        survivors = self.members
        dropped = sorted(set(self.peers) - survivors)
        self.out_of_round |= set(dropped)
        try:
            seeds = {s: self._secret(s) for s in sorted(survivors)}
            keys = {d: self._secret(d) for d in dropped}
            pair: dict[tuple[str, str], bytes] = {}
            out: dict[str, dict[int, GroupSum]] = {u: {} for u in self._sizes}
            everyone = self.group_members(set(self.peers))
            for (unit, group), words in self._sums.items():
                members = everyone[(unit, group)]
                alive = [s for s in members if s in survivors]
                gone = [d for d in members if d not in survivors]
                for s in alive:
                    for d in gone:
                        if (s, d) not in pair:
                            pair[(s, d)] = mask_seed(keys[d], stage_mask_public(self._adverts[s], self.stage),
                                                     self.run_id, self.session, d, s)
                plain = unmask_sum(words, mask_label(self.run_id, self.session, unit, group, self.stage),
                                   {s: seeds[s] for s in alive}, {(s, d): pair[(s, d)] for s in alive for d in gone})
                vector = self.fixed.decode(plain)
                weight = float(sum(self.plan.alpha[s][unit] for s in alive))
                bound = sum(clip_bound(self.plan.alpha[s][unit], self._clip) for s in alive)
                bound += self.fixed.sum_error_bound(len(alive)) * np.sqrt(vector.size)
                if float(np.linalg.norm(vector)) > bound:
                    raise ProtocolError(f"unit {unit} group {group}: unmasked {self.stage} sum exceeds its clip bound "
                                        "(a wrong share or payload)")
                out[unit][group] = GroupSum(vector, weight, len(alive))
        except (ShamirError, SecAggError, MaskingError, AdvertError) as exc:
            raise ProtocolError(f"unmasking failed: {exc}") from None
        return out
