"""Mode none: plaintext payloads summed as they arrive, one running sum per (unit, group), none per silo.

No adverts, no share phase, nothing to unmask: a stage's sums are ready when its uploads close.
Update sums whose group is below ``min_group_size`` are merged into the others before the strategy
sees them (aggregator/accumulate.py, merge_small_groups); sketch sums are used as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator.accumulate import Coefficients, PlaintextAccumulator, UnitSums, merge_small_groups
from aggregator.round_mode import Next, RoundMode, check_units
from aggregator.rounds import Phase
from fcmoe.errors import ProtocolError
from protos import fcmoe_pb2 as pb
from protos.codec import TensorSpec


class PlainRound(RoundMode):
    mode = "none"

    def __init__(self, unit_sizes: Mapping[str, int], min_group_size: int):
        self.unit_sizes = dict(unit_sizes)
        self.min_group_size = min_group_size
        self._plan: Coefficients | None = None
        self._buckets = 0
        self._accumulator: PlaintextAccumulator | None = None

    def take_advert(self, silo: str, report: pb.RoundReport) -> None:
        if report.HasField("advert"):
            raise ProtocolError("no key advert was asked for this round", "INVALID_ARGUMENT")

    def _sizes(self) -> dict[str, int]:
        return {u: self._buckets for u in self.unit_sizes} if self.stage == "sketch" else dict(self.unit_sizes)

    def start_stage(self, stage: str, silos: set[str], plan: Coefficients, clip_norm: float, quorum: int,
                    sketch_buckets: int = 0) -> tuple[set[str], int]:
        self.stage, self._plan, self._buckets = stage, plan, sketch_buckets
        self._accumulator = PlaintextAccumulator(self._sizes(), plan, clip_norm)
        return set(silos), quorum

    def upload_instructions(self, silo: str) -> pb.UploadInstructions:
        assert self._plan is not None
        units = list(self.unit_sizes)
        return pb.UploadInstructions(units=units, coefficients=[self._plan.alpha[silo][u] for u in units],
                                     stage=self.stage, sketch_buckets=self._buckets)

    def payload_specs(self, phase: Phase, header: pb.UpdateHeader) -> dict[str, TensorSpec]:
        if phase not in (Phase.UPLOADING, Phase.SKETCHING):
            raise self._none(phase.value)
        return check_units(header, {u: TensorSpec("float32", (n,)) for u, n in self._sizes().items()})

    def take_payload(self, phase: Phase, silo: str, payload: Mapping[str, np.ndarray],
                     header: pb.UpdateHeader) -> None:
        assert self._accumulator is not None
        self._accumulator.add(silo, payload)

    def after_stage(self) -> Next:
        return Next.SUMS

    @property
    def members(self) -> frozenset[str]:
        return self._accumulator.members if self._accumulator is not None else frozenset()

    def result(self) -> UnitSums:
        assert self._accumulator is not None
        sums = self._accumulator.result()
        return merge_small_groups(sums, self.min_group_size) if self.stage == "update" else sums
