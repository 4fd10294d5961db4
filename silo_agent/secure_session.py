"""What every secure-aggregation mode does on a silo (docs/protocol.md): keys, adverts, the run secret.

TRAIN: fresh X25519 keys for this attempt, advertised signed with the silo's certificate key.
SHARE: every peer's advert is checked against the silo's *own* CA (the aggregator relays them and is
not trusted with them). The run secret — silo-only keys derive from it: the sketch key, the key
sealing the CKKS secret key — rides along: the dealer named in the SHARE task seals it for every
reporter that lacks it, and they open it at UPLOAD.
UPLOAD (and SKETCH): the silo checks who it uploads with, that every group keeps its own minimum size
and that no member of a group weighs under its ``min_weight_ratio`` of the group's largest coefficient
(a sum dominated by one member is that member's vector).

Any check that fails raises :class:`SecAggError`; the agent then refuses the round (it goes on
without this silo) instead of sending something that could expose its update. Mode-specific work is
in :mod:`silo_agent.masked_round` and :mod:`silo_agent.ckks_round`; the interface the agent drives
them through is :mod:`silo_agent.round_mode`.
"""

from __future__ import annotations

import os

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
from crypto.secagg import (RUN_SECRET_BYTES, RUN_SECRET_TAG, RoundView, SecAggError, advert_of, run_secret_digest,
                           share_aad, weight_policy_violation)
from fcmoe.config import SiloConfig
from fcmoe.timing import timed
from protos import fcmoe_pb2 as pb
from silo_agent.round_mode import RunKeys, SiloRound


class SecureSession(SiloRound):
    """Keys, verified peers, the run secret and the upload plan of one silo for one attempt."""

    def __init__(self, run_id: str, session: int, silo: str, pki_dir, min_group_size: int,
                 run_secret: bytes | None = None, min_weight_ratio: float = 0.1):
        super().__init__(session)
        paths = PkiPaths(pki_dir)
        self.run_id, self.silo = run_id, silo
        self.min_group_size = min_group_size
        self.min_weight_ratio = min_weight_ratio
        self._ca = read_pem(paths.ca_cert)
        self._cert = read_pem(paths.silo_cert(silo))
        self._identity_key = read_pem(paths.silo_key(silo))
        self._keys = RoundKeys(run_id, session, silo)
        self.run_secret = run_secret  # the run secret this silo holds (dealt or drawn), if any
        self._dealer = ""
        self._reporters: dict[str, KeyAdvert] = {}
        self._certificates: dict[str, bytes] = {}  # reporter -> its certificate, verified against the own CA
        self._peers: list[str] = []  # who uploads this attempt
        self._groups: dict[str, dict[str, int]] = {}  # unit -> peer -> group

    @classmethod
    def open(cls, run_id: str, session: int, silo: SiloConfig, keys: RunKeys) -> "SecureSession":
        return cls(run_id, session, silo.name, silo.pki_dir, silo.min_group_size, keys.run_secret,
                   silo.min_weight_ratio)

    def kept(self, before: RunKeys) -> RunKeys:
        return RunKeys(self.run_secret, before.ckks_context)

    @timed
    def advert(self) -> pb.KeyAdvert:
        digest = run_secret_digest(self.run_id, self.run_secret) if self.run_secret else b""
        signed = self._keys.advert(self._identity_key, digest)
        return pb.KeyAdvert(silo=self.silo, session=self.session, mask_public=signed.mask_public,
                            channel_public=signed.channel_public, signature=signed.signature,
                            certificate_pem=self._cert, secret_digest=digest,
                            sketch_mask_public=signed.sketch_mask_public)

    # -- SHARE ---------------------------------------------------------------------------------
    def accept_peers(self, instructions: pb.ShareInstructions) -> list[pb.SealedShare]:
        """Verify every reporter's advert and the dealing; returns the run secrets this silo deals."""
        if self._reporters:
            raise SecAggError("this attempt's share instructions were already handled")
        names = [a.silo for a in instructions.adverts]
        if names != sorted(set(names)):
            raise SecAggError("adverts must be sorted by silo with no silo twice")
        reporters: dict[str, KeyAdvert] = {}
        for message in instructions.adverts:
            advert = advert_of(message, self.run_id)
            if advert.silo == self.silo:
                if ((advert.mask_public, advert.channel_public, advert.sketch_mask_public)
                        != (self._keys.mask_public, self._keys.channel_public, self._keys.sketch_mask_public)):
                    raise SecAggError("the relayed advert of this silo is not the one it sent")
            else:
                try:
                    verify_advert(advert, bytes(message.certificate_pem), self._ca, self.run_id, self.session)
                except AdvertError as exc:
                    raise SecAggError(f"refusing the round: {exc}") from None
            reporters[advert.silo] = advert
            self._certificates[advert.silo] = bytes(message.certificate_pem)
        if self.silo not in reporters:
            raise SecAggError("this silo's advert is missing from the share instructions")
        if instructions.min_group_size < self.min_group_size:
            raise SecAggError(f"min_group_size {instructions.min_group_size} is below this silo's "
                              f"{self.min_group_size}")
        self._reporters = reporters
        return self._deal(instructions)

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
    def accept_upload_plan(self, instructions: pb.UploadInstructions, minimum: int) -> RoundView:
        """Check who uploads with this silo, in which groups and with which weights; open a dealt run
        secret. Returns the view of this stage (what the silo will sign before revealing anything)."""
        if not self._reporters:
            raise SecAggError("upload before the share phase")
        units, peers = list(instructions.units), list(instructions.peers)
        if peers != sorted(set(peers)) or not set(peers) <= set(self._reporters) or self.silo not in peers:
            raise SecAggError("upload peers must be sorted reporters that include this silo")
        if len(peers) < minimum:
            raise SecAggError(f"{len(peers)} peers answered the share phase, {minimum} needed")
        cells = len(units) * len(peers)
        if (len(instructions.groups) != cells or len(instructions.peer_coefficients) != cells
                or len(instructions.coefficients) != len(units)):
            raise SecAggError("upload instructions: group matrix or coefficients have the wrong size")
        view = RoundView(self.run_id, self.session, instructions.stage or "update", tuple(peers), tuple(units),
                         tuple(instructions.groups), tuple(instructions.peer_coefficients),
                         instructions.fixed_point_bits, instructions.fixed_point_frac_bits, instructions.sketch_buckets)
        table = view.table(view.coefficients)
        own = [table[u][self.silo] for u in units]
        if own != list(instructions.coefficients):
            raise SecAggError("upload instructions: this silo's coefficients differ from its row of the table")
        if instructions.HasField("run_secret"):
            self._open_run_secret(instructions.run_secret)
        refusal = weight_policy_violation(view, set(peers), self.min_group_size, self.min_weight_ratio)
        if refusal:
            raise SecAggError(f"refusing to mask: {refusal}")
        self._peers, self._groups = peers, view.table(view.groups)
        return view

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
