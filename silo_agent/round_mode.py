"""This silo's part of one attempt's aggregation, the same interface in every secure-aggregation mode.

The agent answers a round's tasks without asking which mode it is in: its :class:`SiloRound` gives
the advert a report carries, the shares of the share phase, the payload of each stage, the view it
signs, the shares it reveals and the sums it decrypts. A phase a mode does not have raises
:class:`SecAggError`, so the agent stays out of that round (one line) rather than answer a task its
mode never asks for. The implementations: :class:`PlainRound` (mode none, here),
:class:`~silo_agent.masked_round.MaskingSession`, :class:`~silo_agent.ckks_round.CkksSession`; the
aggregator's side is aggregator/round_mode.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from crypto.secagg import SecAggError
from fcmoe.config import SiloConfig
from fcmoe.errors import ConfigError
from protos import fcmoe_pb2 as pb
from protos.codec import TensorSpec
from silo_agent.update import scaled_payload


@dataclass(frozen=True)
class RunKeys:
    """What a silo keeps from round to round of a run in the secure modes: the run secret (drawn, or
    dealt by a peer through the aggregator, sealed) and, mode ckks, the run's CKKS secret context."""

    run_secret: bytes | None = None
    ckks_context: Any = None  # tenseal.Context


class SiloRound:
    """One attempt of one round on this silo; every phase but the update stage is refused by default."""

    mode = ""
    exposes_on_upload = False  # the update is readable by someone once uploaded (ckks: the key holder)

    def __init__(self, session: int):
        self.session = session
        self.seconds = 0.0  # in secure-aggregation work this attempt (fcmoe.timing.timed)
        self.contributions: list[pb.SignedContribution] = []  # per-unit signed digests of the update (ckks)

    @classmethod
    def open(cls, run_id: str, session: int, silo: SiloConfig, keys: RunKeys) -> "SiloRound":
        """This mode's state for ``session``, carrying the run's keys from earlier rounds."""
        return cls(session)

    def advert(self) -> pb.KeyAdvert | None:
        """The signed key advert this silo's report carries (secure modes)."""
        return None

    def make_shares(self, instructions: pb.ShareInstructions) -> pb.ShareSubmission:
        raise self._absent("share phase")

    def open_sketch_stage(self, instructions: pb.UploadInstructions) -> bytes:
        """Accept FC-MoE's sketch stage; the key to sketch with."""
        raise self._absent("sketch stage")

    def sketch_payload(self, sketches: Mapping[str, np.ndarray],
                       weighted: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What the sketch stage sends: of ``sketches`` (clipped) or their weighted copies ``weighted``."""
        raise self._absent("sketch stage")

    def update_payload(self, instructions: pb.UploadInstructions,
                       deltas: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What the update stage sends for these clipped per-unit deltas."""
        raise self._absent("update stage")

    def sign_view(self, instructions: pb.CheckInstructions) -> pb.ViewSignature:
        raise self._absent("consistency check")

    def reveal(self, instructions: pb.UnmaskInstructions) -> list[pb.RevealedShare]:
        raise self._absent("unmask")

    def sum_specs(self, instructions: pb.DecryptInstructions) -> dict[str, TensorSpec]:
        raise self._absent("decryption")

    def decrypt(self, instructions: pb.DecryptInstructions, sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise self._absent("decryption")

    def kept(self, before: RunKeys) -> RunKeys:
        """The run's keys after this attempt's latest step (a secret drawn or dealt, a key created)."""
        return before

    def _absent(self, what: str) -> SecAggError:
        return SecAggError(f"no {what} in mode {self.mode}")


class PlainRound(SiloRound):
    """Mode none: the aggregator sees each silo's ``coefficient * delta`` and its weighted sketches."""

    mode = "none"

    def __init__(self, session: int, sketch_key: bytes | None = None):
        super().__init__(session)
        self.sketch_key = sketch_key

    @classmethod
    def open(cls, run_id: str, session: int, silo: SiloConfig, keys: RunKeys) -> "PlainRound":
        return cls(session, bytes.fromhex(silo.sketch_key) if silo.sketch_key else None)

    def open_sketch_stage(self, instructions: pb.UploadInstructions) -> bytes:
        """Plaintext sketches are keyed with the key the silos share by configuration (``silo.sketch_key``):
        the aggregator, which sees each sketch, must not know it."""
        if self.sketch_key is None:
            raise ConfigError("the aggregator asks for keyed sketches: set silo.sketch_key (shared by the silos)")
        return self.sketch_key

    def sketch_payload(self, sketches: Mapping[str, np.ndarray],
                       weighted: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {u: y.astype(np.float32) for u, y in weighted.items()}

    def update_payload(self, instructions: pb.UploadInstructions,
                       deltas: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return scaled_payload(deltas, dict(zip(instructions.units, instructions.coefficients)))
