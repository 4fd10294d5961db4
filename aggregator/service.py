"""gRPC servicer: wire <-> :class:`~aggregator.coordinator.Coordinator`.

Every refusal becomes a gRPC status with a one-line reason and a one-line log record; no exception
from a peer's bad input escapes to kill the server. The caller's identity is the common name of its
verified client certificate, never a field it sends.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from aggregator.coordinator import Coordinator
from aggregator.receipts import RECEIPTS_FILE, ReceiptBook, to_message
from aggregator.status import Traffic
from crypto.tls import peer_certificate_pem, peer_common_name
from fcmoe.errors import CodecError, FcMoeError, ProtocolError
from fcmoe.logs import log_event
from protos import codec
from protos import fcmoe_pb2 as pb
from protos import fcmoe_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class _StreamCut(Exception):
    """The link broke and gRPC ended the request stream as if the sender had finished it (seen under
    load) instead of raising: an interruption, not a malformed update."""


def _identify(context: grpc.ServicerContext) -> str:
    name = peer_common_name(context)
    if not name:
        raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "no client certificate common name")
    return name


def status_for(exc: FcMoeError) -> grpc.StatusCode:
    """The gRPC status a refusal is answered with (also used by the in-process transport)."""
    if isinstance(exc, ProtocolError):
        return getattr(grpc.StatusCode, exc.status, grpc.StatusCode.FAILED_PRECONDITION)
    return grpc.StatusCode.INVALID_ARGUMENT  # codec, layout, config and other input errors


def _refuse(context: grpc.ServicerContext, rpc: str, silo: str, exc: Exception, traffic: Traffic):
    if isinstance(exc, _Refused):
        code, message = exc.code, str(exc)
    elif isinstance(exc, FcMoeError):
        code, message = status_for(exc), str(exc)
    else:
        code, message = grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"
        log.exception("rpc %s failed", rpc)
    log_event(log, "rpc_refused", level=logging.WARNING, rpc=rpc, silo=silo or "?", code=code.name,
              reason=message)
    traffic.add_refused(rpc, code.name)
    context.abort(code, message)


def _rpc(name: str):
    """Wrap a handler ``(self, silo, request, context)``: identify the caller, turn failures into statuses."""

    def wrap(handler):
        def method(self, request, context: grpc.ServicerContext):
            silo = ""
            try:
                silo = _identify(context)
                return handler(self, silo, request, context)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                _refuse(context, name, silo, exc, self.coordinator.traffic)

        method.__name__ = method.__qualname__ = name
        return method

    return wrap


class FederationService(pb_grpc.FederationServicer):
    def __init__(self, coordinator: Coordinator, chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES):
        self.coordinator = coordinator
        self.chunk_bytes = chunk_bytes
        # privacy-ledger anchors (aggregator/receipts.py), read back after a restart
        self.receipts = ReceiptBook(coordinator.output_dir / RECEIPTS_FILE)

    @_rpc("Join")
    def Join(self, silo: str, request: pb.JoinRequest, context) -> pb.JoinReply:
        reply = self.coordinator.join(silo, request)
        held = self.receipts.newest(silo, reply.run_id)
        if held is not None:  # the silo refuses to start from a ledger shorter than this
            reply.ledger_receipt.CopyFrom(to_message(held))
        return reply

    @_rpc("GetTask")
    def GetTask(self, silo: str, request: pb.TaskRequest, context) -> pb.Task:
        return self.coordinator.task(silo, request)

    @_rpc("SubmitReport")
    def SubmitReport(self, silo: str, request: pb.RoundReport, context) -> pb.Ack:
        self.coordinator.add_report(silo, request)
        return pb.Ack(message="recorded")

    @_rpc("ReportEvaluation")
    def ReportEvaluation(self, silo: str, request: pb.EvalReport, context) -> pb.Ack:
        self.coordinator.add_evaluation(silo, request)
        return pb.Ack(message="recorded")

    @_rpc("SubmitShares")
    def SubmitShares(self, silo: str, request: pb.ShareSubmission, context) -> pb.Ack:
        self.coordinator.add_shares(silo, request)
        return pb.Ack(message="recorded")

    @_rpc("SubmitUnmask")
    def SubmitUnmask(self, silo: str, request: pb.UnmaskSubmission, context) -> pb.Ack:
        self.coordinator.add_unmask(silo, request)
        return pb.Ack(message="recorded")

    @_rpc("SubmitCheck")
    def SubmitCheck(self, silo: str, request: pb.CheckSubmission, context) -> pb.Ack:
        self.coordinator.add_check(silo, request)
        return pb.Ack(message="recorded")

    @_rpc("SubmitAgreement")
    def SubmitAgreement(self, silo: str, request: pb.AgreementSubmission, context) -> pb.Ack:
        self.coordinator.add_agreement(silo, request)
        return pb.Ack(message="recorded")

    @_rpc("DeclineRound")
    def DeclineRound(self, silo: str, request: pb.DeclineRequest, context) -> pb.Ack:
        self.coordinator.decline(silo, request)
        return pb.Ack(message="recorded")

    @_rpc("SubmitUpdate")
    def SubmitUpdate(self, silo: str, request_iterator: Iterator[pb.UpdateMessage], context) -> pb.SubmitReply:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "update stream must start with a header")
        header = first.header
        if header.HasField("ledger"):  # a DP silo's ledger anchor: kept (or refused) before the update counts
            cert = peer_certificate_pem(context)
            if cert is None:
                raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "no client certificate to check the ledger receipt")
            self.receipts.keep(silo, self.coordinator.run_id, header.round, header.ledger, cert)
        stream = self.coordinator.begin_update(silo, header)
        assembler = stream.assembler
        try:
            for message in request_iterator:
                if message.WhichOneof("part") != "chunk":
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "only tensor chunks may follow the header")
                if self.coordinator.clock() > stream.deadline:
                    raise _Refused(grpc.StatusCode.DEADLINE_EXCEEDED, f"round {header.round} deadline passed")
                assembler.add(message.chunk)
            try:
                payload = assembler.finish()
            except CodecError:
                if context.is_active():
                    raise  # the silo ended a short stream itself: a bad update
                raise _StreamCut from None
            if header.payload_sha256 and codec.payload_digest(payload, assembler.digests) != header.payload_sha256:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "update does not match its payload_sha256")
            self.coordinator.add_update(silo, header, payload, assembler.bytes_received)
        except (grpc.RpcError, _StreamCut):  # the link broke mid-stream: what arrived is kept for a resumed stream
            self.coordinator.interrupted_update(silo, stream)
            raise _Refused(grpc.StatusCode.CANCELLED,
                           f"update stream cut after {assembler.chunks_received} chunks") from None
        finally:
            self.coordinator.end_update(silo)
        return pb.SubmitReply(accepted=True, message="accepted", bytes_received=assembler.bytes_received)

    @_rpc("UploadStatus")
    def UploadStatus(self, silo: str, request: pb.UpdateHeader, context) -> pb.UploadProgress:
        return self.coordinator.upload_status(silo, request)

    def DownloadGlobal(self, request: pb.DownloadRequest, context: grpc.ServicerContext) -> Iterator[pb.TensorChunk]:
        # A generator: refusals must happen before the first chunk, so it is not wrapped by _rpc.
        silo = ""
        try:
            silo = _identify(context)
            units = self.coordinator.global_model(silo, request)
        except Exception as exc:  # noqa: BLE001
            _refuse(context, "DownloadGlobal", silo, exc, self.coordinator.traffic)
            return
        sent = 0
        for chunk in codec.encode(units, self.chunk_bytes):
            sent += len(chunk.data)
            yield chunk
        self.coordinator.count_download(silo, sent)
