"""One silo's side of a CKKS round (``mode: ckks``; docs/protocol.md).

On top of :class:`~silo_agent.secure_session.SecureSession` (keys, adverts, the run secret):
SHARE: nothing to share but, when the aggregator has no CKKS key for the run yet, the dealer creates
one and sends the public context plus the secret context sealed under the run secret.
UPLOAD: a silo that was just dealt the run secret opens the sealed CKKS key with it; every silo
encrypts each clipped unit delta under the run's key. The aggregator multiplies by alpha and adds.
UPLOAD also signs, per unit, (run, attempt, silo, unit, group, SHA-256 of the unit's chunks): the
aggregator keeps these signatures with the (unit, group) sum and must show them to the key holder.
DECRYPT (one silo, the round's key holder): decrypts an encrypted group sum only if it carries
signatures, valid against this silo's *own* CA, from at least its own ``min_group_size`` distinct
members of that group for this run, attempt, unit and group (its own only with the digest it really
signed), and if the sum is not one of those signed uploads relabelled. The decryption refuses
ciphertexts that are not sums of real vectors and floods the rest with noise (crypto/ckks.py), so a
crafted ciphertext does not reveal the key. What it cannot catch: one silo's ciphertext that the
aggregator re-randomised (times 1, plus an encryption of zero) passes for a sum; docs/threat-model.md.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import tenseal as ts

from crypto import ckks
from crypto.ckks import CkksError
from crypto.secagg import (
    SecAggError,
    ciphertext_name,
    open_with_run_secret,
    seal_with_run_secret,
    sum_chunk_name,
    sum_name,
)
from fcmoe.config import SiloConfig
from fcmoe.timing import timed
from protos import fcmoe_pb2 as pb
from protos.codec import TensorSpec
from silo_agent.round_mode import RunKeys
from silo_agent.secure_session import SecureSession

PARAMS = ckks.DEFAULT_PARAMS
CONTEXT_PURPOSE = "ckks-context"


class CkksSession(SecureSession):
    """The CKKS key (held across rounds by the agent) and this attempt's encryption and decryption."""

    mode = "ckks"
    exposes_on_upload = True  # the round's key holder may decrypt a sum holding this update without this silo

    def __init__(self, run_id: str, session: int, silo: str, pki_dir, min_group_size: int,
                 run_secret: bytes | None = None, context: ts.Context | None = None):
        super().__init__(run_id, session, silo, pki_dir, min_group_size, run_secret)
        self.context = context  # the run's CKKS secret context, once created or dealt
        self._signed_digests: dict[str, bytes] = {}  # unit -> digest this silo signed this attempt
        self._coefficients: dict[str, dict[str, float]] = {}  # unit -> peer -> alpha (the upload plan)

    @classmethod
    def open(cls, run_id: str, session: int, silo: SiloConfig, keys: RunKeys) -> "CkksSession":
        return cls(run_id, session, silo.name, silo.pki_dir, silo.min_group_size, keys.run_secret, keys.ckks_context)

    def kept(self, before: RunKeys) -> RunKeys:
        return RunKeys(self.run_secret, self.context)

    @timed
    def make_shares(self, instructions: pb.ShareInstructions) -> pb.ShareSubmission:
        """Verify the reporters; the dealer deals the run secret and, when asked, the CKKS key."""
        submission = pb.ShareSubmission(secrets=self.accept_peers(instructions))
        if instructions.want_ckks_context and instructions.dealer == self.silo:
            assert self.run_secret is not None  # the dealer holds or just drew it
            if self.context is None:
                self.context = ckks.new_secret_context(PARAMS)
            submission.ckks_public_context = ckks.public_context_bytes(self.context)
            submission.ckks_secret_context = seal_with_run_secret(
                self.run_secret, self.run_id, CONTEXT_PURPOSE, ckks.secret_context_bytes(self.context))
        return submission

    @timed
    def update_payload(self, instructions: pb.UploadInstructions,
                       deltas: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each unit's clipped delta as CKKS ciphertext chunks (uint8 tensors ``UNIT#CHUNK``); the
        signed digest of each unit's chunks goes to :attr:`contributions` (for the update header)."""
        view = self.accept_upload_plan(instructions, self.min_group_size)
        units = list(view.units)
        coefficients = view.table(view.coefficients)
        if instructions.ckks_secret_context:
            if not instructions.HasField("run_secret") or self.run_secret is None:
                raise SecAggError("a CKKS key came without the run secret that opens it")
            sealed = open_with_run_secret(self.run_secret, self.run_id, CONTEXT_PURPOSE,
                                          bytes(instructions.ckks_secret_context))
            try:
                self.context = ckks.load_secret_context(sealed, PARAMS)
            except CkksError as exc:
                raise SecAggError(f"dealt CKKS key: {exc}") from None
        if self.context is None:
            raise SecAggError("no CKKS key for this run yet (nobody dealt it)")
        out, contributions, digests = {}, [], {}
        try:
            for unit in units:
                chunks = ckks.encrypt(self.context, deltas[unit])
                for i, chunk in enumerate(chunks):
                    out[ciphertext_name(unit, i)] = np.frombuffer(chunk, dtype=np.uint8)
                digest = ckks.chunks_digest(chunks)
                signature = ckks.sign_contribution(self._identity_key, self.run_id, self.session, self.silo, unit,
                                                   self._groups[unit][self.silo], digest)
                contributions.append(pb.SignedContribution(silo=self.silo, digest=digest, signature=signature,
                                                           certificate_pem=self._cert))
                digests[unit] = digest
        except CkksError as exc:
            raise SecAggError(f"cannot encrypt this silo's update: {exc}") from None
        self.contributions, self._signed_digests = contributions, digests
        self._coefficients = {u: dict(coefficients[u]) for u in units}
        return out

    def sum_specs(self, instructions: pb.DecryptInstructions) -> dict[str, TensorSpec]:
        """What this silo accepts as the encrypted sums it is asked to decrypt (bounded sizes)."""
        specs = {}
        for s in instructions.sums:
            if s.unit not in self._groups or len(s.chunk_bytes) != -(-s.length // PARAMS.slots):
                raise SecAggError(f"encrypted sum of unit {s.unit!r}: unknown unit or wrong chunk count")
            for i, size in enumerate(s.chunk_bytes):
                if not 0 < size <= PARAMS.max_ciphertext_bytes:
                    raise SecAggError(f"encrypted sum of unit {s.unit!r}: chunk of {size} bytes")
                specs[sum_chunk_name(s.unit, s.group, i)] = TensorSpec("uint8", (int(size),))
        return specs

    def _check_contributors(self, s: pb.EncryptedSum, chunks: list[bytes]) -> list[float]:
        """The coefficients of a sum's signed contributors; SecAggError unless the sum is vouched for.

        Each signature must be by a member of the sum's (unit, group) in this attempt's plan, for this
        run, attempt, unit and group, with a silo certificate from this silo's own CA (a relayed
        certificate is checked, never trusted); this silo's own only with the digest it signed. At
        least this silo's ``min_group_size`` distinct signers, exactly as many as the sum claims, and
        no signed digest equal to the sum's own: that would be one upload relabelled as a sum.
        """
        where = f"sum of unit {s.unit} group {s.group}"
        signed = list(s.signed_contributions)
        names = [c.silo for c in signed]
        if len(set(names)) != len(names):
            raise SecAggError(f"{where}: a contributor signs twice")
        if len(signed) < self.min_group_size:
            raise SecAggError(f"{where} carries {len(signed)} contributor signatures; this silo's "
                              f"min_group_size is {self.min_group_size}")
        if s.contributors != len(signed):
            raise SecAggError(f"{where} claims {s.contributors} contributors but carries {len(signed)} signatures")
        members = self._groups[s.unit]
        digest = ckks.chunks_digest(chunks)
        for c in signed:
            if members.get(c.silo) != s.group:
                raise SecAggError(f"{where}: {c.silo!r} is not a member of that group this attempt")
            if c.silo == self.silo and bytes(c.digest) != self._signed_digests.get(s.unit):
                raise SecAggError(f"{where}: names this silo as a contributor with a digest it never signed")
            try:
                ckks.verify_contribution(c.silo, bytes(c.digest), bytes(c.signature), bytes(c.certificate_pem),
                                         self._ca, self.run_id, self.session, s.unit, s.group)
            except CkksError as exc:
                raise SecAggError(f"{where}: {exc}") from None
            if bytes(c.digest) == digest:
                raise SecAggError(f"{where} is the upload of {c.silo!r} alone, relabelled as a sum")
        return [float(self._coefficients[s.unit][c.silo]) for c in signed]

    @timed
    def decrypt(self, instructions: pb.DecryptInstructions, sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Plaintext group sums ``UNIT/GROUP``, flooded; refuses the whole request if any sum is not
        signed by enough members of its group (:meth:`_check_contributors`), claims more contributors
        than the group has, or does not decrypt like a sum of real vectors (crypto/ckks.py)."""
        if self.context is None:
            raise SecAggError("asked to decrypt without the CKKS key")
        requests = []
        for s in instructions.sums:  # every sum is checked before anything is decrypted
            members = sum(1 for g in self._groups[s.unit].values() if g == s.group)
            if s.contributors > members:
                raise SecAggError(f"sum of unit {s.unit} group {s.group} claims {s.contributors} contributors; "
                                  f"the group has {members}")
            chunks = [sums[sum_chunk_name(s.unit, s.group, i)].tobytes() for i in range(len(s.chunk_bytes))]
            requests.append((s, chunks, self._check_contributors(s, chunks)))
        out = {}
        for s, chunks, weights in requests:
            try:
                plain = ckks.decrypt_sum(self.context, chunks, s.length, len(weights), self.min_group_size,
                                         weights=weights)
            except CkksError as exc:
                raise SecAggError(f"sum of unit {s.unit} group {s.group}: {exc}") from None
            out[sum_name(s.unit, s.group)] = plain.astype(np.float32)
        return out
