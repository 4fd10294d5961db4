"""The aggregator's run: round machine + global model + strategy + round mode + metrics + checkpoints.

Each attempt's aggregation is a :class:`~aggregator.round_mode.RoundMode` of the configured secure
mode; the coordinator drives its phases without asking which mode it is. Thread-safe (one condition
variable); the gRPC service calls into it from worker threads and a single driver thread advances
time (:meth:`Coordinator.step`). No gRPC types beyond the protobuf messages appear here, so the
round logic is testable without a network.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from aggregator.accumulate import Coefficients, UnitSums, floor_coefficients
from aggregator.checkpoint import (ResumePoint, RunRecord, archive_previous, save_checkpoint, save_ckks_keys,
                                   write_run_record)
from aggregator.ckks_round import CkksKeys, CkksRound
from aggregator.masked_round import MaskedRound
from aggregator.plain_round import PlainRound
from aggregator.round_mode import Next, RoundMode
from aggregator.metrics import DomainPool, MetricsLog, round_stats
from aggregator.rounds import Event, Phase, RoundMachine
from aggregator.status import Traffic, run_status
from aggregator.strategies import SiloReport, Strategy
from aggregator.uploads import UpdateStream, UploadStreams
from crypto.pki import PkiPaths, read_pem
from fcmoe.config import Config
from fcmoe.errors import ConfigError, ProtocolError
from fcmoe.logs import log_event
from fcmoe.model import UnitKey
from fcmoe.model.saved import write_model_record
from fcmoe.plan import RoundPlan, start_version
from protos import codec
from protos import fcmoe_pb2 as pb
from protos.codec import TensorSpec
from protos.plan import to_message as plan_message

log = logging.getLogger(__name__)
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a given run id: it becomes part of key labels and folder names
MEDIAN_EXAMPLES_FACTOR = 10.0  # without aggregator.max_examples: refuse a report over this times the median


class Coordinator:
    def __init__(
        self,
        config: Config,
        layout_hash: str,
        base_fingerprint: str,
        unit_sizes: Mapping[str, int],
        initial_global: Mapping[str, np.ndarray],
        strategy: Strategy,
        output_dir: Path,
        clock: Callable[[], float] = time.time,
        resume: ResumePoint | None = None,
        run_id: str | None = None,
    ):
        fed = config.federation
        self.config = config
        self.layout_hash = layout_hash
        self.base_fingerprint = base_fingerprint
        self.unit_sizes = dict(unit_sizes)
        self.strategy = strategy
        self.output_dir = output_dir
        self.clock = clock
        self.checkpoints = output_dir / "checkpoints"
        self.machine = RoundMachine(
            total_rounds=fed.rounds,
            min_silos=fed.min_silos,
            quorum=fed.effective_quorum,
            round_timeout_s=fed.round_timeout_s,
            join_timeout_s=fed.join_timeout_s,
            max_retries=fed.max_round_retries,
            created_at=clock(),
            upload_timeout_s=fed.upload_timeout_s,
            lease_s=fed.silo_lease_s,
            final_evaluation=fed.evaluation.final,
        )
        self._check_report_fits()
        self.global_units = {k: np.asarray(v, dtype=np.float32) for k, v in initial_global.items()}
        self.metrics = MetricsLog(output_dir)
        self.plan: RoundPlan | None = None
        self._reports: dict[str, SiloReport] = {}
        self._coefficients: Coefficients | None = None
        self.secure = fed.secure_aggregation
        # secure modes: the aggregator checks key adverts against the CA before relaying them
        self._ca_pem = read_pem(PkiPaths(config.aggregator.pki_dir).ca_cert) if self.secure.mode != "none" else b""
        self._round: RoundMode | None = None  # this attempt's aggregation, in the configured mode
        self._ckks_keys = CkksKeys()  # mode ckks: the run's public context and sealed key, once dealt
        self._unmask: pb.UnmaskInstructions | None = None
        self._decrypt: pb.DecryptInstructions | None = None
        self._check: pb.CheckInstructions | None = None  # masking: the consistency check of the open stage
        self._sketch_plan: Coefficients | None = None  # FC-MoE: the weights of the sketch sums
        self._sketch_sums: dict[str, np.ndarray] | None = None  # their unmasked sums, sent back to every silo
        self._agreement: dict[str, dict[str, float]] = {}  # silo -> unit -> its own agreement score
        self._sketch_started = self._sketch_seconds = 0.0
        self._round_started = 0.0
        self._plan_seconds = 0.0
        self._bytes_down: dict[str, int] = {}
        self.traffic = Traffic()  # bytes in per silo and refused RPCs, for the status endpoint
        self._privacy: dict[str, dict[str, float]] = {}  # DP silos' last reported epsilon, for the same
        self.uploads = UploadStreams()  # update streams in flight, and cut ones kept for a resume
        self._cv = threading.Condition()
        if run_id is not None and not RUN_ID.fullmatch(run_id):
            raise ConfigError(f"run id {run_id[:80]!r}: 1 to 64 letters, digits, '_' or '-'")
        if resume is None:
            self.run_id = run_id or uuid.uuid4().hex[:12]
            self._record = RunRecord(self.run_id, layout_hash, base_fingerprint, strategy.name)
            archived = archive_previous(self.checkpoints)  # the first write: every check above has passed
            if archived is not None:
                log_event(log, "previous_run_archived", checkpoints=str(archived))
            self._checkpoint()  # round 0 first: a run record always has a checkpoint to resume from
            write_run_record(self.checkpoints, self._record)
        else:
            self._resume(resume)
        write_model_record(self.checkpoints, config)  # what `fcmoe export` rebuilds the model from

    def _resume(self, point: ResumePoint) -> None:
        """Go on with the run from its last completed round; the interrupted one is redone afresh."""
        self.run_id, self._record = point.record.run_id, point.record
        stopped_by, self._record.outcome = self._record.outcome, ""  # going on: no outcome yet
        saved = point.checkpoint
        if set(saved.global_units) != set(self.unit_sizes):
            raise ConfigError(f"checkpoint round-{saved.version:04d} does not hold this layout's units")
        # in layout order (unit_sizes), never the checkpoint file's: silos decode the stream in that order
        self.global_units = {u: np.asarray(saved.global_units[u], dtype=np.float32) for u in self.unit_sizes}
        try:
            self.strategy.load_state_arrays(saved.strategy_state)
        except ValueError as exc:
            raise ConfigError(f"checkpoint round-{saved.version:04d}: {exc}") from None
        self.metrics.restore(saved.state.get("metrics", []))
        self.machine.resume(saved.version, point.first_attempt)
        if point.ckks_keys is not None:
            self._ckks_keys.restore(*point.ckks_keys)
        log_event(log, "run_resumed", run_id=self.run_id, version=saved.version, next_attempt=point.first_attempt,
                  **({"after": stopped_by} if stopped_by else {}))

    def _check_report_fits(self) -> None:
        """The sketch sums of all units go back to every silo in one task: refuse a configuration they
        cannot fit in."""
        buckets = self.strategy.configure_round(1, self.config.federation.local, 0).sketch_buckets
        size = len(self.unit_sizes) * (4 * buckets + 160) + 64 * 1024
        if buckets and size > codec.MAX_MESSAGE_BYTES:
            raise ConfigError(
                f"federation.strategy.fcmoe.sketch_buckets = {buckets}: the sketch sums of {len(self.unit_sizes)} units "
                f"would take ~{size} bytes, over the {codec.MAX_MESSAGE_BYTES}-byte message limit; use fewer buckets")

    # -- RPC entry points ----------------------------------------------------------------------
    def join(self, silo: str, request: pb.JoinRequest) -> pb.JoinReply:
        if request.layout_hash != self.layout_hash:
            raise ProtocolError(
                f"layout hash {request.layout_hash[:12]!r} != aggregator's {self.layout_hash[:12]!r} "
                "(model or trainable settings differ)", "FAILED_PRECONDITION")
        if request.base_fingerprint != self.base_fingerprint:
            raise ProtocolError("base model weights differ from the aggregator's", "FAILED_PRECONDITION")
        allowed = self.config.aggregator.allowed_silos
        if allowed is not None and silo not in allowed:
            raise ProtocolError(f"silo {silo!r} is not in aggregator.allowed_silos", "PERMISSION_DENIED")
        if request.silo_name and request.silo_name != silo:  # identity is the certificate's, never a field
            log_event(log, "silo_name_mismatch_refused", level=logging.WARNING, silo=silo,
                      configured=request.silo_name[:64])
            raise ProtocolError(f"configured silo name {request.silo_name[:64]!r} differs from the certificate's "
                                f"common name {silo!r}", "PERMISSION_DENIED")
        with self._cv:
            replaced = self.machine.instances.get(silo, "")
            try:
                self.machine.join(silo, self.clock(), request.instance[:64])
            except ProtocolError as exc:
                if exc.status == "ALREADY_EXISTS":
                    log_event(log, "duplicate_silo_refused", level=logging.WARNING, silo=silo, reason=str(exc))
                raise
            self._cv.notify_all()
        if replaced and replaced != request.instance[:64]:
            log_event(log, "silo_process_replaced", level=logging.WARNING, silo=silo,
                      reason="the earlier process fell silent; its tasks are refused from now on")
        log_event(log, "silo_joined", silo=silo, examples=request.num_train_examples)
        return pb.JoinReply(run_id=self.run_id, silo_name=silo, total_rounds=self.config.federation.rounds)

    def task(self, silo: str, request: pb.TaskRequest) -> pb.Task:
        if request.run_id != self.run_id:  # a silo of an earlier run (this aggregator started a new one)
            return pb.Task(kind=pb.Task.JOIN, layout_hash=self.layout_hash,
                           message=f"run {request.run_id[:32]!r} is not this aggregator's run: join again")
        wait_until = self.clock() + max(0.0, min(request.wait_s, 30.0))
        with self._cv:
            if self.machine.stale_instance(silo, request.instance[:64]):  # replaced by a later Join
                log_event(log, "stale_silo_process_refused", level=logging.WARNING, silo=silo)
                raise ProtocolError(f"another process joined as {silo!r} since this one did: this one must stop",
                                    "FAILED_PRECONDITION")
            self.machine.seen(silo, self.clock())
            view = self.machine.task(silo)
            while view.kind == "WAIT" and self.clock() < wait_until:
                self._cv.wait(timeout=max(0.0, wait_until - self.clock()))
                view = self.machine.task(silo)
            self.machine.seen(silo, self.clock())  # live at both ends of the long-poll (duplicate-join window)
            task = pb.Task(kind=pb.Task.Kind.Value(view.kind), round=view.round, layout_hash=self.layout_hash,
                           deadline_unix=view.deadline, message=view.message)
            if view.kind in ("TRAIN", "EVALUATE"):
                task.eval_max_examples = self.config.federation.evaluation.max_examples or 0
            if view.kind == "TRAIN" and self.plan is not None:
                attempt = replace(self.plan, secure_mode=self.secure.mode, session=self.machine.session,
                                  skip_evaluation=not evaluates(view.round, self.config.federation.evaluation.every))
                task.train.CopyFrom(plan_message(attempt))
            if view.kind == "SHARE" and self._round is not None:
                task.share.CopyFrom(self._round.share_instructions())
            if view.kind in ("UPLOAD", "SKETCH"):
                task.upload.CopyFrom(self._upload_instructions(silo))
            if view.kind == "CHECK" and self._check is not None:
                task.check.CopyFrom(self._check)
            if view.kind == "AGREE" and self._sketch_sums is not None:
                task.agree.sketch_sums.extend(codec.encode(self._sketch_sums))
            if view.kind == "UNMASK" and self._unmask is not None:
                task.unmask.CopyFrom(self._unmask)
            if view.kind == "DECRYPT" and self._decrypt is not None:
                task.decrypt.CopyFrom(self._decrypt)
            return task

    def _upload_instructions(self, silo: str) -> pb.UploadInstructions:
        """What ``silo`` multiplies by and, in secure modes, with whom it masks, in this stage."""
        assert self._round is not None
        return self._round.upload_instructions(silo)

    def global_model(self, silo: str, request: pb.DownloadRequest) -> dict[str, np.ndarray]:
        self._check_run(request.run_id)
        self._check_layout(request.layout_hash)
        with self._cv:
            if silo not in self.machine.joined:
                raise ProtocolError(f"silo {silo!r} has not joined this run (join first)", "FAILED_PRECONDITION")
            if request.encrypted_sums:
                if self._round is None or self.machine.phase != Phase.DECRYPTING or request.round != self.machine.round:
                    raise ProtocolError("no encrypted sums to decrypt now")
                return self._round.encrypted_sums(silo)
            if request.round != self.machine.version:
                raise ProtocolError(
                    f"model version {request.round} unavailable (current {self.machine.version})")
            return {u: self.global_units[u] for u in self.unit_sizes}  # the layout's order, whatever the dict's

    def count_download(self, silo: str, nbytes: int) -> None:
        with self._cv:
            self._bytes_down[silo] = self._bytes_down.get(silo, 0) + nbytes

    def add_report(self, silo: str, report: pb.RoundReport) -> None:
        """Phase 1: validate and keep what the strategy needs to weigh this silo."""
        self._check_run(report.run_id)
        self._check_layout(report.layout_hash)
        _check_evaluation(report.evaluation)
        units = list(self.unit_sizes)
        if list(report.units) != units or len(report.routing_share) != len(units):
            raise ProtocolError("report units or routing shares do not match the layout", "INVALID_ARGUMENT")
        refusal = report_refusal(report.num_examples, report.reliability, dict(zip(units, report.routing_share)),
                                 self.config.aggregator.max_examples)
        if refusal:
            log_event(log, "report_refused", level=logging.WARNING, silo=silo, round=report.round, reason=refusal)
            raise ProtocolError(f"report refused: {refusal}", "INVALID_ARGUMENT")
        if len(report.sketches):
            raise ProtocolError("sketches never travel in a report (they are summed in the sketch stage)",
                                "INVALID_ARGUMENT")
        unit_norm = None
        if self.plan is not None and self.plan.report_norms:
            refusal = norm_refusal(list(report.unit_norm), len(units), self.plan.clip_norm)
            if refusal:
                log_event(log, "report_refused", level=logging.WARNING, silo=silo, round=report.round, reason=refusal)
                raise ProtocolError(f"report refused: {refusal}", "INVALID_ARGUMENT")
            unit_norm = dict(zip(units, report.unit_norm))
        elif len(report.unit_norm):
            raise ProtocolError("no unit norms were asked for this round", "INVALID_ARGUMENT")
        privacy = _reported_privacy(report)
        with self._cv:
            self.machine.check(Phase.TRAINING, silo, report.round, self.clock())
            if privacy is not None:
                self._privacy[silo] = privacy | {"round": report.round}
            assert self._round is not None
            self._round.take_advert(silo, report)
            self._reports[silo] = SiloReport(report.num_examples, report.reliability,
                                             dict(zip(units, report.routing_share)), unit_norm)
            self.machine.record(Phase.TRAINING, silo, report.round, self.clock())
            self.metrics.record(start_version(report.round)).global_pool.add(report.evaluation.global_model)
            cur = self.metrics.record(report.round)
            cur.local_pool.add(report.evaluation.local_model)
            cur.per_silo[silo] = {
                "bytes_down": self._bytes_down.get(silo, 0),
                "report_bytes": report.ByteSize(),
                "train_seconds": report.stats.train_seconds,
                "tokens": report.stats.tokens,
                "steps": report.stats.steps,
                "eval_seconds": report.stats.eval_seconds,
                "eval_examples": report.stats.eval_examples,
                "download_seconds": report.stats.download_seconds,
                "reliability": report.reliability,
            }
            self._cv.notify_all()
        self.traffic.add_received(silo, report.ByteSize())
        log_event(log, "report_accepted", silo=silo, round=report.round, bytes=report.ByteSize())

    def begin_update(self, silo: str, header: pb.UpdateHeader) -> UpdateStream:
        """Admit one update stream per silo (each buffers up to a model's size), fresh or resuming an
        interrupted one of the same payload. The caller must call :meth:`end_update` when it ends."""
        self._check_run(header.run_id)
        self._check_layout(header.layout_hash)
        with self._cv:
            phase = self._update_phase()
            self.machine.check(phase, silo, header.round, self.clock())
            specs = self._update_specs(phase, header)
            stream, resumed = self.uploads.admit(silo, self._stream_key(phase, header), specs, header.resume_chunks,
                                                 self.machine.deadline)
        if resumed:
            log_event(log, "update_resumed", silo=silo, round=header.round, chunk=header.resume_chunks)
        return stream

    def _stream_key(self, phase: Phase, header: pb.UpdateHeader) -> tuple:
        return (self.machine.session, phase, bytes(header.payload_sha256), tuple(header.units), tuple(header.sizes))

    def interrupted_update(self, silo: str, stream: UpdateStream) -> None:
        """The link broke mid-stream: keep what arrived, while the phase is open, for a resumed stream."""
        session, phase, payload = stream.key[:3]
        with self._cv:
            if payload and self.machine.phase == phase and self.machine.session == session:
                self.uploads.keep(silo, stream)
        log_event(log, "update_interrupted", level=logging.WARNING, silo=silo, chunks=stream.assembler.chunks_received)

    def upload_status(self, silo: str, header: pb.UpdateHeader) -> pb.UploadProgress:
        """How much of ``header``'s payload an interrupted stream left here (nothing: start over)."""
        self._check_run(header.run_id)
        self._check_layout(header.layout_hash)
        with self._cv:
            if silo not in self.machine.joined:
                raise ProtocolError(f"silo {silo!r} has not joined this run (join first)")
            chunks, nbytes = self.uploads.progress(silo, self._stream_key(self._update_phase(), header))
            return pb.UploadProgress(chunks=chunks, bytes=nbytes)

    def _update_phase(self) -> Phase:
        """Streams carry uploads, sketches (FC-MoE's sketch stage) or, mode ckks, the key holder's sums."""
        phase = self.machine.phase
        return phase if phase in (Phase.DECRYPTING, Phase.SKETCHING) else Phase.UPLOADING

    def _update_specs(self, phase: Phase, header: pb.UpdateHeader) -> dict[str, TensorSpec]:
        expected = {Phase.SKETCHING: ("sketch",), Phase.UPLOADING: ("update", "")}.get(phase, ("",))
        if header.stage not in expected:
            raise ProtocolError(f"a {header.stage or 'unnamed'!r} stream while the aggregator is {phase.value}",
                                "INVALID_ARGUMENT")
        assert self._round is not None
        return self._round.payload_specs(phase, header)

    def end_update(self, silo: str) -> None:
        with self._cv:
            self.uploads.close(silo)

    def add_update(self, silo: str, header: pb.UpdateHeader, payload: Mapping[str, np.ndarray],
                   nbytes: int) -> None:
        """Phase 2: the payload goes into the group sums and nowhere else (or, mode ckks, the key
        holder's decrypted sums are kept for aggregation)."""
        with self._cv:
            now = self.clock()  # one reading: a payload is either refused or counted, never both
            phase = self._update_phase()
            self.machine.check(phase, silo, header.round, now)
            assert self._round is not None
            self._round.take_payload(phase, silo, payload, header)
            self.machine.record(phase, silo, header.round, now)
            stats = self.metrics.record(header.round).per_silo.setdefault(silo, {})
            what = {Phase.UPLOADING: "bytes_up", Phase.SKETCHING: "sketch_bytes"}.get(phase, "decryption_bytes")
            stats[what] = nbytes
            if self.secure.mode != "none" and np.isfinite(header.secure_seconds) and header.secure_seconds >= 0:
                stats["secure_seconds"] = header.secure_seconds
            self._cv.notify_all()
        self.traffic.add_received(silo, nbytes)
        what = {Phase.UPLOADING: "update", Phase.SKETCHING: "sketch"}.get(phase, "decryption")
        log_event(log, f"{what}_accepted", silo=silo, round=header.round, bytes=nbytes)

    def add_shares(self, silo: str, submission: pb.ShareSubmission) -> None:
        """Secure modes, SHARE phase: sealed shares and secrets to relay; the aggregator cannot open them."""
        self._secure_answer(Phase.SHARING, silo, submission, lambda secure: secure.add_shares(silo, submission))
        log_event(log, "shares_accepted", silo=silo, round=submission.round, shares=len(submission.shares))

    def add_unmask(self, silo: str, submission: pb.UnmaskSubmission) -> None:
        """Masking, UNMASK phase: one survivor's revealed shares."""
        self._secure_answer(Phase.UNMASKING, silo, submission, lambda secure: secure.add_reveal(silo, submission))
        log_event(log, "unmask_shares_accepted", silo=silo, round=submission.round)

    def add_check(self, silo: str, submission: pb.CheckSubmission) -> None:
        """Masking, CHECK phase: a survivor's signature over the stage's view and survivor list."""
        self._secure_answer(Phase.CHECKING, silo, submission, lambda secure: secure.add_check(silo, submission))
        log_event(log, "consistency_signature_accepted", silo=silo, round=submission.round)

    def _secure_answer(self, phase: Phase, silo: str, submission, take: Callable[[RoundMode], None]) -> None:
        """One silo's answer to a secure-aggregation phase: checked against the round, handed to this
        attempt's round (which refuses a phase its mode has not), recorded and counted."""
        self._check_run(submission.run_id)
        with self._cv:
            now = self.clock()
            self.machine.check(phase, silo, submission.round, now)
            assert self._round is not None
            take(self._round)
            self.machine.record(phase, silo, submission.round, now)
            self._count_secure_bytes(silo, submission.round, submission.ByteSize())
            self._cv.notify_all()

    def add_agreement(self, silo: str, submission: pb.AgreementSubmission) -> None:
        """AGREE phase: a silo's own agreement score per unit, against the unmasked sketch sums."""
        self._check_run(submission.run_id)
        units = list(self.unit_sizes)
        scores = list(submission.agreement)
        if list(submission.units) != units or len(scores) != len(units):
            raise ProtocolError("agreement units do not match the layout", "INVALID_ARGUMENT")
        if not all(np.isfinite(scores)) or min(scores) < -1 or max(scores) > 1:
            raise ProtocolError("agreement scores must lie in [-1, 1]", "INVALID_ARGUMENT")
        with self._cv:
            now = self.clock()
            self.machine.check(Phase.AGREEING, silo, submission.round, now)
            self._agreement[silo] = dict(zip(units, scores))
            self.machine.record(Phase.AGREEING, silo, submission.round, now)
            self._cv.notify_all()
        log_event(log, "agreement_accepted", silo=silo, round=submission.round)

    def _count_secure_bytes(self, silo: str, round_: int, nbytes: int) -> None:
        stats = self.metrics.record(round_).per_silo.setdefault(silo, {})
        stats["secure_bytes"] = stats.get("secure_bytes", 0) + nbytes
        self.traffic.add_received(silo, nbytes)

    def decline(self, silo: str, request: pb.DeclineRequest) -> None:
        """A silo will not train this round (e.g. its privacy budget); the round goes on without it."""
        self._check_run(request.run_id)
        reason = request.reason[:500]
        with self._cv:
            self.machine.decline(silo, request.round, self.clock())
            self.metrics.record(request.round).per_silo[silo] = {"declined": reason}
            self._cv.notify_all()
        log_event(log, "round_declined", level=logging.WARNING, silo=silo, round=request.round, reason=reason)

    def add_evaluation(self, silo: str, report: pb.EvalReport) -> None:
        self._check_run(report.run_id)
        self._check_layout(report.layout_hash)
        _check_evaluation(report.evaluation)
        with self._cv:
            self.machine.record_evaluation(silo, report.round)
            self.metrics.record(report.round).global_pool.add(report.evaluation.global_model)
            self._cv.notify_all()
        log_event(log, "evaluation_received", silo=silo, version=report.round)

    # -- driver --------------------------------------------------------------------------------
    def step(self) -> Event | None:
        """Advance time once; run aggregation when a round closes. Called by one driver thread."""
        with self._cv:
            event = self.machine.poll(self.clock())
            if self.machine.missing:  # a phase closed (or failed) at its deadline without these silos
                log_event(log, "phase_closed", level=logging.WARNING, round=self.machine.round,
                          phase=self.machine.missing_phase, missing=",".join(sorted(self.machine.missing)))
                self.machine.missing = frozenset()
            if event in (Event.ROUND_STARTED, Event.ROUND_RETRY):
                self._open_round(event)
            elif event in (Event.REPORTS_CLOSED, Event.SHARES_CLOSED, Event.SKETCHES_CLOSED, Event.CHECK_CLOSED,
                           Event.AGREEMENT_CLOSED, Event.UPLOADS_CLOSED, Event.UNMASK_CLOSED, Event.DECRYPT_CLOSED):
                try:
                    self._next_phase(event)
                except ProtocolError as exc:
                    self._fail(str(exc))
            elif event == Event.EVALUATION_STARTED:
                self._open_evaluation()
            elif event in (Event.FINISHED, Event.ABORTED):
                self._finish(event)
            if event is not None:
                self._cv.notify_all()
            return event

    def wait_for_activity(self, timeout_s: float) -> None:
        """Sleep until a silo's message (or ``timeout_s`` for deadlines): a phase closes as soon as its
        last answer arrives, not at the next tick."""
        with self._cv:
            self._cv.wait(timeout=timeout_s)

    def status(self) -> dict:
        """The run as the status endpoint shows it (aggregator/status.py), read under the lock."""
        with self._cv:
            return run_status(self.machine, self.clock(), run_id=self.run_id, strategy=self.strategy.name,
                              mode=self.secure.mode, min_group_size=self.config.federation.min_group_size,
                              rows=self.metrics.rows(), traffic=self.traffic, privacy=self._privacy)

    @property
    def done(self) -> bool:
        with self._cv:
            return self.machine.phase == Phase.DONE

    def _open_round(self, event: Event) -> None:
        m = self.machine
        self.plan = self.strategy.configure_round(m.round, self.config.federation.local, self.config.run.seed)
        self._reports, self._coefficients = {}, None
        self._sketch_plan, self._sketch_sums, self._agreement, self._check = None, None, {}, None
        self._sketch_started = self._sketch_seconds = 0.0
        self._plan_seconds = 0.0
        self.uploads.forget_interrupted()
        self._unmask, self._decrypt = None, None
        self._round = self._new_round()
        self._round_started = self.clock()
        self._bytes_down = {}
        self.metrics.record(start_version(m.round)).global_pool = DomainPool()  # a retried round reports afresh
        current = self.metrics.record(m.round)
        current.local_pool, current.per_silo = DomainPool(), {}
        # on disk before any task of this attempt goes out: a restart never reuses its session
        self._record.round, self._record.attempt = m.round, m.attempt
        write_run_record(self.checkpoints, self._record)
        log_event(log, event.value, round=m.round, participants=len(m.participants),
                  deadline_s=round(m.deadline - self.clock(), 1), attempt=m.attempt + 1)

    def _open_evaluation(self) -> None:
        m = self.machine
        if not self.config.federation.evaluation.final:  # the machine finishes at its next poll
            log_event(log, "final_evaluation_skipped", version=m.version, reason="federation.evaluation.final is false")
            return
        self.metrics.record(m.version).global_pool = DomainPool()  # every silo evaluates afresh
        log_event(log, Event.EVALUATION_STARTED.value, version=m.version, silos=len(m.participants))

    def _new_round(self) -> RoundMode:
        """Fresh state for this attempt in the configured mode (new keys, seeds and sums)."""
        args = (self.run_id, self.machine.session, self.unit_sizes, self.secure,
                self.config.federation.min_group_size, self._ca_pem)
        if self.secure.mode == "masking":
            return MaskedRound(*args)
        if self.secure.mode == "ckks":
            return CkksRound(*args, keys=self._ckks_keys)
        return PlainRound(self.unit_sizes, self.config.federation.min_group_size)

    def _next_phase(self, event: Event) -> None:
        """A collecting phase closed: plan and open the next one, or aggregate the round.

        Reports -> [shares] -> [sketches -> (check -> unmask) -> agreement] -> uploads ->
        [check -> unmask | decrypt] -> aggregate: the bracketed steps run in secure modes, and the
        sketch stage when the strategy asks for sketches (FC-MoE) and the mode can sum them (not ckks)."""
        m, now, timeout = self.machine, self.clock(), self.secure.phase_timeout_s
        mode = self._round
        assert mode is not None
        self.uploads.forget_interrupted()  # what a closed phase left unfinished is never resumed
        if event == Event.REPORTS_CLOSED:
            if evaluates(m.round, self.config.federation.evaluation.every):
                log_event(log, "global_evaluated", version=start_version(m.round), silos=len(m.reported),
                          global_loss=self.metrics.record(start_version(m.round)).global_pool.mean())
            self._refuse_outlying_reports()
            if mode.has_sharing:
                minimum = mode.start_sharing(set(self._reports), m.quorum)
                m.open_phase(Phase.SHARING, set(self._reports), minimum, now, timeout)
            else:
                self._open_sketches_or_uploads(set(self._reports))
        elif event == Event.SHARES_CLOSED:
            if self._ckks_keys.public_bytes and not self._ckks_keys.saved:  # mode ckks, the run's first keys
                save_ckks_keys(self.checkpoints, self._ckks_keys.public_bytes, self._ckks_keys.sealed_secret)
                self._ckks_keys.saved = True  # before anything is encrypted under it
            self._open_sketches_or_uploads(m.answered[Phase.SHARING])
        elif event in (Event.SKETCHES_CLOSED, Event.UPLOADS_CLOSED):
            step = mode.after_stage()
            if step == Next.CHECK:
                self._open_check()
            elif step == Next.DECRYPT:
                self._decrypt = mode.decrypt_instructions()
                m.open_phase(Phase.DECRYPTING, [mode.key_holder], 1, now, timeout)
                log_event(log, "decryption_requested", round=m.round, key_holder=mode.key_holder,
                          sums=len(self._decrypt.sums))
            else:
                self._stage_summed(mode)
        elif event == Event.CHECK_CLOSED:
            self._unmask = mode.unmask_instructions()
            m.open_phase(Phase.UNMASKING, mode.signers, mode.threshold, now, timeout)
            log_event(log, "unmask_requested", round=m.round, stage=mode.stage, survivors=len(self._unmask.survivors),
                      dropped=len(self._unmask.dropped), signatures=len(self._unmask.signatures))
        elif event == Event.AGREEMENT_CLOSED:
            self._open_uploads(m.answered[Phase.AGREEING])
        else:  # UNMASK_CLOSED or DECRYPT_CLOSED: the stage's sums are open
            self._stage_summed(mode)

    def _stage_summed(self, mode: RoundMode) -> None:
        """The open stage's group sums are known: the sketch sums go back to the silos, the update sums
        make the next global model."""
        if mode.stage == "sketch":
            self._open_agreement(mode.result(), mode.members)
        else:
            self._close_round(mode.result(), len(mode.members))

    def _refuse_outlying_reports(self) -> None:
        """Without an operator's cap, a report claiming over 10x the round's median sample count would
        take (nearly) all the weight: it is left out of the round, with one log line."""
        if self.config.aggregator.max_examples is not None or len(self._reports) < 3:
            return
        cap = MEDIAN_EXAMPLES_FACTOR * float(np.median([r.num_examples for r in self._reports.values()]))
        for silo, report in sorted(self._reports.items()):
            if report.num_examples > cap:
                del self._reports[silo]
                log_event(log, "report_refused", level=logging.WARNING, silo=silo, round=self.machine.round,
                          reason=f"num_examples {report.num_examples:g} is over {MEDIAN_EXAMPLES_FACTOR:g}x the "
                                 f"round's median ({cap:g}); set aggregator.max_examples to allow it")

    def _open_sketches_or_uploads(self, silos: set[str]) -> None:
        """FC-MoE sums importance-weighted sketches first (not in mode ckks, which cannot sum them
        unseen by the key holder); every other strategy goes straight to uploads."""
        m, mode = self.machine, self._round
        assert mode is not None
        reports = {s: r for s, r in self._reports.items() if s in silos}
        if not (self.plan and self.plan.sketch_buckets) or not mode.can_sketch:
            self._open_uploads(silos)
            return
        self._sketch_started = self.clock()
        self._sketch_plan = self._floored(self.strategy.sketch_weights(m.round, list(self.unit_sizes), reports))
        asked, minimum = mode.start_stage("sketch", set(reports), self._sketch_plan, self._clip_norm(), m.quorum,
                                          self.plan.sketch_buckets)
        m.open_phase(Phase.SKETCHING, asked, minimum, self.clock(), m.upload_timeout_s)

    def _floored(self, plan: Coefficients) -> Coefficients:
        """Every plan, in every mode, with no member under ``min_weight_ratio`` of its group's largest
        (the silos' weight policy); secure rounds floor again after merging groups (plan_groups)."""
        return floor_coefficients(plan, self.secure.min_weight_ratio)

    def _open_check(self) -> None:
        mode, m = self._round, self.machine
        assert mode is not None
        self._check = mode.check_instructions()
        m.open_phase(Phase.CHECKING, self._check.survivors, mode.threshold, self.clock(), self.secure.phase_timeout_s)
        log_event(log, "consistency_check_requested", round=m.round, stage=mode.stage,
                  survivors=len(self._check.survivors), dropped=len(self._check.dropped))

    def _open_agreement(self, sums: UnitSums, contributors: frozenset[str]) -> None:
        """Send every contributor the sketch sums; each answers with its own agreement scores."""
        assert self._round is not None
        self._sketch_sums = {u: groups[0].vector.astype(np.float32) for u, groups in sums.items() if 0 in groups}
        m = self.machine
        m.open_phase(Phase.AGREEING, contributors, max(m.quorum, self._round.threshold), self.clock(),
                     self.secure.phase_timeout_s)
        log_event(log, "sketch_sums_sent", round=m.round, silos=len(contributors))

    def _open_uploads(self, silos: set[str]) -> None:
        m, mode = self.machine, self._round
        assert mode is not None
        if self._sketch_started:  # FC-MoE's sketch stage: from its opening to the coefficients
            self._sketch_seconds = self.clock() - self._sketch_started
        reports = {s: r for s, r in self._reports.items() if s in silos}
        started = time.perf_counter()
        self._coefficients = self._floored(self.strategy.coefficients(m.round, list(self.unit_sizes), reports,
                                                                      self._agreement or None))
        self._plan_seconds = time.perf_counter() - started
        log_event(log, "coefficients_planned", round=m.round, silos=len(reports), **self.strategy.diagnostics)
        asked, minimum = mode.start_stage("update", set(reports), self._coefficients, self._clip_norm(), m.quorum)
        m.open_phase(Phase.UPLOADING, asked, minimum, self.clock(), m.upload_timeout_s)

    def _clip_norm(self) -> float:
        return self.plan.clip_norm if self.plan else 0.0

    def _fail(self, reason: str) -> None:
        """This attempt cannot complete: redo the round (fresh keys and masks) or give up; nothing applied."""
        event = self.machine.fail_round(self.clock(), reason)
        log_event(log, "round_failed", level=logging.ERROR, round=self.machine.round, reason=reason,
                  next=event.value)
        if event == Event.ROUND_RETRY:
            self._open_round(event)
        else:
            self._finish(event)

    def _close_round(self, sums: UnitSums, contributors: int) -> None:
        m = self.machine
        try:
            started = time.perf_counter()
            new_global = self.strategy.aggregate(m.round, self.global_units, sums)
            aggregate_seconds = time.perf_counter() - started
            bad = next((u for u, v in new_global.items() if not np.all(np.isfinite(v))), None)
            if bad is not None:
                raise ProtocolError(f"aggregate of unit {bad} is not finite")
        except (ValueError, FloatingPointError) as exc:
            raise ProtocolError(f"aggregation failed ({exc})") from None
        self.global_units = new_global
        elapsed = self.clock() - self._round_started
        rec = self.metrics.record(m.round)
        rec.stats = round_stats(rec.per_silo, contributors, elapsed, self.strategy.diagnostics,
                                secure_seconds=self._round.seconds if self._round is not None else 0.0,
                                plan_seconds=self._plan_seconds, sketch_stage_seconds=self._sketch_seconds,
                                aggregate_seconds=aggregate_seconds)
        m.complete_round(self.clock())
        self._checkpoint()
        self.metrics.write()
        # the new model's loss is known once silos evaluate it (event global_evaluated, next round)
        log_event(log, "round_closed", round=m.version, version=m.version, updates=contributors,
                  seconds=round(elapsed, 3))
        if m.phase == Phase.TRAINING:
            self._open_round(Event.ROUND_STARTED)
        else:
            self._open_evaluation()

    def _finish(self, event: Event) -> None:
        self._record.finished, self._record.outcome = event == Event.FINISHED, self.machine.outcome
        write_run_record(self.checkpoints, self._record)  # an aborted run can be resumed, a finished one not
        self.metrics.write()
        if self.metrics.records:
            self.metrics.plot()
        finished = event == Event.FINISHED
        log_event(log, "run_" + event.value, level=logging.INFO if finished else logging.ERROR,
                  outcome=self.machine.outcome, version=self.machine.version,
                  global_loss=self.metrics.record(self.machine.version).global_pool.mean(),
                  **({} if finished else {"to_go_on": f"fix the cause, then start the aggregator again with --resume "
                                                      f"(from round {self.machine.version})"}))

    def _checkpoint(self) -> None:
        state = {"run_id": self.run_id, "version": self.machine.version, "layout_hash": self.layout_hash,
                 "strategy": self.strategy.name, "base_fingerprint": self.base_fingerprint,
                 "metrics": self.metrics.state()}
        save_checkpoint(self.checkpoints, self.machine.version, self.global_units, self.strategy.state_arrays(),
                        state, keep_newest=self.config.aggregator.keep_checkpoints, best=self._best_version())

    def _best_version(self) -> int | None:
        """The version whose global model the silos measured lowest, once any was measured."""
        losses = {v: r.global_pool.mean() for v, r in self.metrics.records.items()}
        measured = {v: loss for v, loss in losses.items() if loss is not None}
        return min(measured, key=measured.__getitem__) if measured else None

    def _check_run(self, run_id: str) -> None:
        if run_id != self.run_id:
            raise ProtocolError(f"unknown run id {run_id!r} (join first)", "FAILED_PRECONDITION")

    def _check_layout(self, layout_hash: str) -> None:
        if layout_hash != self.layout_hash:
            raise ProtocolError(f"layout hash {layout_hash[:12]!r} does not match", "FAILED_PRECONDITION")


def evaluates(round_: int, every: int) -> bool:
    """Whether round ``round_`` evaluates the global model it receives (version ``round_ - 1``):
    versions 0, every, 2 * every, ... (federation.evaluation.every); the final model is evaluated
    by the final evaluation (federation.evaluation.final)."""
    return start_version(round_) % every == 0


MAX_DOMAINS = 256
MAX_DOMAIN_NAME = 64


def _reported_privacy(report: pb.RoundReport) -> dict[str, float] | None:
    """A DP silo's reported spending, checked for range (it is shown, never used), or None."""
    if not report.HasField("privacy"):
        return None
    p = report.privacy
    if not (np.isfinite(p.epsilon) and np.isfinite(p.epsilon_budget) and 0 <= p.epsilon and 0 < p.epsilon_budget
            and 0 < p.delta < 1):
        raise ProtocolError("report.privacy: epsilon, epsilon_budget or delta out of range", "INVALID_ARGUMENT")
    return {"epsilon": p.epsilon, "epsilon_budget": p.epsilon_budget, "delta": p.delta}


def _check_evaluation(evaluation: pb.Evaluation) -> None:
    """Bound what a silo's evaluation can make the aggregator store and compute."""
    for name, entries in (("global_model", evaluation.global_model), ("local_model", evaluation.local_model)):
        if len(entries) > MAX_DOMAINS:
            raise ProtocolError(f"evaluation.{name}: {len(entries)} domains, at most {MAX_DOMAINS}", "INVALID_ARGUMENT")
        for e in entries:
            if not 0 < len(e.domain) <= MAX_DOMAIN_NAME or e.tokens <= 0 or not np.isfinite(e.loss_sum) or e.loss_sum < 0:
                raise ProtocolError(f"evaluation.{name}: bad entry for domain {e.domain[:MAX_DOMAIN_NAME]!r}",
                                    "INVALID_ARGUMENT")


SHARE_TOLERANCE = 1e-3


def norm_refusal(norms: list[float], num_units: int, clip_norm: float) -> str | None:
    """Why a report's unit norms (importance_measure activation_norm) cannot be weighed, or None: one per
    unit, finite, non-negative and, with a clip, at most the clip (they are norms of clipped deltas)."""
    if len(norms) != num_units:
        return f"{len(norms)} unit norms for {num_units} units (the round asked for one per unit)"
    if not all(np.isfinite(norms)) or min(norms, default=0.0) < 0:
        return "a unit norm that is negative or not finite"
    if clip_norm > 0 and max(norms, default=0.0) > clip_norm * (1 + 1e-5):
        return f"a unit norm {max(norms):g} over the clip {clip_norm:g}"
    return None


def report_refusal(num_examples: float, reliability: float, routing_share: Mapping[str, float],
                   max_examples: float | None) -> str | None:
    """Why a report cannot be weighed, or None: every number a silo reports steers its weight, so each
    is held to what an honest silo can report. Routing shares are fractions of a layer's routing mass:
    each in [0, 1] and at most 1 per layer (the meter normalises each layer to 1; 0 where nothing was
    metered, e.g. under DP)."""
    numbers = [num_examples, reliability, *routing_share.values()]
    if not all(np.isfinite(numbers)):
        return "a non-finite number"
    if num_examples <= 0 or (max_examples is not None and num_examples > max_examples):
        return f"num_examples {num_examples:g} outside (0, {max_examples if max_examples is not None else float('inf'):g}]"
    if not 0 <= reliability <= 1:
        return f"reliability {reliability:g} outside [0, 1]"
    per_layer: dict[int, float] = {}
    for unit, share in routing_share.items():
        if not 0 <= share <= 1:
            return f"routing share {share:g} of unit {unit} outside [0, 1]"
        key = UnitKey.parse(unit)
        if key.is_expert:
            per_layer[key.layer] = per_layer.get(key.layer, 0.0) + share
    layer, total = max(per_layer.items(), key=lambda kv: kv[1], default=(0, 0.0))
    if total > 1 + SHARE_TOLERANCE:
        return f"routing shares of layer {layer} sum to {total:.4g}, over 1"
    return None
