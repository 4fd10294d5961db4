"""One silo's side of a CKKS round (``mode: ckks``; docs/protocol.md).

On top of :class:`~silo_agent.secure_session.SecureSession` (keys, adverts, the run secret):
SHARE: nothing to share but, when the aggregator has no CKKS key for the run yet, the dealer creates
one and sends the public context plus the secret context sealed under the run secret.
UPLOAD: a silo that was just dealt the run secret opens the sealed CKKS key with it; every silo
encrypts each clipped unit delta under the run's key. The aggregator multiplies by alpha and adds.
DECRYPT (one silo, the round's key holder): decrypts the encrypted group sums, each only if it
claims at least this silo's own ``min_group_size`` contributors and no more than the group has.
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
from fcmoe.timing import timed
from protos import fcmoe_pb2 as pb
from protos.codec import TensorSpec
from silo_agent.secure_session import SecureSession

PARAMS = ckks.DEFAULT_PARAMS
CONTEXT_PURPOSE = "ckks-context"


class CkksSession(SecureSession):
    """The CKKS key (held across rounds by the agent) and this attempt's encryption and decryption."""

    def __init__(self, run_id: str, session: int, silo: str, pki_dir, min_group_size: int,
                 run_secret: bytes | None = None, context: ts.Context | None = None):
        super().__init__(run_id, session, silo, pki_dir, min_group_size, run_secret)
        self.context = context  # the run's CKKS secret context, once created or dealt

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
    def encrypted_payload(self, instructions: pb.UploadInstructions,
                          deltas: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each unit's clipped delta as CKKS ciphertext chunks (uint8 tensors ``UNIT#CHUNK``)."""
        units = self.accept_upload_plan(instructions, self.min_group_size)
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
        out = {}
        for unit in units:
            for i, chunk in enumerate(ckks.encrypt(self.context, deltas[unit])):
                out[ciphertext_name(unit, i)] = np.frombuffer(chunk, dtype=np.uint8)
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

    @timed
    def decrypt(self, instructions: pb.DecryptInstructions, sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Plaintext group sums ``UNIT/GROUP``; refuses a sum claiming fewer contributors than this
        silo's minimum, or more than the group it was told about has."""
        if self.context is None:
            raise SecAggError("asked to decrypt without the CKKS key")
        out = {}
        for s in instructions.sums:
            members = sum(1 for g in self._groups[s.unit].values() if g == s.group)
            if s.contributors > members:
                raise SecAggError(f"sum of unit {s.unit} group {s.group} claims {s.contributors} contributors; "
                                  f"the group has {members}")
            chunks = [sums[sum_chunk_name(s.unit, s.group, i)].tobytes() for i in range(len(s.chunk_bytes))]
            try:
                plain = ckks.decrypt_sum(self.context, chunks, s.length, s.contributors, self.min_group_size)
            except CkksError as exc:
                raise SecAggError(f"sum of unit {s.unit} group {s.group}: {exc}") from None
            out[sum_name(s.unit, s.group)] = plain.astype(np.float32)
        return out
