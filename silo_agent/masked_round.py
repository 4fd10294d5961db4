"""One silo's side of a masked round (secure aggregation, ``mode: masking``; docs/protocol.md).

On top of :class:`~silo_agent.secure_session.SecureSession` (keys, adverts, the run secret, the
weight policy):
SHARE: the silo draws one self-mask seed per stage (crypto/secagg.py ``STAGES``) and Shamir-shares
them and its mask key among the reporters, each peer's shares sealed under the pairwise channel key.
SKETCH / UPLOAD (one stage each): opens the shares its peers sent it, checks the stage's view, then
sends ``fixed_point(coefficient * vector) + masks`` per unit, the pairwise masks running only among
the members of the unit's group.
CHECK: signs the digest of the view it masked under plus the survivor list it is shown — only if it is
among the survivors, the survivors are at least ``t`` and every group still passes the weight policy.
UNMASK: only with ``t`` valid signatures of distinct peers over exactly the bytes it signed itself (so
every signer saw the same groups, coefficients and dropouts), reveals per peer the self-seed share of
the stage (peer survived) or the mask-key share (peer dropped), never both, once per stage. A peer
dropped in the sketch stage may not come back for the update stage.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from crypto import masking, shamir
from crypto.fixed_point import FixedPoint, FixedPointError
from crypto.key_agreement import ChannelError, SignatureError, open_sealed, seal, sign_as_silo, verify_silo_signature
from crypto.secagg import (STAGES, RoundView, SecAggError, StageShares, check_bytes, mask_label, mask_seed, pack_shares,
                           share_aad, share_x, sketch_key, stage_mask_public, unpack_shares,
                           weight_policy_violation)
from crypto.shamir import ShamirError
from fcmoe.timing import timed
from protos import fcmoe_pb2 as pb
from silo_agent.secure_session import SecureSession


class MaskingSession(SecureSession):
    """Shares, masks, consistency signatures and reveals of one silo for one attempt of one round."""

    mode = "masking"

    def __init__(self, run_id: str, session: int, silo: str, pki_dir, min_group_size: int,
                 run_secret: bytes | None = None, min_weight_ratio: float = 0.1):
        super().__init__(run_id, session, silo, pki_dir, min_group_size, run_secret, min_weight_ratio)
        self._threshold = 0
        self._self_seeds: dict[str, bytes] = {}
        self._received: dict[str, StageShares] = {}  # owner -> stage -> (self-seed share, mask-key share)
        self._views: dict[str, RoundView] = {}  # stage -> the view this silo masked under
        self._signed: dict[str, bytes] = {}  # stage -> what it signed in the consistency check
        self._survivors: dict[str, tuple[str, ...]] = {}  # stage -> the survivor list it signed
        self.revealed: set[str] = set()  # stages whose shares this silo revealed
        self._dropped: set[str] = set()  # peers whose mask keys this silo revealed: out of this attempt

    # -- SHARE ---------------------------------------------------------------------------------
    @timed
    def make_shares(self, instructions: pb.ShareInstructions) -> pb.ShareSubmission:
        """Verify every peer's advert, then seal shares of this silo's secrets for each peer; the
        dealer also seals the run secret for the listed recipients."""
        n, t = len(instructions.adverts), instructions.threshold
        if not (t >= 2 and 2 * t > n and t <= n):
            raise SecAggError(f"threshold t={t} for n={n} silos: need a majority, 2 <= t <= n")
        secrets = self.accept_peers(instructions)
        self._threshold = t
        self._self_seeds = {stage: os.urandom(masking.SEED_BYTES) for stage in STAGES}
        split = {stage: (shamir.split(self._self_seeds[stage], n, t),
                         shamir.split(self._keys.mask_private_bytes(stage), n, t)) for stage in STAGES}
        out = []
        for peer in self._reporters:
            x = share_x(list(self._reporters), peer)
            mine = {stage: (seeds[x - 1], keys[x - 1]) for stage, (seeds, keys) in split.items()}
            if peer == self.silo:
                self._received[peer] = mine
                continue
            ciphertext = seal(self._channel_key(peer), pack_shares(mine),
                              share_aad(self.run_id, self.session, self.silo, peer))
            out.append(pb.SealedShare(sender=self.silo, recipient=peer, ciphertext=ciphertext))
        return pb.ShareSubmission(shares=out, secrets=secrets)

    # -- SKETCH / UPLOAD -----------------------------------------------------------------------
    def accept_stage(self, instructions: pb.UploadInstructions) -> RoundView:
        """The view of the stage these instructions open, checked; shares opened when they come."""
        stage = instructions.stage or "update"
        if stage not in STAGES or stage in self._views or any(
                STAGES.index(s) > STAGES.index(stage) for s in self._views):
            raise SecAggError(f"stage {stage!r} after {sorted(self._views)}: each stage once, in order")
        view = self.accept_upload_plan(instructions, self._threshold)
        if set(view.peers) & self._dropped:
            raise SecAggError(f"peers {sorted(set(view.peers) & self._dropped)} dropped out of this attempt earlier")
        if self._views and not set(view.peers) <= set(self._survivors.get(STAGES[0], ())):
            raise SecAggError("the update stage names peers that did not survive the sketch stage")
        if not self._views:  # the first stage brings every peer's sealed shares
            self._open_shares(instructions.shares, list(view.peers))
        elif len(instructions.shares):
            raise SecAggError("sealed shares arrive with the first stage only")
        self._views[stage] = view
        return view

    def open_sketch_stage(self, instructions: pb.UploadInstructions) -> bytes:
        """Accept the sketch stage; sketches are keyed by the run secret (dealt by now to every silo)."""
        self.accept_stage(instructions)
        if self.run_secret is None:
            raise SecAggError("sketch stage without a run secret")
        return sketch_key(self.run_secret)

    def sketch_payload(self, sketches: Mapping[str, np.ndarray],
                       weighted: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.mask(self._views["sketch"], sketches)

    def update_payload(self, instructions: pb.UploadInstructions,
                       deltas: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Accept the stage, then mask ``deltas`` in it."""
        return self.mask(self.accept_stage(instructions), deltas)

    @timed
    def mask(self, view: RoundView, vectors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``encode(coefficient * vector) + self mask + pairwise masks`` per unit, as uint words, for the
        stage of ``view`` (accepted with :meth:`accept_stage`)."""
        peers, groups, own = list(view.peers), view.table(view.groups), view.table(view.coefficients)
        try:
            fixed = FixedPoint(view.fixed_point_bits, view.fixed_point_frac_bits)
        except FixedPointError as exc:
            raise SecAggError(f"upload instructions: {exc}") from None
        pair_seeds: dict[str, bytes] = {}
        out = {}
        for unit in view.units:
            mine = groups[unit][self.silo]
            members = [p for p in peers if p != self.silo and groups[unit][p] == mine]
            for peer in members:
                if peer not in pair_seeds:
                    pair_seeds[peer] = mask_seed(self._keys.mask_private_bytes(view.stage),
                                                 stage_mask_public(self._reporters[peer], view.stage),
                                                 self.run_id, self.session, self.silo, peer)
            try:
                encoded = fixed.encode(np.float64(own[unit][self.silo]) * vectors[unit].astype(np.float64))
            except FixedPointError as exc:
                raise SecAggError(f"unit {unit}: {exc}") from None
            out[unit] = masking.mask(encoded, self.silo, self._self_seeds[view.stage],
                                     {p: pair_seeds[p] for p in members},
                                     mask_label(self.run_id, self.session, unit, mine, view.stage))
        return out

    def _open_shares(self, sealed: Sequence[pb.SealedShare], peers: list[str]) -> None:
        expected = set(peers) - {self.silo}
        got = [s.sender for s in sealed]
        if sorted(got) != sorted(expected) or any(s.recipient != self.silo for s in sealed):
            raise SecAggError("the first stage's instructions must carry exactly one sealed share from every other peer")
        my_x = share_x(list(self._reporters), self.silo)
        for s in sealed:
            try:
                shares = unpack_shares(open_sealed(self._channel_key(s.sender), bytes(s.ciphertext),
                                                   share_aad(self.run_id, self.session, s.sender, self.silo)))
            except (ChannelError, ShamirError) as exc:
                raise SecAggError(f"share from {s.sender!r} does not open: {exc}") from None
            x = shares[STAGES[0]][0].x
            if x != my_x:
                raise SecAggError(f"share from {s.sender!r} is for x={x}, this silo is x={my_x}")
            self._received[s.sender] = shares

    # -- CHECK ---------------------------------------------------------------------------------
    @timed
    def sign_view(self, instructions: pb.CheckInstructions) -> pb.ViewSignature:
        """Sign the stage's view and survivor list, once, if revealing for it could expose nobody."""
        stage = instructions.stage
        view = self._views.get(stage)
        if view is None or stage in self._signed:
            raise SecAggError(f"consistency check of stage {stage!r}: not masked in it, or already signed")
        survivors, dropped = list(instructions.survivors), list(instructions.dropped)
        if (set(survivors) & set(dropped) or set(survivors) | set(dropped) != set(view.peers)
                or len(survivors) + len(dropped) != len(view.peers) or self.silo not in survivors):
            raise SecAggError("survivors and dropped must split the stage's peers, this silo among the survivors")
        if len(survivors) < self._threshold:
            raise SecAggError(f"{len(survivors)} survivors, threshold is {self._threshold}")
        refusal = weight_policy_violation(view, set(survivors), self.min_group_size, self.min_weight_ratio)
        if refusal:
            raise SecAggError(f"refusing to unmask: {refusal}")
        signed = check_bytes(view.digest(), survivors, dropped)
        self._signed[stage] = signed
        self._survivors[stage] = tuple(sorted(survivors))
        return pb.ViewSignature(silo=self.silo, signature=sign_as_silo(self._identity_key, signed),
                                certificate_pem=self._cert)

    # -- UNMASK --------------------------------------------------------------------------------
    @timed
    def reveal(self, instructions: pb.UnmaskInstructions) -> list[pb.RevealedShare]:
        """Self-seed shares of survivors and mask-key shares of dropped peers; once per stage, and
        only when ``t`` peers signed exactly what this silo signed."""
        stage = instructions.stage or "update"
        signed = self._signed.get(stage)
        if signed is None:
            raise SecAggError(f"unmask of stage {stage!r} before this silo signed its view")
        if stage in self.revealed:
            raise SecAggError(f"shares of stage {stage!r} were already revealed this attempt")
        survivors, dropped = set(instructions.survivors), set(instructions.dropped)
        if tuple(sorted(survivors)) != self._survivors[stage] or survivors | dropped != set(self._views[stage].peers):
            raise SecAggError("the unmask names other survivors than this silo signed")
        signers = set()
        for s in instructions.signatures:
            if s.silo not in survivors or s.silo in signers:
                continue
            try:  # against the certificate of the peer's verified advert, checked on the own CA again
                verify_silo_signature(s.silo, signed, bytes(s.signature), self._certificates[s.silo], self._ca,
                                      f"consistency signature of {s.silo!r}")
            except SignatureError:
                continue
            signers.add(s.silo)
        if len(signers) < self._threshold:
            raise SecAggError(f"only {len(signers)} peers signed the same view and survivor list, threshold is "
                              f"{self._threshold}: the aggregator may be showing silos different rounds")
        self.revealed.add(stage)
        self._dropped |= dropped
        out = [pb.RevealedShare(owner=o, mask_key=False, share=self._received[o][stage][0].to_bytes())
               for o in sorted(survivors)]
        out += [pb.RevealedShare(owner=o, mask_key=True, share=self._received[o][stage][1].to_bytes())
                for o in sorted(dropped)]
        return out
