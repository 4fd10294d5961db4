"""The silo's gRPC client: dials out over mutual TLS, retries transient failures with backoff.

Only transient statuses (the aggregator restarting, a cut link, an overloaded server) are retried;
a refusal (bad layout, closed round, wrong certificate) is raised at once as :class:`RpcFailure`
with a one-line reason. One exception: a Join refused because another live process holds this
silo's name (ALREADY_EXISTS) is retried within the budget, so that a silo restarted after a crash
gets in once the aggregator stops counting its dead predecessor as live.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import grpc
import numpy as np

from crypto.pki import PkiPaths, certificate_common_name, read_pem, verify_issued_by
from crypto.tls import UNTRUSTED_SERVER, channel_credentials, describe_rpc_error
from fcmoe.errors import FcMoeError, PkiError
from fcmoe.logs import log_event
from protos import codec
from protos import fcmoe_pb2 as pb
from protos import fcmoe_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

# RESOURCE_EXHAUSTED is not retried: gRPC uses it for a message over the size limit, which a retry
# of the same message cannot fix. CANCELLED is what a call in flight gets when the aggregator stops
# gracefully (SIGTERM): it is coming back like one that was killed.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", codec.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", codec.MAX_MESSAGE_BYTES),
]


class RpcFailure(FcMoeError):
    def __init__(self, rpc: str, code: grpc.StatusCode | None, message: str):
        super().__init__(f"{rpc}: {message}")
        self.rpc, self.code = rpc, code


class AggregatorClient:
    def __init__(self, address: str, pki_dir, silo_name: str, retry_budget_s: float = 600.0,
                 rpc_timeout_s: float = 600.0):
        paths = PkiPaths(pki_dir)
        self.check_certificate_name(paths, silo_name)
        self.certificate_problem = self._check_own_certificate(paths, silo_name)
        self.instance = ""  # this silo process's id, as sent in its last Join; carried by every GetTask
        creds = channel_credentials(paths.ca_cert, paths.silo_cert(silo_name), paths.silo_key(silo_name))
        self.address, self.ca_path = address, paths.ca_cert
        self.channel = grpc.secure_channel(address, creds, options=GRPC_OPTIONS)
        self.stub = pb_grpc.FederationStub(self.channel)
        self.retry_budget_s = retry_budget_s
        self.stop = threading.Event()  # the silo's stop request: set, a retry waits no longer
        self.rpc_timeout_s = rpc_timeout_s

    @staticmethod
    def _check_own_certificate(paths: PkiPaths, silo_name: str) -> str | None:
        """Check our certificate against the CA we trust for the aggregator.

        A refused TLS client learns nothing from the server (the connection is just closed), so the
        silo checks locally to be able to say *why* it will be refused, then tries anyway: the
        aggregator's CA may legitimately differ from ours.
        """
        try:
            verify_issued_by(read_pem(paths.silo_cert(silo_name)), read_pem(paths.ca_cert))
        except PkiError as exc:
            log_event(log, "certificate_check_failed", level=logging.WARNING, silo=silo_name, reason=str(exc))
            return str(exc)
        return None

    @staticmethod
    def check_certificate_name(paths: PkiPaths, silo_name: str) -> None:
        """PkiError (one line) unless ``silo.name`` is the common name of this silo's certificate.

        The aggregator knows a silo by its certificate's common name only; a silo configured under
        another name would otherwise join, and sign its ledger, as someone else without a word."""
        cert = paths.silo_cert(silo_name)
        common_name = certificate_common_name(read_pem(cert))
        if common_name != silo_name:
            log_event(log, "certificate_name_mismatch", level=logging.ERROR, silo=silo_name,
                      common_name=common_name, certificate=str(cert))
            raise PkiError(f"silo.name {silo_name!r} differs from the common name {common_name!r} of its "
                           f"certificate {cert}: the aggregator would know this silo as {common_name!r}")

    def close(self) -> None:
        self.channel.close()

    def _call(self, rpc: str, fn: Callable[[], T], also_retry: frozenset = frozenset()) -> T:
        start, delay, attempt = time.monotonic(), 0.2, 0
        while True:
            attempt += 1
            try:
                return fn()
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else None
                reason = describe_rpc_error(err)
                if self.certificate_problem and "TLS setup" in reason:
                    raise RpcFailure(rpc, code, f"{reason}; local check: {self.certificate_problem}") from None
                if UNTRUSTED_SERVER in reason and "CERTIFICATE_VERIFY_FAILED" in reason:
                    # not a network fault: retrying cannot help, the operator must fix pki_dir/ca.pem
                    raise RpcFailure(rpc, code, f"{reason} (check {self.ca_path}: it must be the CA that issued "
                                                "the aggregator's certificate)") from None
                if ((code not in RETRYABLE and code not in also_retry)
                        or time.monotonic() - start + delay > self.retry_budget_s):
                    raise RpcFailure(rpc, code, reason) from None
                log_event(log, "rpc_retry", level=logging.WARNING, rpc=rpc, attempt=attempt,
                          code=code.name if code else "?", reason=reason, backoff_s=round(delay, 2))
                if self.stop.wait(delay * (0.5 + random.random())):  # SIGTERM/SIGINT: stop retrying
                    raise RpcFailure(rpc, code, f"stopped by a signal while retrying ({reason})")
                delay = min(delay * 2, 5.0)

    def join(self, request: pb.JoinRequest) -> pb.JoinReply:
        self.instance = request.instance
        return self._call("Join", lambda: self.stub.Join(request, timeout=30),
                          also_retry=frozenset({grpc.StatusCode.ALREADY_EXISTS}))

    def get_task(self, run_id: str, wait_s: float = 5.0, instance: str | None = None) -> pb.Task:
        """The next task; ``instance`` (default: the one of the last Join) lets the aggregator stop this
        process if another one has joined under the same name since."""
        request = pb.TaskRequest(run_id=run_id, wait_s=wait_s, instance=self.instance if instance is None else instance)
        return self._call("GetTask", lambda: self.stub.GetTask(request, timeout=wait_s + 30))

    def report_round(self, report: pb.RoundReport) -> pb.Ack:
        return self._call("SubmitReport", lambda: self.stub.SubmitReport(report, timeout=60))

    def download(self, run_id: str, version: int, layout_hash: str, expected: Mapping[str, codec.TensorSpec],
                 encrypted_sums: bool = False) -> tuple[dict[str, np.ndarray], int]:
        request = pb.DownloadRequest(run_id=run_id, round=version, layout_hash=layout_hash,
                                     encrypted_sums=encrypted_sums)

        def fetch() -> tuple[dict[str, np.ndarray], int]:
            assembler = codec.TensorAssembler(expected)
            for chunk in self.stub.DownloadGlobal(request, timeout=self.rpc_timeout_s):
                assembler.add(chunk)
            return assembler.finish(), assembler.bytes_received

        return self._call("DownloadGlobal", fetch)

    def submit(self, header: pb.UpdateHeader, payload: Mapping[str, np.ndarray],
               chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES) -> pb.SubmitReply:
        """Stream an update; after a cut link, resume after the chunks the aggregator kept (UploadStatus)."""
        first = pb.UpdateHeader()
        first.CopyFrom(header)
        digests = codec.tensor_digests(payload)  # once: for the header's payload digest and every (re)sent chunk
        first.payload_sha256 = codec.payload_digest(payload, digests)
        tries = 0

        def send() -> pb.SubmitReply:
            nonlocal tries
            tries += 1
            resume = self.stub.UploadStatus(first, timeout=60).chunks if tries > 1 else 0
            if resume:
                log_event(log, "upload_resumed", round=header.round, chunk=resume)
            head = pb.UpdateHeader()
            head.CopyFrom(first)
            head.resume_chunks = resume

            def messages() -> Iterator[pb.UpdateMessage]:
                yield pb.UpdateMessage(header=head)
                for chunk in itertools.islice(codec.encode(payload, chunk_bytes, digests), resume, None):
                    yield pb.UpdateMessage(chunk=chunk)

            return self.stub.SubmitUpdate(messages(), timeout=self.rpc_timeout_s)

        return self._call("SubmitUpdate", send)

    def submit_shares(self, submission: pb.ShareSubmission) -> pb.Ack:
        return self._call("SubmitShares", lambda: self.stub.SubmitShares(submission, timeout=60))

    def submit_unmask(self, submission: pb.UnmaskSubmission) -> pb.Ack:
        return self._call("SubmitUnmask", lambda: self.stub.SubmitUnmask(submission, timeout=60))

    def submit_check(self, submission: pb.CheckSubmission) -> pb.Ack:
        return self._call("SubmitCheck", lambda: self.stub.SubmitCheck(submission, timeout=60))

    def submit_agreement(self, submission: pb.AgreementSubmission) -> pb.Ack:
        return self._call("SubmitAgreement", lambda: self.stub.SubmitAgreement(submission, timeout=60))

    def decline(self, request: pb.DeclineRequest) -> pb.Ack:
        return self._call("DeclineRound", lambda: self.stub.DeclineRound(request, timeout=60))

    def report(self, report: pb.EvalReport) -> pb.Ack:
        return self._call("ReportEvaluation", lambda: self.stub.ReportEvaluation(report, timeout=60))
