"""Start the aggregator: build the initial global model, serve gRPC over mutual TLS, drive rounds."""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from aggregator.checkpoint import archive_previous, resume_point
from aggregator.coordinator import Coordinator
from aggregator.metrics import final_table
from aggregator.service import FederationService
from aggregator.strategies import build_strategy
from crypto.pki import PkiPaths
from crypto.tls import handshake_failures_logged, server_credentials
from fcmoe.config import Config
from fcmoe.errors import ConfigError
from fcmoe.fileio import write_atomic
from fcmoe.logs import log_event
from fcmoe.model import ExpertLayout, base_fingerprint, build_model, trainable_state
from fcmoe.model.build import num_experts
from protos import codec
from protos import fcmoe_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", codec.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", codec.MAX_MESSAGE_BYTES),
    # ping idle connections: a link that died without a FIN (half-open) is closed within ~30 s, so a
    # cut upload is kept for its resume instead of holding a worker until the phase deadline
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # one aggregator per port: with gRPC's default SO_REUSEPORT a second one would bind the same port
    # and silos would be split between two runs
    ("grpc.so_reuseport", 0),
]


@dataclass
class RunningAggregator:
    server: grpc.Server
    coordinator: Coordinator
    port: int


def initial_state(config: Config) -> tuple[ExpertLayout, str, dict]:
    """Layout, base fingerprint and initial global unit vectors, from the model config alone."""
    model = build_model(config.model, "cpu", seed=config.run.seed)
    layout = ExpertLayout.from_model(model, num_experts(model.config))
    return layout, base_fingerprint(model), layout.split(trainable_state(model))


def build_coordinator(config: Config, *, run_id: str | None = None) -> Coordinator:
    """The run's coordinator, from the config alone (the model defines layout and initial global).

    With ``aggregator.resume`` (the default) an unfinished run in ``run.output_dir`` goes on from its
    last completed round, so a crashed aggregator is restarted with the same command; otherwise an
    earlier run's checkpoints there are moved aside and a new run starts, under a random id, or under
    ``run_id`` (benchmarks, for repeatable sketch keys: masks, shares and silos' records are keyed by
    the run id too, so one id must never name two runs that share silos or an output folder)."""
    layout, fingerprint, initial = initial_state(config)
    output_dir = config.run.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    strategy = build_strategy(config.federation.strategy, config.federation.min_group_size)
    checkpoints = output_dir / "checkpoints"
    point = resume_point(checkpoints, layout.hash, fingerprint, strategy.name) if config.aggregator.resume else None
    if point is not None and run_id is not None:
        raise ConfigError(f"run id {run_id!r} given for a new run, but {checkpoints} holds unfinished run "
                          f"{point.record.run_id}; set aggregator.resume: false")
    if point is None:
        archived = archive_previous(checkpoints)
        if archived is not None:
            log_event(log, "previous_run_archived", checkpoints=str(archived))
    return Coordinator(config, layout.hash, fingerprint, layout.unit_sizes(), initial, strategy, output_dir,
                       resume=point, run_id=run_id)


def start_aggregator(config: Config) -> RunningAggregator:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.aggregator.max_workers),
                         options=GRPC_OPTIONS)
    address = f"{config.aggregator.host}:{config.aggregator.port}"
    # the port first: a second aggregator on it stops here, before it touches the run's files
    try:
        port = server.add_secure_port(address, server_credentials(PkiPaths(config.aggregator.pki_dir)))
    except RuntimeError:  # grpcio raises where older versions returned 0
        port = 0
    if port == 0:
        raise ConfigError(f"aggregator.port = {config.aggregator.port}: cannot listen on {address} (in use, e.g. by "
                          "another aggregator, or not an address of this machine); stop it or choose another port")
    try:
        coordinator = build_coordinator(config)
    except BaseException:
        server.stop(0)
        raise
    pb_grpc.add_FederationServicer_to_server(FederationService(coordinator), server)
    server.start()
    if config.aggregator.port_file is not None:
        write_atomic(config.aggregator.port_file, str(port))
    if not handshake_failures_logged():
        log_event(log, "tls_refusals_hidden", level=logging.WARNING,
                  reason="GRPC_VERBOSITY hides gRPC's one-line record of refused client certificates")
    if config.federation.secure_aggregation.mode == "none":
        log_event(log, "plaintext_mode", level=logging.WARNING,
                  reason="secure_aggregation.mode none: every silo's weighted delta (and FC-MoE sketch) reaches this "
                         "process in the clear; for debugging and baselines only")
    log_event(log, "aggregator_listening", address=f"{config.aggregator.host}:{port}", run_id=coordinator.run_id,
              layout=coordinator.layout_hash[:12], units=len(coordinator.unit_sizes),
              parameters=sum(coordinator.unit_sizes.values()),
              strategy=config.federation.strategy.name, rounds=config.federation.rounds)
    return RunningAggregator(server, coordinator, port)


def drive(coordinator: Coordinator, stop: threading.Event | None = None, tick_s: float = 0.05,
          progress: bool = False) -> None:
    """Advance rounds until the run is done (or ``stop`` is set)."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=coordinator.config.federation.rounds, desc="rounds", unit="round")
    try:
        while not coordinator.done and not (stop and stop.is_set()):
            coordinator.step()
            if bar is not None:
                bar.n = coordinator.machine.version
                bar.refresh()
            coordinator.wait_for_activity(tick_s)
    finally:
        if bar is not None:
            bar.close()


def run_aggregator(config: Config, progress: bool = True) -> int:
    running = start_aggregator(config)
    try:
        drive(running.coordinator, progress=progress)
        time.sleep(0.5)  # let silos collect their DONE task
    finally:
        running.server.stop(grace=2).wait()
    coordinator = running.coordinator
    print(final_table(coordinator.metrics.rows()))
    print(f"report: {Path(config.run.output_dir).resolve()}")
    return 0 if coordinator.machine.succeeded else 1
