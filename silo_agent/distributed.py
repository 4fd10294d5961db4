"""A silo's training processes ("ranks"): started once, kept across rounds; rank 0 is the agent.

A silo with several GPUs (or CPU sockets, or machines) trains each round over ``silo.world_size``
ranks that meet in one ``torch.distributed`` process group (gloo on CPU, NCCL with one GPU per rank
on CUDA). The ranks are either started by the agent itself (spawn, on a free loopback port) or by
the ecosystem's launcher, ``torchrun --nproc-per-node N [--nnodes M ...] -m fcmoe silo CONFIG``,
which also spans machines. Either way rank 0 is the agent's own process, the only one that talks to
the aggregator; the others wait for its commands in :func:`serve_rank`.

Each rank builds its model once, on the meta device, and receives the frozen base from rank 0 one
tensor at a time, so ranks agree on the base by construction. Each round's plan and trainable state
come from rank 0 (never re-read from disk); all ranks train on disjoint rows of the same seeded
batches. Two layouts (``silo.parallel``):

- ``ddp``: every rank holds the whole model (``DistributedDataParallel``); rank 0's replica is the
  agent's model itself, which holds the trained state after each round;
- ``fsdp``: FSDP2 (``fully_shard``) shards each decoder layer and the rest of the model over the
  ranks, frozen base included, and rank 0's shard *is* the agent's model. A local checkpoint is read
  one layer at a time as it is handed out (:class:`fcmoe.model.stream.CheckpointStream`), so no
  process ever holds the whole model; a built-in model (generated from its seed) is built whole on
  rank 0's host, never on a GPU, handed out tensor by tensor and dropped. Everything the agent then
  does with its model is collective: a forward (evaluation, routing) leads the other ranks through
  the same forward on the same batch (a pre-forward hook on rank 0 sends it); reading the trainable
  state gathers it tensor by tensor to rank 0's host; loading one hands each rank its shard.

The update is the one a single process would make on the whole batch: each rank divides its summed
token loss by the whole batch's token count, times ``world_size``, because both DDP and FSDP average
gradients over ranks (ranks hold different token counts, so an average of per-rank means would be
wrong); the FedProx gradient is added once after the gradients are averaged. A family whose training
depends on how the batch is split (``FamilyFacts.split_changes_update``: a router that mixes the rows
of a batch, or samples experts at random) cannot give that update; the silo warns at start.

A rank that fails or dies fails the round in one :class:`RunError` line; a silo that started its own
ranks starts them afresh for the next round. Under torchrun the launcher owns the processes: the
silo stops, and ``torchrun --max-restarts`` starts the group again (the silo rejoins its run).
DP-SGD stays single-process: the config refuses ``world_size > 1`` with ``dp.enabled``.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from itertools import chain
from pathlib import Path
from typing import Literal, NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from fcmoe.config import Config, ModelConfig, SiloConfig
from fcmoe.errors import ConfigError, LayoutError, RunError
from fcmoe.logs import log_event, setup_logging
from fcmoe.model import build_model, checkpoint_activations, load_trainable_state, trainable_state
from fcmoe.model.discovery import decoder_layers, discover, vocabulary_modules
from fcmoe.model.stream import CheckpointStream
from fcmoe.plan import RoundPlan
from silo_agent.data import IGNORE_INDEX, ExampleBatches
from silo_agent.memory import (map_large_blocks_directly, memory_bytes, peak_memory_bytes, release_host_memory,
                               reset_peak_memory)
from silo_agent.training import TrainResult, token_losses, train_locally

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0  # a training collective waiting longer than this means a rank is stuck: fail
_IDLE = timedelta(days=30)  # between rounds a rank waits for rank 0 as long as the federation takes
_GRACE_S = 5.0  # after a failure, how long a rank gets to exit (and leave its reason) before it is killed
_TRAIN, _STOP, _FORWARD, _GATHER, _LOAD = 1, 2, 3, 4, 5  # rank 0's commands
_DONE, _FAILED = -1, -2  # the ends of a hand-out, sent in place of a tensor's index
_BUILDS = [0]  # replicas this process has built: a rank builds its model once, however many rounds it trains
_INTS = ("local_steps", "batch_size", "grad_accum", "seed")
_FLOATS = ("learning_rate", "weight_decay", "prox_mu")
Parallel = Literal["ddp", "fsdp"]


def check_world_size(silo: SiloConfig) -> None:
    """At agent start: a CUDA silo needs one visible GPU per process (the schema cannot know the machine)."""
    if silo.world_size > 1 and silo.device.startswith("cuda") and torchrun_rank() is None:
        visible = torch.cuda.device_count()
        if silo.world_size > visible:
            raise ConfigError(f"silo.world_size = {silo.world_size}: only {visible} GPU(s) visible "
                              "(one process per GPU; check CUDA_VISIBLE_DEVICES)")


@dataclass(frozen=True)
class Launch:
    """Where this process stands under torchrun: its rank, the group's size and its GPU index."""

    rank: int
    world_size: int
    local_rank: int


def torchrun_rank() -> Launch | None:
    """This process's place when torchrun (or any launcher setting its variables) started it."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "RANK" not in os.environ:
        return None
    try:
        return Launch(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"launcher environment: RANK/WORLD_SIZE missing or not a number ({exc})") from None


def world_size_of(silo: SiloConfig) -> int:
    """The silo's rank count: torchrun's ``WORLD_SIZE`` when launched by it (``silo.world_size`` must be
    left at 1 or agree), else ``silo.world_size``."""
    launch = torchrun_rank()
    if launch is None:
        return silo.world_size
    if silo.world_size not in (1, launch.world_size):
        raise ConfigError(f"silo.world_size = {silo.world_size} but torchrun started {launch.world_size} processes "
                          "(leave silo.world_size at 1 under torchrun, or make them agree)")
    return launch.world_size


@dataclass(frozen=True)
class RankSetup:
    """What every rank needs, the same on all (handed to spawned ranks by pickling between this silo's own
    processes; under torchrun every rank reads the same config file)."""

    model: ModelConfig
    parallel: Parallel
    world_size: int
    cuda: bool
    activation_checkpointing: bool = False
    seed: int = 0  # the model's build seed: under fsdp rank 0 reads or builds the model again to restart a group
    timeout_s: float = DEFAULT_TIMEOUT_S
    threads: int = 1
    log_level: str = "INFO"

    @classmethod
    def of(cls, config: Config, timeout_s: float = DEFAULT_TIMEOUT_S) -> "RankSetup":
        assert config.silo is not None
        world = world_size_of(config.silo)
        return cls(model=config.model, parallel=config.silo.parallel, world_size=world,
                   cuda=config.silo.device.startswith("cuda"),
                   activation_checkpointing=config.silo.activation_checkpointing, seed=config.run.seed,
                   timeout_s=timeout_s,
                   threads=max(1, torch.get_num_threads() // world),
                   log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()))


class SiloRanks:
    """Rank 0's handle on the silo's ranks: started here (or found under torchrun), trained with each
    round, closed with the agent. It owns the agent's model from then on: use :attr:`model`,
    :meth:`trainable_state` and :meth:`load_trainable_state`, which are collective under fsdp (and
    drop your own reference to the model handed in: under fsdp that is what frees the whole model).
    Under fsdp the model may come as a :class:`CheckpointStream`, read layer by layer as it is handed out."""

    def __init__(self, model: nn.Module | CheckpointStream, setup: RankSetup, data: ExampleBatches,
                 device: torch.device, progress: bool = False):
        self.setup, self.data, self.device, self.progress = setup, data, device, progress
        if isinstance(model, CheckpointStream) and setup.parallel != "fsdp":
            raise ConfigError("silo.parallel = ddp: every rank holds the whole model; a checkpoint is read "
                              "layer by layer under fsdp only")
        # the whole model, or the checkpoint to read it from: under fsdp only until it is handed out
        self._source: nn.Module | CheckpointStream | None = model
        self.launch = torchrun_rank()
        self._context: mp.ProcessContext | None = None
        self._folder: Path | None = None
        self._replica: _Replica | None = None
        self.starts = 0  # how often the group was (re)started; ranks build their model once per start
        self._builds_before = _BUILDS[0]
        self.builds_per_rank: list[int] = []  # model builds per rank process, as the ranks counted after the last round
        self.peak_bytes_per_rank: list[int] = []  # each rank's peak memory in the last round (GPU allocator, else RSS)
        self.base_bytes_per_rank: list[int] = []  # each rank's memory before it built its replica
        self.startup_peak_bytes = 0  # rank 0's peak while it built its replica (and handed out the model)
        shapes = model.model if isinstance(model, CheckpointStream) else model
        facts = discover(shapes).facts
        if facts.split_changes_update:  # each rank trains on its own rows of every batch
            family = type(shapes.get_base_model() if hasattr(shapes, "get_base_model") else shapes).__name__
            log_event(log, "update_differs_from_one_process", level=logging.WARNING, model=family,
                      reason=f"{facts.split_changes_update}; the batch is split over {setup.world_size} "
                             "processes")
        self._start()

    def _start(self) -> None:
        started = time.perf_counter()
        store = None
        if self.launch is None:
            self._folder = Path(tempfile.mkdtemp(prefix="fcmoe-ranks-"))  # spawned ranks' one-line failure notes
            # rank 0 holds the rendezvous (a free loopback port, picked by binding port 0)
            store = dist.TCPStore("127.0.0.1", 0, self.setup.world_size, is_master=True, wait_for_workers=False,
                                  timeout=timedelta(seconds=self.setup.timeout_s))
            self._context = mp.start_processes(_spawned_rank,
                                               args=(self.setup, self.data, store.port, str(self._folder)),
                                               nprocs=self.setup.world_size - 1, join=False, daemon=True,
                                               start_method="spawn")
        try:
            if store is not None:
                self._await_spawned(store)
            _join_group(0, self.setup, store)
            self._replica = _Replica(self.setup, 0, self.device, self._base())
            self.startup_peak_bytes = self._replica.startup_peak_bytes
        except Exception as exc:
            self._fail(exc)
        if self.sharded:
            self._source = None  # rank 0 keeps its shard only
            release_host_memory()
        self.starts += 1
        log_event(log, "ranks_started", world_size=self.setup.world_size, parallel=self.setup.parallel,
                  launcher="torchrun" if self.launch else "spawn", backend=_backend(self.setup.cuda),
                  seconds=round(time.perf_counter() - started, 3))

    def _await_spawned(self, store: dist.TCPStore) -> None:
        """Wait until every spawned rank has reached the rendezvous, watching them meanwhile: one that dies
        on the way (an import, a device, its memory) fails the start now, not after the group's timeout."""
        assert self._context is not None
        keys = [f"ready{rank}" for rank in range(1, self.setup.world_size)]
        deadline = time.monotonic() + self.setup.timeout_s
        while not store.check(keys):
            if any(p.exitcode is not None for p in self._context.processes):
                raise RunError("a rank exited before joining")
            if time.monotonic() > deadline:
                raise RunError(f"the ranks did not all start within {self.setup.timeout_s:.0f} s")
            time.sleep(0.05)

    @property
    def sharded(self) -> bool:
        return self.setup.parallel == "fsdp"

    def _base(self) -> nn.Module | CheckpointStream:
        """The model to hand out: the agent's; under fsdp, after the first start (the ranks that held the
        other shards are gone; the caller loads the trainable state), read again from a local checkpoint
        layer by layer, or a built-in one built again on the host."""
        if self._source is None:
            spec = self.setup.model
            self._source = (CheckpointStream(spec, self.setup.seed) if spec.source == "local"
                            else build_model(spec, "cpu", seed=self.setup.seed))
        return self._source

    @property
    def model(self) -> nn.Module:
        """The agent's model: under ddp the whole model; under fsdp rank 0's shard, whose forwards lead
        the other ranks (a group that lost a rank is started again first)."""
        if self.sharded:
            self._ensure_started()
            assert self._replica is not None
            return self._replica.module
        assert isinstance(self._source, nn.Module)
        return self._source

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors, whole, as :func:`fcmoe.model.trainable_state` gives them (under fsdp
        gathered one at a time onto rank 0's host)."""
        if not self.sharded:
            return trainable_state(self.model)
        self._ensure_started()
        assert self._replica is not None
        try:
            _send_command(_GATHER)
            return self._replica.gather_trainable()
        except Exception as exc:
            self._fail(exc)

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load trainable tensors into the agent's model (under fsdp each rank takes its shard)."""
        if not self.sharded:
            load_trainable_state(self.model, state)
            return
        self._ensure_started()
        assert self._replica is not None
        trainable = dict(self._replica.params)
        unknown = sorted(set(state) - set(trainable))
        if unknown:  # before any rank is told: the group stays in step
            raise LayoutError(f"parameter {unknown[0]!r} is not trainable in this model")
        try:
            _send_command(_LOAD)
            self._replica.scatter_trainable(state)
        except Exception as exc:
            self._fail(exc)

    def _ensure_started(self) -> None:
        if self._replica is not None and self._replica.forward_open:
            # a forward rank 0 led failed part-way (an error or out of memory there): the other ranks still wait
            # inside it, so the group is out of step
            reason = "an evaluation forward failed part-way on rank 0; the ranks were out of step"
            if not self.restartable:
                self._fail(RunError(reason))
            log_event(log, "ranks_restarted", level=logging.WARNING, reason=reason)
            self._teardown()
        if self._replica is None:  # the last round lost a rank: a fresh group (spawned ranks only)
            self._start()

    def train(self, plan: RoundPlan) -> TrainResult:
        """Train the agent's model in place over all ranks, as one process would on the whole batch.

        A batch smaller than ``world_size`` leaves a rank without rows. Under ddp that round trains in
        this process instead (same update), rather than stopping the silo over the aggregator's batch
        size; under fsdp no process holds the whole model, so a rank without rows runs a stand-in row
        whose loss counts for nothing (it must take part in every gather)."""
        if plan.batch_size < self.setup.world_size and not self.sharded:
            log_event(log, "training_in_one_process", level=logging.WARNING,
                      reason=f"batch_size={plan.batch_size} is below world_size={self.setup.world_size}")
            return train_locally(self.model, self.data, plan, self.device, self.progress)
        self._ensure_started()
        assert self._replica is not None
        start = time.perf_counter()
        try:
            _send_command(_TRAIN, plan)
            result = self._replica.train_round(self.data, plan, self.model if not self.sharded else None,
                                               self.progress)
            self.builds_per_rank, self.peak_bytes_per_rank, self.base_bytes_per_rank = _rank_figures(
                self.setup.world_size, 0, _BUILDS[0] - self._builds_before, self.device, self._replica.base_bytes)
        except Exception as exc:
            self._fail(exc)
        log_event(log, "distributed_training_done", world_size=self.setup.world_size, parallel=self.setup.parallel,
                  builds="/".join(map(str, self.builds_per_rank)),
                  peak_mib="/".join(str(b >> 20) for b in self.peak_bytes_per_rank), train_s=round(result.seconds, 3),
                  total_s=round(time.perf_counter() - start, 3))
        return TrainResult(result.steps, result.tokens, time.perf_counter() - start, result.loss_first,
                           result.loss_last)

    @property
    def restartable(self) -> bool:
        """Whether a failed group can be started again here (not under torchrun: the launcher owns it)."""
        return self.launch is None

    @property
    def pids(self) -> list[int]:
        """The spawned ranks' process ids (none under torchrun)."""
        return [p.pid for p in self._context.processes] if self._context is not None else []

    def close(self) -> None:
        """Let the ranks go (a stop command, then leave the group); never leaves a process behind."""
        if self._replica is not None:
            try:
                _send_command(_STOP)
            except Exception as exc:  # a rank already gone: nothing to tell it
                log_event(log, "ranks_stop_unsent", level=logging.DEBUG, reason=str(exc).splitlines()[0])
        self._teardown()

    def _fail(self, exc: Exception) -> NoReturn:
        """One line naming the rank that failed (its own note when it left one), then a group torn down."""
        reason = self._reason(exc)
        log_event(log, "rank_failed", level=logging.ERROR, world_size=self.setup.world_size, reason=reason)
        self._teardown()
        if self.launch is not None:
            raise RunError(f"{reason}; under torchrun the silo stops (start it with --max-restarts to go on)")
        raise RunError(reason) from None

    def _reason(self, exc: Exception) -> str:
        if self._context is not None and not isinstance(exc, _GaveUp):
            deadline = time.monotonic() + _GRACE_S  # a peer's failure reaches rank 0 before the peer has exited
            while time.monotonic() < deadline and all(p.exitcode is None for p in self._context.processes):
                time.sleep(0.05)
            for index, process in enumerate(self._context.processes):
                note = self._folder / f"rank{index + 1}.error" if self._folder else None
                if note is not None and note.exists():
                    return f"local training process {index + 1} of {self.setup.world_size} failed: {note.read_text()}"
                if process.exitcode is not None and process.exitcode != 0:
                    code = process.exitcode
                    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
                    return f"local training process {index + 1} of {self.setup.world_size} failed: exited with {how}"
        own = str(exc) if isinstance(exc, _GaveUp) else _one_line(exc)
        return f"local training process 0 of {self.setup.world_size} failed: {own}"

    def _teardown(self) -> None:
        self._replica = None
        if dist.is_initialized():
            dist.destroy_process_group()
        if self._context is not None:
            for process in self._context.processes:
                process.join(_GRACE_S)
                if process.is_alive():
                    process.kill()
                    process.join()
            for path in self._context.error_files:  # torch's traceback files of failed ranks
                Path(path).unlink(missing_ok=True)
            self._context = None
        if self._folder is not None:
            for note in self._folder.glob("*"):
                note.unlink()
            self._folder.rmdir()
            self._folder = None


def serve_rank(config: Config, data: ExampleBatches, device: torch.device) -> int:
    """A torchrun rank other than 0: join the group, build the model once, train when rank 0 says."""
    launch = torchrun_rank()
    assert launch is not None and launch.rank > 0
    setup = RankSetup.of(config)
    _join_group(launch.rank, setup)
    try:
        _serve(launch.rank, setup, data, device)
    finally:
        dist.destroy_process_group()
    return 0


def rank_device(silo: SiloConfig, local_rank: int) -> torch.device:
    """This rank's device: GPU ``local_rank`` on a CUDA silo (made current), else the CPU."""
    if not silo.device.startswith("cuda"):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


class _Abandoned(RunError):
    """Rank 0 gave up handing out tensors (the model, a state) and says why itself."""


class _GaveUp(RunError):
    """Rank 0's side of :class:`_Abandoned`: it failed handing out tensors and told the other ranks, so
    its own reason is the group's, whatever becomes of the ranks it told."""


def _spawned_rank(index: int, setup: RankSetup, data: ExampleBatches, port: int, folder: str) -> None:
    """Entry point of a rank the agent spawned (a fresh interpreter): ranks 1 .. world_size - 1."""
    rank = index + 1
    try:
        setup_logging(f"silo-rank{rank}", setup.log_level)
        torch.set_num_threads(setup.threads)
        device = torch.device("cpu")
        if setup.cuda:
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        store = dist.TCPStore("127.0.0.1", port, setup.world_size, is_master=False,
                              timeout=timedelta(seconds=setup.timeout_s))
        store.set(f"ready{rank}", "1")
        _join_group(rank, setup, store)
        try:
            _serve(rank, setup, data, device)
        finally:
            dist.destroy_process_group()
    except _Abandoned:
        return  # rank 0 names its own failure (a checkpoint that cannot be read, say); no note to mask it
    except Exception as exc:
        # one line for the agent; torch's error file keeps the traceback
        (Path(folder) / f"rank{rank}.error").write_text(_one_line(exc))
        raise


def _serve(rank: int, setup: RankSetup, data: ExampleBatches, device: torch.device) -> None:
    replica = _Replica(setup, rank, device, None)
    while True:
        command, plan = _receive_command()
        if command == _STOP:
            return
        if command == _TRAIN:
            replica.train_round(data, plan, None, False)
            _rank_figures(setup.world_size, rank, _BUILDS[0], device, replica.base_bytes)
        elif command == _FORWARD:
            replica.follow_forward()
        elif command == _GATHER:
            replica.gather_trainable()
        elif command == _LOAD:
            replica.scatter_trainable(None)
        else:
            raise RunError(f"unknown command {command} from rank 0")


def _rank_figures(world_size: int, rank: int, builds: int, device: torch.device,
                  base: int) -> tuple[list[int], list[int], list[int]]:
    """Every rank's model builds, peak memory and memory before its replica, gathered to all."""
    figures = torch.zeros(3, world_size, dtype=torch.int64)
    figures[:, rank] = torch.tensor([builds, peak_memory_bytes(device), base])
    dist.all_reduce(figures)
    return figures[0].tolist(), figures[1].tolist(), figures[2].tolist()


class _Replica:
    """One rank's copy of the model for training: DDP-wrapped, or FSDP2-sharded."""

    def __init__(self, setup: RankSetup, rank: int, device: torch.device,
                 source: nn.Module | CheckpointStream | None):
        self.setup, self.rank, self.device = setup, rank, device
        self.in_round = False  # in a training round, where every rank runs its own forwards
        self.forward_open = False  # rank 0: inside a forward it leads (still set after one that failed)
        self.base_bytes = memory_bytes(device)  # before the replica: interpreter, libraries (and the agent)
        if setup.parallel == "ddp" and isinstance(source, nn.Module):
            self.module = source  # rank 0 under ddp: the agent's model is this rank's replica
        else:
            self.module = build_model(setup.model, "meta")
            if setup.parallel == "fsdp":
                _shard(self.module, device, setup.cuda)
            self.module.to_empty(device=device)
        if setup.activation_checkpointing:
            checkpoint_activations(self.module)
        _hand_out(list(_tensors_of(self.module)), _pairs_of(source), device)
        release_host_memory()
        self.startup_peak_bytes = peak_memory_bytes(device)  # rank 0's includes what it handed out
        self.params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.view: nn.Module = self.module
        if setup.parallel == "ddp":
            self.view = DistributedDataParallel(self.module, device_ids=[device.index] if setup.cuda else None,
                                                init_sync=False)
        elif rank == 0:  # rank 0's shard is the agent's model: its forwards lead the others (before FSDP's gathers)
            self.module.register_forward_pre_hook(self._lead_forward, prepend=True, with_kwargs=True)
            self.module.register_forward_hook(self._forward_done)
        _BUILDS[0] += 1

    def train_round(self, data: ExampleBatches, plan: RoundPlan, agent_model: nn.Module | None,
                    progress: bool) -> TrainResult:
        """Train with the others. Under ddp every rank first takes the round's state from rank 0's (the
        agent's) model, and rank 0's replica is that model; under fsdp the state is already in the shards."""
        reset_peak_memory(self.device)  # each round's peak is its own (start-up and evaluations apart)
        if self.setup.parallel == "ddp":
            sent = dict(_tensors_of(agent_model)) if agent_model is not None else None
            _hand_out(self.params, [(n, sent[n]) for n, _ in self.params] if sent is not None else None, self.device)
        self.in_round = True
        try:
            result = self._train(data, plan, progress)
        finally:
            self.in_round = False
        release_host_memory()
        return result

    def gather_trainable(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor whole, float32, on rank 0's host; the other ranks drop each at once."""
        gathered = {}
        for name, param in self.params:
            whole = param.detach().full_tensor()  # a collective: every rank takes part
            if self.rank == 0:
                gathered[name] = whole.float().cpu()
        return gathered

    @torch.no_grad()
    def scatter_trainable(self, state: Mapping[str, torch.Tensor] | None) -> None:
        """Rank 0 sends the tensors of ``state`` (some or all of the trainable ones); each rank keeps its shard."""
        _hand_out(self.params, state.items() if state is not None else None, self.device, every=False)

    def _lead_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Rank 0's pre-forward hook: outside training, tell the other ranks to run this forward too."""
        if self.in_round:
            return
        if self.forward_open:
            raise RunError("an evaluation forward failed part-way on rank 0; the ranks are out of step")
        if torch.is_grad_enabled() or args or set(kwargs) - {"input_ids", "attention_mask"}:
            raise RunError("under silo.parallel fsdp the agent's model runs evaluation forwards only "
                           "(no gradients; input_ids and attention_mask as keywords)")
        _send_command(_FORWARD)
        _send_batch(kwargs["input_ids"], kwargs.get("attention_mask"), module.training)
        self.forward_open = True

    def _forward_done(self, module: nn.Module, args: tuple, output: object) -> None:
        self.forward_open = False

    @torch.no_grad()
    def follow_forward(self) -> None:
        """The forward rank 0 runs, on the same batch (its result is rank 0's alone)."""
        batch, training = _receive_batch(self.device)
        self.module.train(training)
        self.module(**batch)

    def _train(self, data: ExampleBatches, plan: RoundPlan, progress: bool) -> TrainResult:
        rank, world, device = self.rank, self.setup.world_size, self.device
        params = [p for _, p in self.params]
        anchor = [p.detach().clone() for p in params] if plan.prox_mu > 0 else None
        optimizer = torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=plan.weight_decay)
        generator = torch.Generator().manual_seed(plan.seed)  # the same whole batches on every rank
        torch.manual_seed(plan.seed)
        self.view.train()
        steps: range | Iterator[int] = range(plan.local_steps)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc=f"local steps ({world} processes)", unit="step", leave=False)
        tokens, first, last = 0, math.nan, math.nan
        start = time.perf_counter()
        for step in steps:
            optimizer.zero_grad(set_to_none=True)
            token_loss = torch.zeros((), dtype=torch.float64, device=device)  # this rank's part of the step loss
            for micro in range(plan.grad_accum):
                whole = data.sample(plan.batch_size, generator)
                count = scored_tokens(whole)
                rows, weight = shard_rows(whole, rank, world), 1.0
                if rows["input_ids"].shape[0] == 0:  # fewer rows than ranks (fsdp): this rank must still take
                    rows, weight = {k: v[:1] for k, v in whole.items()}, 0.0  # part; its stand-in row counts nil
                batch = {k: v.to(device) for k, v in rows.items()}
                with self._syncing(micro == plan.grad_accum - 1):  # average gradients on the last micro-batch
                    losses, _ = token_losses(self.view, batch)
                    part = losses.sum() * weight / max(count, 1)  # this rank's share of the batch's token mean
                    (part * world / plan.grad_accum).backward()  # DDP and FSDP divide summed gradients by world
                token_loss += part.detach().double() / plan.grad_accum
                tokens += count
            prox = _add_prox_gradient(params, anchor, plan.prox_mu) if anchor is not None else 0.0
            optimizer.step()
            dist.all_reduce(token_loss)
            last = float(token_loss) + prox
            first = last if step == 0 else first
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return TrainResult(plan.local_steps, tokens, time.perf_counter() - start, first, last)

    def _syncing(self, sync: bool):
        if self.setup.parallel == "ddp":
            return nullcontext() if sync else self.view.no_sync()
        self.module.set_requires_gradient_sync(sync)
        return nullcontext()


def _add_prox_gradient(params: list[nn.Parameter], anchor: list[torch.Tensor], mu: float) -> float:
    """FedProx's pull ``mu (p - anchor)`` added once to the averaged gradients (the same as differentiating
    its term on every rank); returns the term's value, summed over shards where parameters are sharded."""
    squares = torch.zeros((), dtype=torch.float64)
    sharded = False
    for p, a in zip(params, anchor):
        diff = p.detach() - a
        if p.grad is not None:
            p.grad.add_(diff, alpha=mu)
        if isinstance(diff, DTensor):
            diff, sharded = diff.to_local(), True
        squares += (diff.double() ** 2).sum().cpu()
    if sharded:
        dist.all_reduce(squares)
    return 0.5 * mu * float(squares)


def _shard(model: nn.Module, device: torch.device, cuda: bool) -> None:
    """FSDP2 over every decoder layer, the input embeddings and the output head, then the rest (final norm)
    as the root group. FSDP2 keeps the root's own parameters gathered from forward through backward; a
    large vocabulary's embeddings and head weigh as much as several layers, so they are groups of their
    own, gathered only while they run."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = dist.device_mesh.init_device_mesh(device.type, (dist.get_world_size(),))
    # each tensor computes in its own dtype, as in one process (a bf16 base in bf16, LoRA in float32);
    # on GPUs gradients are reduced in float32, so a bf16 model loses nothing summing over ranks
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32 if cuda else None)
    structure = discover(model)
    units = decoder_layers(model, structure) + vocabulary_modules(model, structure)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if not cuda:
        _gather_one_group_at_a_time(model, units)


def _gather_one_group_at_a_time(root: nn.Module, units: list[nn.Module]) -> None:
    """On the CPU, hold no group gathered ahead of its turn. FSDP2 overlaps gathers with compute on GPU
    streams: in backward it gathers the next group while this one runs, and in forward it frees each
    group's gather buffer only after the next group's gather. Gloo on the CPU has no streams to overlap,
    so on a CPU rank that is one to two layers of memory for nothing: without it a training rank of the
    sharded-silo bench peaked 58 MiB (one layer) higher, round times the same within noise."""
    for group in units + [root]:
        group.set_modules_to_backward_prefetch([group])  # itself: already gathered when asked, so nothing
    set_async = getattr(root, "_set_unshard_async_op", None)  # FSDP2's own switch, for every group under the
    if set_async is not None:  # root: gathers that free their buffer at once (torch >= 2.6)
        set_async(True)


@torch.no_grad()
def _hand_out(targets: list[tuple[str, torch.Tensor]], pairs: Iterable[tuple[str, torch.Tensor]] | None,
              device: torch.device, every: bool = True) -> None:
    """Rank 0 (the one given ``pairs``: a model's tensors, a checkpoint read layer by layer, a state) sends
    each tensor in the order it comes, after its index among ``targets``; every rank copies what it keeps
    of each (its shard under FSDP). Tensor by tensor, so no rank holds more than one whole; a source that
    fails part-way (a checkpoint missing a tensor) stops every rank with its reason. ``every``: each
    target must receive a value."""
    index = torch.zeros(1, dtype=torch.int64)
    received = set()
    if pairs is not None:  # rank 0
        where = {name: i for i, (name, _) in enumerate(targets)}
        try:
            for name, tensor in pairs:
                if name not in where:
                    raise LayoutError(f"the model has no tensor {name!r} to take")
                index[0] = where[name]
                dist.broadcast(index, 0)
                target = targets[where[name]][1]
                _copy_into(target, tensor.detach().to(device, target.dtype).contiguous(), sent=tensor)
                received.add(where[name])
        except Exception as exc:
            index[0] = _FAILED
            dist.broadcast(index, 0)
            raise _GaveUp(_one_line(exc)) from exc
        index[0] = _DONE
        dist.broadcast(index, 0)
    else:
        while True:
            dist.broadcast(index, 0)
            if index[0] == _FAILED:
                raise _Abandoned("rank 0 failed while handing out tensors")
            if index[0] == _DONE:
                break
            target = targets[int(index[0])][1]
            _copy_into(target, torch.empty(target.shape, dtype=target.dtype, device=device))
            received.add(int(index[0]))
    if every and len(received) != len(targets):
        missing = next(name for i, (name, _) in enumerate(targets) if i not in received)
        raise LayoutError(f"no value was handed out for {missing!r}")


def _tensors_of(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    return chain(model.named_parameters(), model.named_buffers())


def _pairs_of(source: nn.Module | CheckpointStream | None) -> Iterable[tuple[str, torch.Tensor]] | None:
    """What rank 0 hands out at start-up: a checkpoint as it reads it, or a model's tensors; None elsewhere."""
    if source is None or isinstance(source, CheckpointStream):
        return source
    return _tensors_of(source)


def _copy_into(target: torch.Tensor, whole: torch.Tensor, sent: torch.Tensor | None = None) -> None:
    """Broadcast ``whole`` from rank 0 (``whole`` is the receiving buffer elsewhere) and keep this rank's
    part of it in ``target`` (nothing to copy where ``target`` is the tensor sent: ddp's rank 0)."""
    dist.broadcast(whole, 0)
    if isinstance(target, DTensor):
        target.copy_(distribute_tensor(whole.to(target.dtype), target.device_mesh, target.placements,
                                       src_data_rank=None))
    elif target is not sent:
        target.copy_(whole)


def _send_command(command: int, plan: RoundPlan | None = None) -> None:
    ints = torch.tensor([command] + [getattr(plan, f) if plan else 0 for f in _INTS], dtype=torch.int64)
    floats = torch.tensor([getattr(plan, f) if plan else 0.0 for f in _FLOATS], dtype=torch.float64)
    dist.broadcast(ints, 0, group=_control())
    dist.broadcast(floats, 0, group=_control())


def _send_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, training: bool) -> None:
    header = torch.tensor([*input_ids.shape, attention_mask is not None, training], dtype=torch.int64)
    dist.broadcast(header, 0, group=_control())
    dist.broadcast(input_ids.detach().to("cpu", torch.int64).contiguous(), 0, group=_control())
    if attention_mask is not None:
        dist.broadcast(attention_mask.detach().to("cpu", torch.int64).contiguous(), 0, group=_control())


def _receive_batch(device: torch.device) -> tuple[dict[str, torch.Tensor], bool]:
    header = torch.zeros(4, dtype=torch.int64)
    dist.broadcast(header, 0, group=_control())
    rows, columns, masked, training = header.tolist()
    batch = {}
    for name in ("input_ids", "attention_mask") if masked else ("input_ids",):
        tensor = torch.zeros(rows, columns, dtype=torch.int64)
        dist.broadcast(tensor, 0, group=_control())
        batch[name] = tensor.to(device)
    return batch, bool(training)


def _receive_command() -> tuple[int, RoundPlan]:
    ints = torch.zeros(1 + len(_INTS), dtype=torch.int64)
    floats = torch.zeros(len(_FLOATS), dtype=torch.float64)
    dist.broadcast(ints, 0, group=_control())
    dist.broadcast(floats, 0, group=_control())
    values = ints.tolist()
    plan = RoundPlan(**dict(zip(_INTS, values[1:])), **dict(zip(_FLOATS, floats.tolist())))
    return values[0], plan


_CONTROL: dict[str, dist.ProcessGroup] = {}


def _join_group(rank: int, setup: RankSetup, store: dist.Store | None = None) -> None:
    """Join the silo's process group (through ``store``, else torchrun's environment), and its control
    group: gloo, waiting between rounds without end."""
    if dist.is_initialized():
        raise ConfigError("a process holds one silo with world_size > 1 at a time (a process group is already "
                          "initialised here)")
    if not setup.cuda:
        map_large_blocks_directly()
    where = {"store": store} if store is not None else {"init_method": "env://"}
    dist.init_process_group(_backend(setup.cuda), rank=rank, world_size=setup.world_size,
                            timeout=timedelta(seconds=setup.timeout_s), **where)
    _CONTROL["group"] = dist.new_group(backend="gloo", timeout=_IDLE)


def _control() -> dist.ProcessGroup:
    return _CONTROL["group"]


def _backend(cuda: bool) -> str:
    return "nccl" if cuda else "gloo"


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def shard_rows(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s contiguous block of the batch's rows (blocks differ by at most one row; empty when
    the batch has fewer rows than there are ranks)."""
    sizes = [len(block) for block in torch.tensor_split(torch.arange(batch["input_ids"].shape[0]), world_size)]
    begin = sum(sizes[:rank])
    return {k: v[begin:begin + sizes[rank]] for k, v in batch.items()}


def scored_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions whose next-token loss counts (what :func:`token_losses` masks in)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
