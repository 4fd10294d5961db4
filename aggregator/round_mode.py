"""One attempt's aggregation, the same interface in every secure-aggregation mode.

The coordinator drives a round through its phases without asking which mode it is in: it hands a
:class:`RoundMode` each silo's advert, opens the share phase when :attr:`RoundMode.has_sharing`, opens
a stage (FC-MoE's sketch stage, then the update stage) and asks, when the stage's uploads close,
what comes next (:meth:`RoundMode.after_stage`): the sums themselves (mode none), a consistency check
then an unmask (masking), or a decryption by the key holder (ckks). The implementations:
:class:`~aggregator.plain_round.PlainRound`, :class:`~aggregator.masked_round.MaskedRound`,
:class:`~aggregator.ckks_round.CkksRound`. A phase a mode does not have is refused in one line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from enum import Enum

import numpy as np

from aggregator.accumulate import Coefficients, UnitSums
from aggregator.rounds import Phase
from fcmoe.errors import ProtocolError
from protos import fcmoe_pb2 as pb
from protos.codec import TensorSpec


class Next(Enum):
    """What follows a stage whose uploads closed."""

    SUMS = "sums"  # the stage's group sums are ready (mode none)
    CHECK = "check"  # the consistency check, then the unmask (masking)
    DECRYPT = "decrypt"  # the key holder decrypts the sums (ckks)


class RoundMode(ABC):
    mode: str = ""
    has_sharing = False  # a share phase after the reports (secure modes)
    can_sketch = True  # sums FC-MoE's sketches unseen (not ckks: the key holder would see them)
    threshold = 0  # survivors a masked stage needs to be unmasked
    stage = ""  # the open stage: "sketch" or "update"
    seconds = 0.0  # spent in secure-aggregation work this attempt
    key_holder = ""  # mode ckks: who decrypts this attempt's sums

    # -- reports -----------------------------------------------------------------------------------
    @abstractmethod
    def take_advert(self, silo: str, report: pb.RoundReport) -> None:
        """Check (and keep) the key advert a report must, or must not, carry in this mode."""

    # -- a stage: its plan, its instructions, its uploads -----------------------------------------
    @abstractmethod
    def start_stage(self, stage: str, silos: set[str], plan: Coefficients, clip_norm: float, quorum: int,
                    sketch_buckets: int = 0) -> tuple[set[str], int]:
        """Plan ``stage`` among ``silos``; the silos asked to upload and how many must, at least."""

    @abstractmethod
    def upload_instructions(self, silo: str) -> pb.UploadInstructions: ...

    @abstractmethod
    def payload_specs(self, phase: Phase, header: pb.UpdateHeader) -> dict[str, TensorSpec]:
        """What an update stream of ``phase`` must hold (checked against the header's units)."""

    @abstractmethod
    def take_payload(self, phase: Phase, silo: str, payload: Mapping[str, np.ndarray],
                     header: pb.UpdateHeader) -> None:
        """Add one silo's payload of ``phase`` to what this attempt holds; nowhere else."""

    @abstractmethod
    def after_stage(self) -> Next: ...

    @property
    @abstractmethod
    def members(self) -> frozenset[str]:
        """Whose payload of the open stage was added."""

    @abstractmethod
    def result(self) -> UnitSums:
        """The open stage's group sums, once :meth:`after_stage`'s steps are done."""

    # -- phases of some modes only ------------------------------------------------------------------
    def _none(self, what: str) -> ProtocolError:
        return ProtocolError(f"no {what} in mode {self.mode}")

    def start_sharing(self, reporters: set[str], quorum: int) -> int:
        """Open the share phase among ``reporters``; how many must answer."""
        raise self._none("sharing")

    def share_instructions(self) -> pb.ShareInstructions:
        raise self._none("sharing")

    def add_shares(self, silo: str, submission: pb.ShareSubmission) -> None:
        raise self._none("sharing")

    def check_instructions(self) -> pb.CheckInstructions:
        raise self._none("checking")

    def add_check(self, silo: str, submission: pb.CheckSubmission) -> None:
        raise self._none("checking")

    @property
    def signers(self) -> list[str]:
        return []

    def unmask_instructions(self) -> pb.UnmaskInstructions:
        raise self._none("unmasking")

    def add_reveal(self, silo: str, submission: pb.UnmaskSubmission) -> None:
        raise self._none("unmasking")

    def decrypt_instructions(self) -> pb.DecryptInstructions:
        raise self._none("decrypting")

    def encrypted_sums(self, silo: str) -> dict[str, np.ndarray]:
        raise ProtocolError("no encrypted sums to decrypt now")


def check_units(header: pb.UpdateHeader, specs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
    if list(header.units) != list(specs):
        raise ProtocolError("update lists tensors that differ from what this phase expects", "INVALID_ARGUMENT")
    return dict(specs)
