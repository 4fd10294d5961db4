"""The aggregator's side of a CKKS round (``mode: ckks``; docs/protocol.md): add ciphertexts, ask for sums.

Silos encrypt each clipped unit delta under the run's CKKS key (TenSEAL; crypto/ckks.py). The
aggregator holds the *public* context only: it multiplies every ciphertext by the silo's plaintext
coefficient alpha and adds it into the (unit, group) sum, keeping per silo only its signed digest.
Every upload carries, per unit, the silo's signature over the digest of its chunks for this run,
attempt, unit and group; the aggregator checks it against its CA on arrival and hands the key holder
each sum with its contributors' signatures. One surviving silo, the key holder of the round, then
decrypts the group sums (only those signed by at least its own ``min_group_size`` contributors; see
silo_agent/ckks_round.py) and sends back the plaintext sums, flooded with noise (crypto/ckks.py).

The CKKS key is the silos' common secret: one silo (the dealer) creates it, sends the aggregator the
public context and the secret context sealed under the run secret (which the aggregator does not
have), and the aggregator relays that sealed blob to every silo that is dealt the run secret.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from aggregator.accumulate import Coefficients, GroupSum, UnitSums, clip_bound
from aggregator.round_mode import Next, check_units
from aggregator.rounds import Phase
from aggregator.secure_round import SecureRound, bad_input
from crypto import ckks
from crypto.ckks import CkksError
from crypto.secagg import ciphertext_name, sum_chunk_name, sum_name
from fcmoe.config import SecureAggregationConfig
from fcmoe.errors import ProtocolError
from fcmoe.timing import timed
from protos import fcmoe_pb2 as pb
from protos.codec import TensorSpec

PARAMS = ckks.DEFAULT_PARAMS
MAX_SEALED_CONTEXT_BYTES = 4 * 1024 * 1024
DECRYPTION_ERROR = 1e-3  # allowance per coordinate on the clip bound check (flooding noise is ~1e-5)


@dataclass
class CkksKeys:
    """Run-level: the public context the aggregator computes with, and the sealed key it relays."""

    public: ts.Context | None = None
    public_bytes: bytes = b""
    sealed_secret: bytes = b""
    saved: bool = False  # in the run's checkpoint folder (aggregator/checkpoint.py)

    def restore(self, public_bytes: bytes, sealed_secret: bytes) -> None:
        """A resumed run goes on with the key its silos hold."""
        self.public = ckks.load_public_context(public_bytes, PARAMS)
        self.public_bytes, self.sealed_secret, self.saved = public_bytes, sealed_secret, True


def chunk_names(unit: str, size: int) -> list[str]:
    return [ciphertext_name(unit, i) for i in range(-(-size // PARAMS.slots))]


class CkksRound(SecureRound):
    """One attempt of one CKKS round, driven by the coordinator phase by phase."""

    mode = "ckks"
    can_sketch = False  # the key holder would decrypt the sketch sums too

    def __init__(self, run_id: str, session: int, unit_sizes: Mapping[str, int], settings: SecureAggregationConfig,
                 min_group_size: int, ca_pem: bytes, keys: CkksKeys):
        super().__init__(run_id, session, unit_sizes, settings, min_group_size, ca_pem)
        self.keys = keys
        self._clip = 0.0
        self._sums: dict[tuple[str, int], list[bytes]] = {}
        self._signed: dict[tuple[str, int], list[pb.SignedContribution]] = {}  # its contributors' signatures
        self.key_holder = ""
        self._decrypted: dict[str, np.ndarray] = {}

    # -- SHARING: only dealing ------------------------------------------------------------------
    def open_sharing(self, reporters: set[str], force_dealer: bool = False) -> None:
        super().open_sharing(reporters, force_dealer=force_dealer or self.keys.public is None)

    def share_instructions(self) -> pb.ShareInstructions:
        instructions = super().share_instructions()
        instructions.want_ckks_context = self.keys.public is None
        return instructions

    @timed
    def add_shares(self, silo: str, submission: pb.ShareSubmission) -> None:
        if len(submission.shares):
            raise bad_input("mode ckks has no Shamir shares")
        self.add_dealt_secrets(silo, submission)
        context_sent = bool(submission.ckks_public_context or submission.ckks_secret_context)
        if silo != self.dealer or self.keys.public is not None:
            if context_sent:
                raise bad_input("no CKKS context was asked from this silo")
            return
        if not submission.ckks_public_context or not 0 < len(submission.ckks_secret_context) <= MAX_SEALED_CONTEXT_BYTES:
            raise bad_input("the dealer must send the CKKS public context and the sealed secret context")
        try:
            self.keys.public = ckks.load_public_context(bytes(submission.ckks_public_context), PARAMS)
        except CkksError as exc:
            raise bad_input(f"CKKS public context: {exc}") from None
        self.keys.public_bytes = bytes(submission.ckks_public_context)
        self.keys.sealed_secret = bytes(submission.ckks_secret_context)

    # -- UPLOADING -----------------------------------------------------------------------------
    def open_upload(self, sharers: set[str], plan: Coefficients, clip_norm: float, minimum: int = 0) -> None:
        if self.keys.public is None:
            raise ProtocolError("no CKKS public context yet: the dealer did not answer the share phase")
        self.plan_groups(sharers, plan, minimum)
        self._clip = clip_norm

    def start_stage(self, stage: str, silos: set[str], plan: Coefficients, clip_norm: float, quorum: int,
                    sketch_buckets: int = 0) -> tuple[set[str], int]:
        if stage != "update":
            raise self._none(f"{stage} stage")
        self.open_upload(silos, plan, clip_norm, quorum)
        self.stage = stage
        return set(self.peers), quorum

    def upload_instructions(self, silo: str) -> pb.UploadInstructions:
        instructions = super().upload_instructions(silo)
        if instructions.HasField("run_secret"):
            instructions.ckks_secret_context = self.keys.sealed_secret
        return instructions

    def update_specs(self, header: pb.UpdateHeader) -> dict[str, TensorSpec]:
        """Ciphertext chunks of every unit, in order, each within CKKS' size limit."""
        names = [n for u, size in self.unit_sizes.items() for n in chunk_names(u, size)]
        if list(header.units) != names or len(header.sizes) != len(names):
            raise bad_input("encrypted update must list every unit's ciphertext chunks, in order, with sizes")
        if any(not 0 < size <= PARAMS.max_ciphertext_bytes for size in header.sizes):
            raise bad_input(f"ciphertext chunk sizes must be in 1..{PARAMS.max_ciphertext_bytes} bytes")
        return {n: TensorSpec("uint8", (int(size),)) for n, size in zip(names, header.sizes)}

    @timed
    def add(self, silo: str, payload: Mapping[str, np.ndarray],
            contributions: Sequence[pb.SignedContribution] = ()) -> None:
        """alpha * ciphertext goes into the (unit, group) sum and nowhere else, with the silo's signature.

        ``contributions`` (from the update header) holds, per unit in order, the silo's signature over
        the digest of that unit's chunks for this run, attempt, unit and the group the plan gives it;
        the key holder decrypts a sum only with enough of them, so a missing or bad one is refused
        here, before anything is added.
        """
        assert self.plan is not None and self.keys.public is not None
        self.check_member(silo)
        units = list(self.unit_sizes)
        if len(contributions) != len(units):
            raise bad_input(f"silo {silo!r}: {len(contributions)} signed contributions, expected one per unit "
                            f"({len(units)})")
        scaled: dict[tuple[str, int], list[bytes]] = {}
        signed: dict[tuple[str, int], pb.SignedContribution] = {}
        try:
            for (unit, size), contribution in zip(self.unit_sizes.items(), contributions):
                chunks = [payload[n].tobytes() for n in chunk_names(unit, size)]
                group = self.plan.group[silo][unit]
                if contribution.silo != silo or bytes(contribution.digest) != ckks.chunks_digest(chunks):
                    raise CkksError(f"unit {unit}: the signed contribution is not this silo's digest of its chunks")
                ckks.verify_contribution(silo, bytes(contribution.digest), bytes(contribution.signature),
                                         bytes(contribution.certificate_pem), self._ca, self.run_id, self.session,
                                         unit, group)
                scaled[(unit, group)] = ckks.scale(self.keys.public, chunks, self.plan.alpha[silo][unit])
                signed[(unit, group)] = contribution
            for key, value in scaled.items():  # all or nothing: a bad chunk adds nothing
                self._sums[key] = ckks.add(self.keys.public, self._sums[key], value) if key in self._sums else value
        except (CkksError, KeyError) as exc:
            raise bad_input(f"silo {silo!r}: encrypted update refused: {exc}") from None
        for key, contribution in signed.items():
            self._signed.setdefault(key, []).append(contribution)
        self._members.add(silo)

    # -- DECRYPTING ----------------------------------------------------------------------------
    def decrypt_instructions(self) -> pb.DecryptInstructions:
        """The sums for the key holder (the first survivor), each with its contributors' signed
        digests, without which the key holder refuses it; refused here when a group is too small."""
        self.check_group_sizes()
        self.key_holder = min(self.members)
        groups = self.group_members(self.members)
        return pb.DecryptInstructions(sums=[
            pb.EncryptedSum(unit=unit, group=group, contributors=len(groups[(unit, group)]),
                            length=self.unit_sizes[unit], chunk_bytes=[len(c) for c in chunks],
                            signed_contributions=sorted(self._signed[(unit, group)], key=lambda c: c.silo))
            for (unit, group), chunks in sorted(self._sums.items())])

    def encrypted_sums(self, silo: str) -> dict[str, np.ndarray]:
        if silo != self.key_holder:
            raise ProtocolError(f"silo {silo!r} is not this round's key holder", "PERMISSION_DENIED")
        return {sum_chunk_name(unit, group, i): np.frombuffer(c, dtype=np.uint8)
                for (unit, group), chunks in sorted(self._sums.items()) for i, c in enumerate(chunks)}

    def decryption_specs(self) -> dict[str, TensorSpec]:
        return {sum_name(unit, group): TensorSpec("float32", (self.unit_sizes[unit],))
                for unit, group in sorted(self._sums)}

    def payload_specs(self, phase: Phase, header: pb.UpdateHeader) -> dict[str, TensorSpec]:
        if phase == Phase.DECRYPTING:
            return check_units(header, self.decryption_specs())
        if phase != Phase.UPLOADING:
            raise self._none(phase.value)
        return self.update_specs(header)

    def take_payload(self, phase: Phase, silo: str, payload: Mapping[str, np.ndarray],
                     header: pb.UpdateHeader) -> None:
        if phase == Phase.DECRYPTING:
            self.add_decryption(silo, payload)
        else:  # the silo's signed digests ride in the header
            self.add(silo, payload, header.contributions)

    def after_stage(self) -> Next:
        return Next.DECRYPT

    def add_decryption(self, silo: str, payload: Mapping[str, np.ndarray]) -> None:
        if silo != self.key_holder:
            raise ProtocolError(f"silo {silo!r} is not this round's key holder", "PERMISSION_DENIED")
        self._decrypted = dict(payload)

    def result(self) -> UnitSums:
        """Decrypted group sums; ProtocolError if one is missing, not finite or over its clip bound."""
        assert self.plan is not None
        out: dict[str, dict[int, GroupSum]] = {u: {} for u in self.unit_sizes}
        for (unit, group), silos in self.group_members(self.members).items():
            vector = self._decrypted.get(sum_name(unit, group))
            if vector is None or not np.all(np.isfinite(vector)):
                raise ProtocolError(f"unit {unit} group {group}: no finite decrypted sum")
            bound = sum(clip_bound(self.plan.alpha[s][unit], self._clip) for s in silos)
            vector = np.asarray(vector, dtype=np.float64)
            if float(np.linalg.norm(vector)) > bound + DECRYPTION_ERROR * np.sqrt(vector.size):
                raise ProtocolError(f"unit {unit} group {group}: decrypted sum exceeds its clip bound")
            out[unit][group] = GroupSum(vector,
                                        float(sum(self.plan.alpha[s][unit] for s in silos)), len(silos))
        return out
