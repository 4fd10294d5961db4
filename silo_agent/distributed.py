"""One round of a silo's local training shared by ``silo.world_size`` processes (data parallel).

A silo with several GPUs (or several CPU sockets) trains faster when each process takes a share of
every batch. The processes are started with ``torch.multiprocessing`` (spawn), meet over a
``torch.distributed`` process group on a free loopback port (gloo on CPU, NCCL with one GPU per
process on CUDA) and average gradients with ``DistributedDataParallel``; nothing here schedules
processes itself. The update is the one a single process would make on the whole batch:

- every rank rebuilds the model from the same ``ModelConfig`` (the frozen base is the same seeded
  init or the same checkpoint on disk) and loads the agent's trainable state;
- every rank draws the *whole* batch with the same seeded generator, keeps a disjoint block of its
  rows, and divides its summed token loss by the whole batch's token count, times ``world_size``
  so that DDP's mean over ranks is the single-process token mean (ranks hold different token
  counts, so a plain DDP average of per-rank means would not be);
- the optimiser (AdamW on every rank, same gradients) keeps the replicas identical.

Rank 0 hands back the trained state and the training figures through files in a private temporary
folder (safetensors + JSON), and the agent loads them. A failing rank stops the others at once (its
exit is seen by the parent, which terminates the rest) and surfaces as one :class:`RunError` line;
the process group's timeout bounds any collective left waiting.
DP-SGD stays single-process: the config refuses ``world_size > 1`` with ``dp.enabled``.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fcmoe.config import ModelConfig, SiloConfig
from fcmoe.errors import ConfigError, RunError
from fcmoe.logs import log_event, setup_logging
from fcmoe.model import build_model, load_trainable_state, trainable_state
from silo_agent.data import IGNORE_INDEX, ExampleBatches
from silo_agent.training import LocalPlan, TrainResult, token_losses, train_locally

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0  # a collective waiting longer than this means a rank is stuck: fail, do not hang
_GRACE_S = 5.0  # after one rank fails, how long the others get to exit before they are killed
_START, _TRAINED, _RESULT = "start.safetensors", "trained.safetensors", "result.json"


def check_world_size(silo: SiloConfig) -> None:
    """At agent start: a CUDA silo needs one visible GPU per process (the schema cannot know the machine)."""
    if silo.world_size > 1 and silo.device.startswith("cuda"):
        visible = torch.cuda.device_count()
        if silo.world_size > visible:
            raise ConfigError(f"silo.world_size = {silo.world_size}: only {visible} GPU(s) visible "
                              "(one process per GPU; check CUDA_VISIBLE_DEVICES)")


@dataclass(frozen=True)
class _RankJob:
    """Everything a rank needs, handed over by spawn: pickled between this silo's own processes only (the
    plan's numbers came from the aggregator as protobuf fields; no bytes from the network are unpickled)."""

    model: ModelConfig
    data: ExampleBatches
    plan: LocalPlan
    world_size: int
    cuda: bool
    init_method: str
    folder: str
    threads: int
    timeout_s: float
    progress: bool
    log_level: str


def train_distributed(model: nn.Module, model_config: ModelConfig, data: ExampleBatches, plan: LocalPlan,
                      world_size: int, device: torch.device, progress: bool = False,
                      timeout_s: float = DEFAULT_TIMEOUT_S) -> TrainResult:
    """Train ``model`` in place as :func:`silo_agent.training.train_locally` would, over ``world_size``
    processes.

    A batch smaller than ``world_size`` leaves a process without rows: that round trains in this
    process instead (same update), rather than stopping the silo over the aggregator's batch size."""
    if plan.batch_size < world_size:
        log_event(log, "training_in_one_process", level=logging.WARNING,
                  reason=f"batch_size={plan.batch_size} is below world_size={world_size}")
        return train_locally(model, data, plan, device, progress)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fcmoe-ranks-") as tmp:
        folder = Path(tmp)
        save_file({k: v.cpu().contiguous() for k, v in trainable_state(model).items()}, str(folder / _START))
        job = _RankJob(model=model_config, data=data, plan=plan, world_size=world_size, cuda=device.type == "cuda",
                       init_method=f"tcp://127.0.0.1:{_free_port()}", folder=tmp,
                       threads=max(1, torch.get_num_threads() // world_size), timeout_s=timeout_s,
                       progress=progress,
                       log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()))
        _launch(job)
        load_trainable_state(model, load_file(str(folder / _TRAINED)))
        figures = json.loads((folder / _RESULT).read_text())
    seconds = time.perf_counter() - start
    log_event(log, "distributed_training_done", world_size=world_size, backend=_backend(job.cuda),
              train_s=round(figures["seconds"], 3), total_s=round(seconds, 3))
    # the round spent the whole time, start-up included: report that
    return TrainResult(figures["steps"], figures["tokens"], seconds, figures["loss_first"], figures["loss_last"])


def _backend(cuda: bool) -> str:
    return "nccl" if cuda else "gloo"


def _free_port() -> int:
    """A loopback port free right now (the rendezvous binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(job: _RankJob) -> None:
    """Start the ranks, wait for all of them, and never leave one behind; a failure becomes one line."""
    context = mp.start_processes(_rank_main, args=(job,), nprocs=job.world_size, join=False, daemon=True,
                                 start_method="spawn")
    try:
        while not context.join(grace_period=_GRACE_S):
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        raise RunError(_failure(job, exc)) from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
        for path in context.error_files:  # torch leaves a failed rank's traceback file behind
            Path(path).unlink(missing_ok=True)


def _failure(job: _RankJob, exc: mp.ProcessRaisedException | mp.ProcessExitedException) -> str:
    rank = exc.error_index
    note = Path(job.folder) / f"rank{rank}.error"
    if note.exists():
        reason = note.read_text().strip()
    elif isinstance(exc, mp.ProcessExitedException):
        reason = f"exited with {'signal ' + exc.signal_name if exc.signal_name else f'code {exc.exit_code}'}"
    else:
        reason = (str(exc).strip().splitlines() or ["failed"])[-1]
    log_event(log, "rank_failed", level=logging.ERROR, rank=rank, world_size=job.world_size, reason=reason)
    log_event(log, "rank_traceback", level=logging.DEBUG, rank=rank, traceback=str(exc).strip())
    return f"local training process {rank} of {job.world_size} failed: {reason}"


def _rank_main(rank: int, job: _RankJob) -> None:
    """Entry point of one rank (a fresh interpreter): join the group, train, leave the group."""
    try:
        setup_logging(f"silo-rank{rank}", job.log_level)
        torch.set_num_threads(job.threads)
        device = torch.device("cuda", rank) if job.cuda else torch.device("cpu")
        if job.cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(_backend(job.cuda), init_method=job.init_method, rank=rank,
                                world_size=job.world_size, timeout=timedelta(seconds=job.timeout_s))
        try:
            _train_rank(rank, job, device)
            dist.barrier()  # nobody leaves while a peer still talks to it: gloo aborts on a vanished peer
        finally:
            dist.destroy_process_group()
    except Exception as exc:
        # one line for the agent; torch's error file carries the traceback (logged at DEBUG by the parent)
        message = (str(exc).strip().splitlines() or [""])[0]
        (Path(job.folder) / f"rank{rank}.error").write_text(f"{type(exc).__name__}: {message}")
        raise


def shard_rows(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s contiguous block of the batch's rows (blocks differ by at most one row)."""
    rows = torch.tensor_split(torch.arange(batch["input_ids"].shape[0]), world_size)[rank]
    return {k: v[rows[0]:rows[-1] + 1] for k, v in batch.items()}


def scored_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions whose next-token loss counts (what :func:`token_losses` masks in)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _train_rank(rank: int, job: _RankJob, device: torch.device) -> None:
    plan, world = job.plan, job.world_size
    model = build_model(job.model, device)
    load_trainable_state(model, load_file(str(Path(job.folder) / _START)))
    replica = DistributedDataParallel(model, device_ids=[device.index] if job.cuda else None)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if plan.prox_mu > 0 else None
    optimizer = torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=plan.weight_decay)
    generator = torch.Generator().manual_seed(plan.seed)  # the same whole batches on every rank
    torch.manual_seed(plan.seed)
    model.train()
    steps = range(plan.local_steps)
    if job.progress and rank == 0:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"local steps ({world} processes)", unit="step", leave=False)
    tokens, first, last = 0, math.nan, math.nan
    start = time.perf_counter()
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        token_loss = torch.zeros((), dtype=torch.float64, device=device)  # this rank's part of the step loss
        prox_loss = 0.0
        for micro in range(plan.grad_accum):
            whole = job.data.sample(plan.batch_size, generator)
            count = scored_tokens(whole)
            batch = {k: v.to(device) for k, v in shard_rows(whole, rank, world).items()}
            # DDP all-reduces on the last micro-batch only; earlier ones accumulate locally
            with replica.no_sync() if micro < plan.grad_accum - 1 else nullcontext():
                part, prox = _backward(replica, batch, count, world, plan, params, anchor)
            token_loss += part / plan.grad_accum
            prox_loss += prox / plan.grad_accum
            tokens += count
        optimizer.step()
        dist.all_reduce(token_loss)
        last = float(token_loss) + prox_loss
        first = last if step == 0 else first
    if job.cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if rank == 0:
        _write_outputs(Path(job.folder), model, TrainResult(plan.local_steps, tokens, seconds, first, last))


def _backward(replica: nn.Module, batch: dict[str, torch.Tensor], count: int, world: int, plan: LocalPlan,
              params: list[nn.Parameter], anchor: list[torch.Tensor] | None) -> tuple[torch.Tensor, float]:
    """One micro-batch's backward pass on this rank's rows; returns its share of the token loss and
    the FedProx term (the same on every rank: the replicas are identical)."""
    losses, _ = token_losses(replica, batch)
    part = losses.sum() / max(count, 1)  # this rank's share of the whole batch's token mean
    loss = part * world  # DDP divides the summed gradients by world_size
    prox = 0.0
    if anchor is not None:
        term = 0.5 * plan.prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
        loss = loss + term
        prox = term.item()
    (loss / plan.grad_accum).backward()
    return part.detach().double(), prox


def _write_outputs(folder: Path, model: nn.Module, result: TrainResult) -> None:
    save_file({k: v.cpu().contiguous() for k, v in trainable_state(model).items()}, str(folder / _TRAINED))
    (folder / _RESULT).write_text(json.dumps(asdict(result)))
