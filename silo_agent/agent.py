"""The silo agent's main loop: join, then train / evaluate whatever round the aggregator opens."""

from __future__ import annotations

import logging
import math
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NoReturn, TypeVar

import numpy as np
import torch
from torch import nn

from crypto.secagg import SecAggError
from crypto.signed_log import Receipt
from crypto.sketch import own_agreement, sketch_units
from fcmoe.config import Config, SiloConfig
from fcmoe.errors import ConfigError, FcMoeError, PkiError, RunError
from fcmoe.fileio import check_writable_folder
from fcmoe.logs import log_event, setup_logging
from fcmoe.model import (ExpertLayout, base_fingerprint, build_model, checkpoint_activations, load_trainable_state,
                         trainable_state)
from fcmoe.model.saved import SILO_FINAL, model_record, save_silo_model, silo_folder
from fcmoe.model.stream import CheckpointStream
from fcmoe.plan import RoundPlan, start_version
from fcmoe.signals import StopRequest
from protos import codec
from protos import fcmoe_pb2 as pb
from protos.plan import from_message as plan_from_message
from silo_agent.ckks_round import CkksSession
from silo_agent.client import AggregatorClient, RpcFailure
from silo_agent.data.loading import load_data
from silo_agent.distributed import (RankSetup, SiloRanks, check_world_size, rank_device, serve_rank, torchrun_rank,
                                    world_size_of)
from silo_agent.dp.importance import norm_shares
from silo_agent.dp.trainer import DpTrainer
from silo_agent.dp.training import check_private_step
from silo_agent.evaluation import domain_losses, mean_loss, reliability
from silo_agent.masked_round import MaskingSession
from silo_agent.personal import PersonalAdapter
from silo_agent.projection import (GlobalHistory, ResidualBook, instruction_refusal, opposed_units, project_units,
                                   reanchor)
from silo_agent.retention import anchor, importance_scale
from silo_agent.round_mode import PlainRound, RunKeys, SiloRound
from silo_agent.routing import RoutingMeter
from silo_agent.training import evaluate, train_locally
from silo_agent.update import clip_units, unit_deltas

log = logging.getLogger(__name__)
T = TypeVar("T")
ROUND_MODES: dict[str, type[SiloRound]] = {"none": PlainRound, "masking": MaskingSession, "ckks": CkksSession}


@dataclass
class TrainedRound:
    """One round's training outcome, kept so that a redone attempt of the same round from the same
    global model (a dropout, an aggregator restart) resends it instead of training again: under DP a
    second training would be a second release of the same round."""

    key: tuple[str, int, bytes, bytes]  # run, round, global model digest, training instructions
    deltas: dict[str, np.ndarray]
    report: pb.RoundReport  # without this attempt's key advert
    clip_norm: float = 0.0  # the deltas' clip; sketches are clipped to it too (bounded masked sums)
    # a sum with this round's update or sketch in it was unmasked: resending it in a redo would let the
    # aggregator read it from the difference of two sums, so a redo trains afresh (under DP: a second release)
    exposed: bool = False
    retrain: int = 0  # how many times this round was trained afresh after an unmask (varies the seed)

    @property
    def round(self) -> int:
        return self.key[1]


@dataclass
class RunState:
    """What a silo keeps from round to round of the run it is in; a new run starts from a fresh one.
    None of it leaves the silo as such: the aggregator sees only what each report and upload carry."""

    local_units: dict[str, np.ndarray] | None = None  # this silo's model after its last training
    local_shares: dict[str, float] | None = None  # its routing shares then (retention by importance)
    last_reliability: float | None = None  # from the last round that evaluated (federation.evaluation)
    adapter: PersonalAdapter | None = None  # retention: this silo's personal adapter, never uploaded
    # silo-side projection (FC-MoE's paper variant): the last two globals (their difference is the
    # consensus direction) and what the projection removed per round (re-anchored next round)
    globals_seen: GlobalHistory = field(default_factory=GlobalHistory)
    residuals: ResidualBook = field(default_factory=ResidualBook)
    conflicts: dict[int, tuple[int, int]] = field(default_factory=dict)  # silo.measure_conflict: round -> counts
    trained: TrainedRound | None = None  # the last training, resent by a redone attempt of its round
    run_keys: RunKeys = field(default_factory=RunKeys)  # secure modes: the run secret, the CKKS key
    # the current attempt
    secure: SiloRound | None = None  # its aggregation state, while this silo takes part
    pending: TrainedRound | None = None  # trained and reported, not uploaded yet
    weighted_sketches: dict[str, np.ndarray] = field(default_factory=dict)  # FC-MoE: w * sketch, scored against the sum
    refused_session: int | None = None  # an attempt this silo refused to take part in


def training_key(run_id: str, task: pb.Task, global_units: dict[str, np.ndarray]) -> tuple[str, int, bytes, bytes]:
    """What makes two attempts the same training: run, round, global model and instructions (the
    attempt's session aside) — an operator who changed the settings before a restart gets a new one."""
    instructions = pb.TrainInstructions()
    instructions.CopyFrom(task.train)
    instructions.session = 0
    return run_id, task.round, codec.payload_digest(global_units), instructions.SerializeToString(deterministic=True)


class SiloAgent:
    """One silo: its model, data and training ranks for the life of the process, a :class:`RunState` for
    the run it is in, and one task of the aggregator's at a time (:meth:`handle`)."""

    def __init__(self, config: Config, progress: bool = False, transport=None):
        if config.silo is None:
            raise ConfigError("silo section missing: a silo needs silo.name, silo.aggregator and silo.pki_dir")
        self.config = config
        self.silo = config.silo
        self.progress = progress
        if self.silo.threads:
            torch.set_num_threads(self.silo.threads)
        self.device = torch.device(self.silo.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"silo.device = {self.silo.device!r}: CUDA is not available on this machine")
        check_world_size(self.silo)
        if self.silo.dp.enabled:  # before joining: a silo that cannot record a release must not train
            check_writable_folder(self.silo.dp.ledger.parent, "silo.dp.ledger")
        if self.silo.save != "none":  # silo.save keeps this silo's models in run.output_dir/silo-NAME
            check_writable_folder(config.run.output_dir, "run.output_dir")
        # the gRPC client, or anything with its methods (fcmoe.launch.inprocess for many-run experiments); first,
        # so that a missing certificate is named before minutes of model and data loading
        self.client = transport or _client(self.silo)
        self.world_size = world_size_of(self.silo)
        if self.world_size > 1 and self.silo.dp.enabled:
            raise ConfigError(f"silo.dp.enabled with {self.world_size} processes: DP-SGD trains in one process")
        sharded = self.world_size > 1 and self.silo.parallel == "fsdp"
        source: nn.Module | CheckpointStream
        if sharded and config.model.source == "local":
            # read layer by layer while the ranks take their shards: no process ever holds the whole model
            source = CheckpointStream(config.model, seed=config.run.seed)
            shapes = source.model
        else:  # sharded, a built-in model is built on the host only to be handed out: no GPU holds it whole
            source = shapes = build_model(config.model, torch.device("cpu") if sharded else self.device,
                                          seed=config.run.seed)
            if self.silo.activation_checkpointing:
                checkpoint_activations(source)
        self.layout = ExpertLayout.from_model(shapes)
        self.meter = RoutingMeter()
        self.specs = {k: codec.TensorSpec("float32", (n,)) for k, n in self.layout.unit_sizes().items()}
        self.data = load_data(config)
        # the silo's training ranks, started once: each builds its model once and keeps it across rounds; they
        # own the agent's model from then on (under fsdp rank 0's shard of it)
        self.ranks = (SiloRanks(source, RankSetup.of(config), self.data.train, self.device, progress)
                      if self.world_size > 1 else None)
        # of the frozen base, which never changes: taken while it is whole here (a stream digested each tensor as
        # the ranks took it)
        self.fingerprint = source.fingerprint() if isinstance(source, CheckpointStream) else base_fingerprint(source)
        self._model = source if self.ranks is None else None
        del source, shapes
        self.run_id = ""
        self.total_rounds = 0
        self.state = RunState()  # what this silo keeps of the run it is in
        self.evaluated_examples = 0  # held-out examples run through a model so far (every pass), for the reports
        self.dp = DpTrainer(self.silo.dp, self.silo.pki_dir, self.silo.name) if self.silo.dp.enabled else None
        if self.dp is not None:
            check_private_step(self.model, self.device)
        # this process's id: the aggregator refuses a second live process under this silo's name
        self.instance = secrets.token_hex(8)

    @property
    def model(self) -> nn.Module:
        """The model this silo evaluates and trains: its own, or the one its ranks hold for it."""
        if self.ranks is not None:
            return self.ranks.model
        assert self._model is not None
        return self._model

    def join(self) -> None:
        """Join the aggregator's run; again whenever it asks (it restarted): a resumed run keeps this
        silo's run state (run secret, CKKS key, last training), a new run starts from nothing. A DP
        silo whose ledger falls short of the newest receipt the aggregator holds for it (cut or
        rewritten since) stops here with LedgerError: it would resume a smaller epsilon than it spent."""
        reply = self.client.join(pb.JoinRequest(
            layout_hash=self.layout.hash, base_fingerprint=self.fingerprint,
            num_train_examples=self.data.num_train, agent_version="0.1.0", silo_name=self.silo.name,
            instance=self.instance))
        if self.dp is not None and reply.HasField("ledger_receipt"):
            # the aggregator vouches for a ledger at least this long: never train from a cut one
            r = reply.ledger_receipt
            try:
                self.dp.ledger.check_receipt(Receipt(r.silo, r.run_id, r.round, r.length, r.head_hash,
                                                     bytes(r.signature)), reply.run_id)
            except FcMoeError as exc:
                log_event(log, "ledger_receipt_mismatch", level=logging.ERROR, reason=str(exc))
                raise
        again = bool(self.run_id)
        if again and reply.run_id != self.run_id:
            self.state = RunState()  # another run: nothing of the last one carries over
        self.run_id = reply.run_id
        self.total_rounds = reply.total_rounds
        log_event(log, "rejoined" if again else "joined", silo=reply.silo_name, run_id=reply.run_id,
                  rounds=reply.total_rounds, layout=self.layout.hash[:12], train_examples=self.data.num_train)

    def handle(self, task: pb.Task) -> int | None:
        """Do one task; returns the exit status once the run is over, else None."""
        if task.kind == pb.Task.JOIN:
            self.join()
        elif task.kind == pb.Task.TRAIN:
            if task.train.session == self.state.refused_session and task.train.session:
                self._wait_out(task)
            else:
                self._train_and_report(task)
                if self.silo.save == "every_round":
                    self._save_model(f"round-{task.round:04d}")
        elif task.kind == pb.Task.SHARE:
            self._share(task)
        elif task.kind == pb.Task.SKETCH:
            self._sketch(task)
        elif task.kind == pb.Task.AGREE:
            self._agree(task)
        elif task.kind == pb.Task.UPLOAD:
            self._upload(task)
        elif task.kind == pb.Task.CHECK:
            self._check(task)
        elif task.kind == pb.Task.UNMASK:
            self._reveal(task)
        elif task.kind == pb.Task.DECRYPT:
            self._decrypt(task)
        elif task.kind == pb.Task.EVALUATE:
            self._final_evaluation(task)
        elif task.kind == pb.Task.DONE:
            log_event(log, "run_done", outcome=task.message)
            if self.silo.save != "none":
                self._save_model(SILO_FINAL)
            return 0 if not task.message.startswith("aborted") else 1
        return None

    def run(self, stop: threading.Event | None = None) -> int:
        """Take tasks until the run is over; ``stop`` (SIGTERM/SIGINT) ends it between two tasks, so a
        ledger entry, report or upload is never left half done and a restarted silo simply rejoins."""
        if stop is not None and isinstance(self.client, AggregatorClient):
            self.client.stop = stop  # a signal also ends retrying against an aggregator that is down
        try:
            self.join()
            while stop is None or not stop.is_set():
                status = self.handle(self.client.get_task(self.run_id, wait_s=5.0, instance=self.instance))
                if status is not None:
                    return status
            log_event(log, "silo_stopped", level=logging.WARNING, reason="signal", run_id=self.run_id,
                      to_go_on="start the silo again with the same command: it rejoins the run")
            return 1
        except RpcFailure as exc:
            log_event(log, "silo_stopped", level=logging.ERROR, reason=str(exc))
            return 2
        finally:
            self.close()

    def close(self) -> None:
        """Let the silo's training ranks go and hang up."""
        if self.ranks is not None:
            self.ranks.close()
        self.client.close()

    def _download(self, version: int, round_: int) -> dict[str, np.ndarray] | None:
        """The global model of ``version``, or None when the round moved on meanwhile."""
        fetched = self._fetch("download", round_,
                              lambda: self.client.download(self.run_id, version, self.layout.hash, self.specs))
        if fetched is None:
            return None
        units, nbytes = fetched
        log_event(log, "global_received", version=version, bytes=nbytes)
        return units

    def _save_model(self, label: str) -> None:
        """silo.save: this silo's last trained model (and personal adapter) as ``silo-NAME/label``, in the
        form ``fcmoe export`` reads (fcmoe/model/saved.py); nothing before the first training."""
        if self.state.local_units is None or self.state.trained is None:
            return
        adapter = self.state.adapter
        state = {"run_id": self.run_id, "round": self.state.trained.round, "layout_hash": self.layout.hash,
                 "silo": self.silo.name, "personal_used": adapter is not None and adapter.helps,
                 "personal_gain": None if adapter is None else adapter.gain}
        personal = None if adapter is None else adapter.residual.weight.detach().float().cpu().numpy()
        folder = save_silo_model(silo_folder(self.config.run.output_dir, self.silo.name), label,
                                 model_record(self.config, "silo"), self.state.local_units, state, personal)
        log_event(log, "model_saved", folder=str(folder), round=self.state.trained.round,
                  personal=state["personal_used"])

    def _load(self, units: dict[str, np.ndarray]) -> None:
        state = self.layout.merge(units)
        if self.ranks is not None:
            self.ranks.load_trainable_state(state)
        else:
            load_trainable_state(self.model, state)

    def _ranks_restartable(self) -> bool:
        """After a RunError: whether this silo starts its ranks afresh itself (under torchrun the launcher owns
        them, so the silo stops and torchrun starts them all again; without ranks the error is not theirs)."""
        return self.ranks is not None and self.ranks.restartable

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return self.ranks.trainable_state() if self.ranks is not None else trainable_state(self.model)

    def _evaluate(self, adapter: PersonalAdapter | None = None, meter: RoutingMeter | None = None,
                  max_examples: int | None = None) -> dict[str, tuple[float, int]]:
        self.evaluated_examples += len(self.data.eval.eval_subset(max_examples))
        return evaluate(self.model, self.data.eval, self.device, self.config.data.eval_batch_size, adapter, meter,
                        max_examples)

    def _personal_adapter(self, t: RoundPlan, round_: int) -> PersonalAdapter | None:
        """The adapter to train this round, created on first use. Not under DP (it would learn from the
        private data outside the ledger) nor with several ranks (it lives in one process)."""
        if not t.personal_adapter:
            return None
        if self.dp is not None or self.world_size > 1:
            log_event(log, "personal_adapter_skipped", round=round_,
                      reason="dp" if self.dp is not None else "world_size > 1")
            return None
        if self.state.adapter is None:
            self.state.adapter = PersonalAdapter.for_model(self.model, t.learning_rate, t.weight_decay)
        return self.state.adapter

    def _wait_out(self, task: pb.Task) -> None:
        """Nothing to do for this task (refused, or restarted mid-round): wait for the phase to move on."""
        time.sleep(min(5.0, max(0.5, task.deadline_unix - time.time())))

    def _refuse_round(self, task: pb.Task, reason: str) -> None:
        """Stay out of this attempt; the round goes on without this silo."""
        self.state.refused_session = self.state.secure.session if self.state.secure is not None else task.train.session
        self.state.secure, self.state.pending = None, None
        log_event(log, "round_refused", level=logging.WARNING, round=task.round, reason=reason)

    def _train_and_report(self, task: pb.Task) -> None:
        t = plan_from_message(task.train, task.round)
        mode = t.secure_mode or "none"
        if mode not in self.silo.accept_modes:
            self._refuse_round(task, f"secure_aggregation mode {mode!r} is not in this silo's accept_modes "
                                     f"{self.silo.accept_modes}")
            return
        t0 = time.perf_counter()
        global_units = self._download(start_version(task.round), task.round)
        if global_units is None:
            return
        key = training_key(self.run_id, task, global_units)
        trained = self.state.trained
        if trained is not None and trained.key == key and not trained.exposed:
            log_event(log, "training_reused", round=task.round, session=t.session,
                      reason="a redone attempt of a round already trained from this global model")
        elif (self.dp is not None and self.dp.ledger.released(self.run_id, task.round)
              and not (trained is not None and trained.key == key)):
            self._decline(task, f"round {task.round} of run {self.run_id} is already in the privacy ledger and "
                                "its update did not survive a restart; releasing it again would count twice")
            return
        else:
            # a redo after an unmask trains afresh: another seed, so not the update the aggregator saw
            # (under DP a second release of the round, ledgered and within the budget, or declined)
            retrain = trained.retrain + 1 if trained is not None and trained.key == key else 0
            try:
                trained = self._train(task, global_units, key, time.perf_counter() - t0, retrain)
            except RunError as exc:  # a rank failed: this round goes on without the silo, the next gets new ranks
                if not self._ranks_restartable():
                    raise
                self._decline(task, str(exc))
                return
            if trained is None:
                return
            self.state.trained = trained
        self.state.secure = ROUND_MODES[mode].open(self.run_id, t.session, self.silo, self.state.run_keys)
        self.state.pending = trained
        report = pb.RoundReport()
        report.CopyFrom(trained.report)
        advert = self.state.secure.advert()
        if advert is not None:
            report.advert.CopyFrom(advert)
        if self._sent("report", task.round, lambda: self.client.report_round(report)):
            log_event(log, "report_sent", round=task.round, session=t.session, reliability=round(report.reliability, 4))

    def _train(self, task: pb.Task, global_units: dict[str, np.ndarray], key: tuple[str, int, bytes, bytes],
               download_seconds: float, retrain: int = 0) -> TrainedRound | None:
        """Evaluate the global model, train from it (under DP when configured: the ledger records the
        release first), evaluate the result; the round's report without key advert. None: declined."""
        t = plan_from_message(task.train, task.round)
        refusal = instruction_refusal(t.silo_projection, t.reanchor_lambda)
        if refusal is not None:
            self._decline(task, refusal)
            return None
        privacy = None
        if self.dp is not None:
            privacy = self.dp.plan(t.batch_size, t.local_steps, self.data.num_train, self.total_rounds)
            if isinstance(privacy, str):
                self._decline(task, privacy)
                return None
        self._load(global_units)
        t1 = time.perf_counter()
        examples_before = self.evaluated_examples
        cap = task.eval_max_examples or None  # federation.evaluation.max_examples: a fixed subset of held-out
        # A round without evaluation (federation.evaluation.every) still measures what the strategy weighs by
        # (FC-MoE): routing on the global model over the capped subset, and reliability only when this silo
        # has none from an evaluated round to reuse (docs/algorithm.md, "Evaluation cost").
        skip = t.skip_evaluation
        measure_reliability = not skip or (t.needs_signals and self.state.last_reliability is None)
        # Routing share is measured here, under the global model: how this silo's data uses each expert
        # of the model being aggregated (the router that local training drifts to is not kept).
        self.meter.reset()
        metered = privacy is None and (not skip or t.needs_signals)  # DP silos meter nothing
        global_eval = (self._evaluate(meter=self.meter if metered else None, max_examples=cap)
                       if measure_reliability or metered else {})
        eval_seconds = time.perf_counter() - t1
        start_units = global_units
        if t.retention_lambda > 0 and self.state.local_units is not None:
            shares = self.state.local_shares
            scale = importance_scale(shares) if t.retention_by_importance and shares else None
            start_units = anchor(global_units, self.state.local_units, t.retention_lambda, scale)
            self._load(start_units)
        if t.reanchor_lambda > 0 and (residual := self.state.residuals.before(task.round)) is not None:
            # the paper's re-anchoring: what silo-side projection removed last time, lambda of it
            start_units = reanchor(start_units, residual, t.reanchor_lambda)
            self._load(start_units)
            log_event(log, "reanchored", round=task.round, lam=t.reanchor_lambda,
                      residual_norm=round(sum(float(np.linalg.norm(r)) for r in residual.values()), 6))
        adapter = self._personal_adapter(t, task.round)
        plan = t.for_silo(self.silo.index, retrain)
        if self.dp is not None and privacy is not None:
            result = self.dp.train(self.model, self.data.train, plan, privacy, self.device)
        elif self.ranks is not None:
            result = self.ranks.train(plan)
        else:
            result = train_locally(self.model, self.data.train, plan, self.device, self.progress, adapter)
        t2 = time.perf_counter()
        # the model trained for the federation: its reliability
        local_eval = self._evaluate(max_examples=cap) if measure_reliability else {}
        personal_eval = local_eval  # the personalised model is the trained one unless the adapter earns its place
        if adapter is not None:
            log_event(log, "personal_adapter", round=task.round, used=adapter.helps, gain=round(adapter.gain, 5))
            if adapter.helps and not skip:
                personal_eval = self._evaluate(adapter, max_examples=cap)
        eval_seconds += time.perf_counter() - t2
        self.state.local_units = self.layout.split(self._trainable_state())
        # What this round taught the silo; the retained residual (start - global) stays here.
        deltas, norms = clip_units(unit_deltas(self.state.local_units, start_units), t.clip_norm)
        unit_norm = {u: float(np.linalg.norm(d.astype(np.float64))) for u, d in deltas.items()}  # before projecting
        if self.silo.measure_conflict:
            self._measure_conflict(task.round, global_units, deltas)
        if t.silo_projection:
            deltas = self._project(task.round, global_units, deltas, t.silo_projection)
        # Under DP the released importance is post-processing of the privatised delta (dp/importance.py)
        self.state.local_shares = norm_shares(deltas) if privacy is not None else self.meter.shares(self.layout)
        if self.dp is not None and privacy is not None:
            self.dp.record(self.run_id, task.round, t.session, privacy, deltas)
            result = replace(result, loss_first=math.nan, loss_last=math.nan)  # training losses stay here
        if measure_reliability:
            rel = self.state.last_reliability = reliability(global_eval, local_eval)
        else:
            rel = self.state.last_reliability if self.state.last_reliability is not None else 0.0
        if skip:  # the losses of a signals pass are not a metrics evaluation: they stay here
            global_eval = personal_eval = {}
        report = pb.RoundReport(
            run_id=self.run_id, round=task.round, layout_hash=self.layout.hash,
            num_examples=float(self.data.num_train), reliability=rel, units=list(self.specs),
            routing_share=[self.state.local_shares[u] for u in self.specs],
            stats=pb.TrainStats(steps=result.steps, tokens=result.tokens, train_seconds=result.seconds,
                                train_loss_first=result.loss_first, train_loss_last=result.loss_last,
                                num_examples=self.data.num_train, eval_seconds=eval_seconds,
                                download_seconds=download_seconds,
                                eval_examples=self.evaluated_examples - examples_before),
            evaluation=pb.Evaluation(global_model=domain_losses(global_eval), local_model=domain_losses(personal_eval)),
            unit_norm=[unit_norm[u] for u in self.specs] if t.report_norms else [],
        )
        if self.dp is not None:  # for the operator's status page; the signed ledger is the proof
            report.privacy.CopyFrom(pb.PrivacySpent(epsilon=self.dp.budget.spent, delta=self.silo.dp.delta,
                                                    epsilon_budget=self.silo.dp.epsilon_budget))
        log_event(log, "trained", round=task.round, global_loss=mean_loss(global_eval), local_loss=mean_loss(personal_eval),
                  reliability=round(rel, 4), train_s=round(result.seconds, 3), max_unit_norm=max(norms.values()),
                  evaluated=not skip, eval_examples=self.evaluated_examples - examples_before,
                  reliability_reused=not measure_reliability)
        return TrainedRound(key, deltas, report, t.clip_norm, retrain=retrain)

    def _measure_conflict(self, round_: int, global_units: dict[str, np.ndarray],
                          deltas: dict[str, np.ndarray]) -> None:
        """silo.measure_conflict: how many expert updates oppose the previous global update."""
        self.state.globals_seen.keep(start_version(round_), global_units)
        direction, since = self.state.globals_seen.direction(start_version(round_))
        experts = [str(k) for k in self.layout.units if k.is_expert]
        opposed, compared = opposed_units(deltas, direction, experts)
        self.state.conflicts[round_] = (opposed, compared)
        log_event(log, "update_conflict", round=round_, opposed=opposed, compared=compared, since_version=since)

    def _project(self, round_: int, global_units: dict[str, np.ndarray], deltas: dict[str, np.ndarray],
                 consensus: str) -> dict[str, np.ndarray]:
        """Silo-side projection: each unit's delta that opposes the consensus direction loses its component
        along it (before masking, so exactly); the removed part stays here for re-anchoring."""
        self.state.globals_seen.keep(start_version(round_), global_units)
        direction, since = self.state.globals_seen.direction(start_version(round_))
        kept, removed = project_units(deltas, direction)
        self.state.residuals.keep(round_, removed)
        removed_norm = {u: float(np.linalg.norm(r.astype(np.float64))) for u, r in removed.items()}
        log_event(log, "silo_projection", round=round_, consensus=consensus, since_version=since,
                  projected=sum(n > 0 for n in removed_norm.values()), units=len(removed_norm),
                  removed_norm=round(sum(removed_norm.values()), 6))
        return kept

    def _decline(self, task: pb.Task, reason: str) -> None:
        self.state.refused_session = task.train.session
        log_event(log, "round_declined", level=logging.WARNING, round=task.round, reason=reason)
        self._sent("decline", task.round, lambda: self.client.decline(
            pb.DeclineRequest(run_id=self.run_id, round=task.round, reason=reason)))

    def _pending_for(self, task: pb.Task) -> tuple[TrainedRound, SiloRound] | None:
        """What this silo reported for ``task.round`` and its attempt's state; None (waited out) if nothing."""
        pending, secure = self.state.pending, self.state.secure
        if pending is None or secure is None or pending.round != task.round:
            # e.g. restarted after reporting, or refused the round: nothing to send; do not spin
            log_event(log, "upload_without_training", level=logging.WARNING, round=task.round)
            self._wait_out(task)
            return None
        if list(task.upload.units) != list(self.specs):
            raise ConfigError("upload instructions do not match this silo's layout")
        return pending, secure

    def _in_round(self, task: pb.Task) -> SiloRound | None:
        """This attempt's state; None (waited out) when this silo is not in it (refused, or restarted)."""
        if self.state.secure is None:
            self._wait_out(task)
        return self.state.secure

    def _sketch(self, task: pb.Task) -> None:
        """FC-MoE's sketch stage: the importance-weighted keyed sketch of every unit's delta, masked in
        secure modes (only its sum is ever unmasked); kept here to score against that sum."""
        taking = self._pending_for(task)
        if taking is None:
            return
        (pending, secure), instructions = taking, task.upload
        try:
            key = secure.open_sketch_stage(instructions)
            self.state.run_keys = secure.kept(self.state.run_keys)
            # clipped like the deltas: a masked sum needs every coordinate bounded (crypto/fixed_point.py),
            # and a count-sketch of a clipped delta is only about as long as the delta
            sketches, _ = clip_units(sketch_units(pending.deltas, key, self.run_id, task.round,
                                                  instructions.sketch_buckets), pending.clip_norm)
            weights = dict(zip(instructions.units, instructions.coefficients))
            self.state.weighted_sketches = {u: np.float64(weights[u]) * y.astype(np.float64)
                                            for u, y in sketches.items()}
            payload = secure.sketch_payload(sketches, self.state.weighted_sketches)
        except SecAggError as exc:
            self._refuse_round(task, str(exc))
            return
        self._send_update(task, "sketch", payload, stage="sketch")

    def _agree(self, task: pb.Task) -> None:
        """Score this silo's own sketch against the sketch sums; only the scalars leave the silo."""
        if self.state.pending is None or self.state.pending.round != task.round or not self.state.weighted_sketches:
            self._wait_out(task)
            return
        specs = {u: codec.TensorSpec("float32", y.shape) for u, y in self.state.weighted_sketches.items()}
        sums = codec.decode(task.agree.sketch_sums, specs)
        scores = [own_agreement(self.state.weighted_sketches[u], sums[u]) for u in self.specs]
        submission = pb.AgreementSubmission(run_id=self.run_id, round=task.round, units=list(self.specs),
                                            agreement=scores)
        if self._sent("agreement", task.round, lambda: self.client.submit_agreement(submission)):
            log_event(log, "agreement_sent", round=task.round, mean=round(float(np.mean(scores)), 4))

    def _check(self, task: pb.Task) -> None:
        """Consistency check: sign the view this silo masked under and the survivors it is shown."""
        secure = self._in_round(task)
        if secure is None:
            return
        try:
            signature = secure.sign_view(task.check)
        except SecAggError as exc:
            self._refuse_round(task, str(exc))
            return
        submission = pb.CheckSubmission(run_id=self.run_id, round=task.round, signature=signature)
        if self._sent("check", task.round, lambda: self.client.submit_check(submission)):
            log_event(log, "view_signed", round=task.round, stage=task.check.stage,
                      survivors=len(task.check.survivors), dropped=len(task.check.dropped))

    def _upload(self, task: pb.Task) -> None:
        taking = self._pending_for(task)
        if taking is None:
            return
        pending, secure = taking
        try:
            payload = secure.update_payload(task.upload, pending.deltas)
        except SecAggError as exc:
            self._refuse_round(task, str(exc))
            return
        self.state.run_keys = secure.kept(self.state.run_keys)
        if self._send_update(task, "update", payload, stage="update"):
            self.state.pending = None
            if secure.exposes_on_upload and self.state.trained is not None:
                self.state.trained.exposed = True  # e.g. the ckks key holder may decrypt a sum holding it alone

    def _send_update(self, task: pb.Task, what: str, payload: dict[str, np.ndarray], stage: str = "") -> bool:
        """Stream ``payload`` as this silo's update, sketch or decryption for ``task.round``; False if refused."""
        header = pb.UpdateHeader(run_id=self.run_id, round=task.round, layout_hash=self.layout.hash,
                                 units=list(payload), sizes=[v.nbytes for v in payload.values()],
                                 secure_seconds=self.state.secure.seconds if self.state.secure is not None else 0.0,
                                 stage=stage)
        if what == "update" and self.state.secure is not None:  # mode ckks: each unit's signed digest
            header.contributions.extend(self.state.secure.contributions)
        if self.dp is not None:  # the ledger's anchor: the aggregator keeps it, a cut ledger is then caught
            receipt = self.dp.ledger.receipt(self.run_id, task.round)
            header.ledger.CopyFrom(pb.LedgerReceipt(silo=receipt.silo, run_id=receipt.run_id, round=receipt.round,
                                                    length=receipt.length, head_hash=receipt.head_hash,
                                                    signature=receipt.signature))
        reply = self._fetch(what, task.round, lambda: self.client.submit(header, payload, self.silo.upload_chunk_bytes))
        if reply is None:
            return False
        log_event(log, f"{what}_sent", round=task.round, bytes=reply.bytes_received)
        return True

    def _share(self, task: pb.Task) -> None:
        secure = self._in_round(task)
        if secure is None:
            return
        try:
            submission = secure.make_shares(task.share)
            self.state.run_keys = secure.kept(self.state.run_keys)  # a run secret (CKKS key) it deals is drawn here
        except SecAggError as exc:
            self._refuse_round(task, str(exc))
            return
        submission.run_id, submission.round = self.run_id, task.round
        if self._sent("shares", task.round, lambda: self.client.submit_shares(submission)):
            log_event(log, "shares_sent", round=task.round, peers=len(submission.shares),
                      dealt=len(submission.secrets))

    def _reveal(self, task: pb.Task) -> None:
        secure = self._in_round(task)
        if secure is None:
            return
        try:
            shares = secure.reveal(task.unmask)
        except SecAggError as exc:
            self._refuse_round(task, str(exc))
            return
        if self.state.trained is not None and self.state.trained.round == task.round:
            self.state.trained.exposed = True  # a sum holding this round's contribution may now be unmasked
        submission = pb.UnmaskSubmission(run_id=self.run_id, round=task.round, shares=shares)
        if self._sent("unmask", task.round, lambda: self.client.submit_unmask(submission)):
            log_event(log, "unmask_sent", round=task.round, survivors=len(task.unmask.survivors),
                      dropped=len(task.unmask.dropped))

    def _decrypt(self, task: pb.Task) -> None:
        """Mode ckks, this silo holds the key this round: decrypt the group sums it is sent."""
        secure = self._in_round(task)
        if secure is None:
            return
        try:
            specs = secure.sum_specs(task.decrypt)
        except SecAggError as exc:
            self._refuse_round(task, str(exc))
            return
        fetched = self._fetch("encrypted_sums", task.round, lambda: self.client.download(
            self.run_id, task.round, self.layout.hash, specs, encrypted_sums=True))
        if fetched is None:
            return
        try:
            plain = secure.decrypt(task.decrypt, fetched[0])
        except SecAggError as exc:
            self._refuse_round(task, str(exc))
            return
        self._send_update(task, "decryption", plain)

    def _fetch(self, what: str, round_: int, call: Callable[[], T]) -> T | None:
        """``call()``'s answer; None when the aggregator refused it because the round moved on (logged and
        survived). Any other failure is raised."""
        try:
            return call()
        except RpcFailure as exc:
            if exc.code is None or exc.code.name not in ("FAILED_PRECONDITION", "DEADLINE_EXCEEDED", "ALREADY_EXISTS"):
                raise
            log_event(log, f"{what}_refused", level=logging.WARNING, round=round_, reason=str(exc))
            return None

    def _sent(self, what: str, round_: int, send: Callable[[], object]) -> bool:
        """Send; False when the aggregator refused it because the round had moved on (see :meth:`_fetch`)."""
        def sending() -> bool:
            send()
            return True

        return self._fetch(what, round_, sending) is not None

    def _final_evaluation(self, task: pb.Task) -> None:
        units = self._download(task.round, task.round)
        if units is None:
            return
        cap = task.eval_max_examples or None
        try:
            self._load(units)
            result = self._evaluate(max_examples=cap)
        except RunError as exc:  # a rank failed (under fsdp evaluation is collective): once more, on fresh ranks
            if not self._ranks_restartable():
                raise
            log_event(log, "final_evaluation_retried", level=logging.WARNING, reason=str(exc))
            self._load(units)
            result = self._evaluate(max_examples=cap)
        report = pb.EvalReport(run_id=self.run_id, round=task.round, layout_hash=self.layout.hash,
                               evaluation=pb.Evaluation(global_model=domain_losses(result)))
        if not self._sent("evaluation", task.round, lambda: self.client.report(report)):
            return
        log_event(log, "final_evaluation_sent", version=task.round, global_loss=mean_loss(result))


def _client(silo: SiloConfig) -> AggregatorClient:
    try:
        return AggregatorClient(silo.aggregator, silo.pki_dir, silo.name, retry_budget_s=silo.connect_timeout_s)
    except PkiError as exc:
        if str(exc).startswith("cannot read"):  # a file of pki_dir is missing: say which setting points there
            raise ConfigError(f"silo.pki_dir = {silo.pki_dir}: {exc} (the operator's `fcmoe certs` issued "
                              "ca.pem, silo-NAME.pem and silo-NAME.key for this silo)") from None
        raise


def run_silo(config: Config, progress: bool = False) -> int:
    """Run the silo's agent; under torchrun, rank 0 does and every other rank serves its training."""
    launch = torchrun_rank()
    if launch is not None and config.silo is not None:
        device = rank_device(config.silo, launch.local_rank)
        if launch.rank > 0:
            setup_logging(f"silo-rank{launch.rank}", config.run.log_level)
            _leave(serve_rank(config, load_data(config).train, device))
    with StopRequest() as stop:
        status = SiloAgent(config, progress=progress).run(stop.event)
    status = stop.exit_status or status
    if launch is not None:
        _leave(status)
    return status


def _leave(status: int) -> NoReturn:
    """A torchrun rank's exit, once its process group is destroyed and everything is saved: without the
    interpreter's teardown, where gloo's threads can still abort the process ("terminate called without
    an active exception", seen after a run had completed), which torchrun would report as a failure."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
