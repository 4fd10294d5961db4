"""A federation inside one process: the real coordinator and silo agents, without sockets.

For experiments that run many federations (the convergence benchmark runs 48): every message is
still a protobuf message and every tensor still goes through the codec (encode, then decode against
the expected specs), and the coordinator's round logic is the one the gRPC service drives, so the
algorithmic path is identical; only gRPC and TLS are skipped. Tests of the wire use the real thing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np

from aggregator.coordinator import Coordinator
from aggregator.receipts import RECEIPTS_FILE, ReceiptBook, to_message
from aggregator.server import build_coordinator
from aggregator.service import status_for
from crypto.pki import PkiPaths, read_pem, verify_issued_by
from fcmoe.config import Config
from fcmoe.errors import FcMoeError
from protos import codec
from protos import fcmoe_pb2 as pb
from silo_agent.agent import SiloAgent
from silo_agent.client import RpcFailure
from silo_agent.round_mode import RunKeys

T = TypeVar("T")


class InProcessTransport:
    """Implements the silo client's interface by calling the coordinator directly."""

    def __init__(self, coordinator: Coordinator, silo: str, receipts: ReceiptBook | None = None):
        self.coordinator, self.silo = coordinator, silo
        # as the gRPC service: ledger receipts kept in the run folder (one book per transport is
        # enough, each silo's receipts come through its own transport)
        self.receipts = receipts or ReceiptBook(coordinator.output_dir / RECEIPTS_FILE)
        self.instance = ""  # this silo process's id, as sent in its last Join

    def _certificate(self) -> bytes:
        """What TLS would have verified: the silo's certificate from the aggregator's PKI folder, checked
        against its CA (an in-process federation shares one folder)."""
        paths = PkiPaths(self.coordinator.config.aggregator.pki_dir)
        cert = read_pem(paths.silo_cert(self.silo))
        verify_issued_by(cert, read_pem(paths.ca_cert))
        return cert

    def _call(self, rpc: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except FcMoeError as exc:
            raise RpcFailure(rpc, status_for(exc), str(exc)) from None

    def join(self, request: pb.JoinRequest) -> pb.JoinReply:
        self.instance = request.instance

        def join() -> pb.JoinReply:
            reply = self.coordinator.join(self.silo, request)
            held = self.receipts.newest(self.silo, reply.run_id)
            if held is not None:
                reply.ledger_receipt.CopyFrom(to_message(held))
            return reply

        return self._call("Join", join)

    def get_task(self, run_id: str, wait_s: float = 5.0, instance: str | None = None) -> pb.Task:
        request = pb.TaskRequest(run_id=run_id, wait_s=wait_s, instance=self.instance if instance is None else instance)
        return self._call("GetTask", lambda: self.coordinator.task(self.silo, request))

    def download(self, run_id: str, version: int, layout_hash: str, expected: Mapping[str, codec.TensorSpec],
                 encrypted_sums: bool = False) -> tuple[dict[str, np.ndarray], int]:
        def fetch() -> tuple[dict[str, np.ndarray], int]:
            units = self.coordinator.global_model(self.silo, pb.DownloadRequest(
                run_id=run_id, round=version, layout_hash=layout_hash, encrypted_sums=encrypted_sums))
            assembler = codec.TensorAssembler(expected)
            for chunk in codec.encode(units):
                assembler.add(chunk)
            self.coordinator.count_download(self.silo, assembler.bytes_received)
            return assembler.finish(), assembler.bytes_received

        return self._call("DownloadGlobal", fetch)

    def report_round(self, report: pb.RoundReport) -> pb.Ack:
        wire = pb.RoundReport.FromString(report.SerializeToString())
        return self._call("SubmitReport", lambda: (self.coordinator.add_report(self.silo, wire), pb.Ack())[1])

    def submit(self, header: pb.UpdateHeader, payload: Mapping[str, np.ndarray],
               chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES) -> pb.SubmitReply:
        def send() -> pb.SubmitReply:
            if header.HasField("ledger"):
                self.receipts.keep(self.silo, self.coordinator.run_id, header.round, header.ledger,
                                   self._certificate())
            assembler = self.coordinator.begin_update(self.silo, header).assembler
            try:
                for chunk in codec.encode(payload, chunk_bytes):
                    assembler.add(chunk)
                self.coordinator.add_update(self.silo, header, assembler.finish(), assembler.bytes_received)
            finally:
                self.coordinator.end_update(self.silo)
            return pb.SubmitReply(accepted=True, bytes_received=assembler.bytes_received)

        return self._call("SubmitUpdate", send)

    def submit_shares(self, submission: pb.ShareSubmission) -> pb.Ack:
        wire = pb.ShareSubmission.FromString(submission.SerializeToString())
        return self._call("SubmitShares", lambda: (self.coordinator.add_shares(self.silo, wire), pb.Ack())[1])

    def submit_unmask(self, submission: pb.UnmaskSubmission) -> pb.Ack:
        wire = pb.UnmaskSubmission.FromString(submission.SerializeToString())
        return self._call("SubmitUnmask", lambda: (self.coordinator.add_unmask(self.silo, wire), pb.Ack())[1])

    def submit_check(self, submission: pb.CheckSubmission) -> pb.Ack:
        wire = pb.CheckSubmission.FromString(submission.SerializeToString())
        return self._call("SubmitCheck", lambda: (self.coordinator.add_check(self.silo, wire), pb.Ack())[1])

    def submit_agreement(self, submission: pb.AgreementSubmission) -> pb.Ack:
        wire = pb.AgreementSubmission.FromString(submission.SerializeToString())
        return self._call("SubmitAgreement", lambda: (self.coordinator.add_agreement(self.silo, wire), pb.Ack())[1])

    def decline(self, request: pb.DeclineRequest) -> pb.Ack:
        return self._call("DeclineRound", lambda: (self.coordinator.decline(self.silo, request), pb.Ack())[1])

    def report(self, report: pb.EvalReport) -> pb.Ack:
        return self._call("ReportEvaluation", lambda: (self.coordinator.add_evaluation(self.silo, report), pb.Ack())[1])

    def close(self) -> None:
        pass


def run_in_process(aggregator_config: Config, silo_configs: list[Config],
                   absent: Callable[[str, pb.Task], bool] | None = None, *, run_id: str | None = None,
                   run_secret: bytes | None = None, agents: list[SiloAgent] | None = None) -> Coordinator:
    """Run a whole federation in this process and thread; returns the finished coordinator.

    Silos take turns (deterministic, and safe: PEFT's parameter wrappers are not thread-safe across
    models), each doing whatever task the coordinator has for it. ``absent(silo, task)`` returning
    True makes that silo unreachable for that task (it does nothing), to study dropouts. A fixed
    ``run_id`` fixes FC-MoE's sketch keys too (they are bound to it), so that a run is repeatable;
    under masking they are bound to the run secret a silo draws at random as well: with ``run_secret``
    every silo starts out holding that one (none is dealt), to repeat a given run exactly.
    ``agents``, when given, receives the silo agents, for a caller that reads their state afterwards.
    """
    # its silos are new objects every time: always a new run (an earlier one's checkpoints are moved aside)
    fresh = aggregator_config.aggregator.model_copy(update={"resume": False})
    coordinator = build_coordinator(aggregator_config.model_copy(update={"aggregator": fresh}), run_id=run_id)
    agents = [] if agents is None else agents
    for config in silo_configs:
        assert config.silo is not None
        agents.append(SiloAgent(config, transport=InProcessTransport(coordinator, config.silo.name)))
    for agent in agents:
        agent.state.run_keys = RunKeys(run_secret=run_secret)
        agent.join()
    active = list(agents)
    try:
        while active:
            coordinator.step()
            for agent in list(active):
                task = agent.client.get_task(agent.run_id, wait_s=0.0)
                if absent is not None and absent(agent.silo.name, task):
                    continue
                if agent.handle(task) is not None:
                    active.remove(agent)
    finally:
        for agent in agents:
            agent.close()
    return coordinator
