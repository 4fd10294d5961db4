"""Start the aggregator: build the initial global model, serve gRPC over mutual TLS, drive rounds."""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from aggregator.checkpoint import resume_point
from aggregator.coordinator import Coordinator
from aggregator.metrics import final_table
from aggregator.monitor import StatusServer, read_basic_auth
from aggregator.service import FederationService
from aggregator.strategies import build_strategy
from crypto.pki import PkiPaths
from crypto.tls import handshake_failures_logged, server_credentials
from fcmoe.config import Config
from fcmoe.errors import ConfigError, PkiError
from fcmoe.fileio import check_writable_folder, write_atomic
from fcmoe.logs import log_event
from fcmoe.signals import StopRequest
from fcmoe.model import ExpertLayout, base_fingerprint, build_model, trainable_state
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
    status: StatusServer | None = None  # aggregator.status_port: /metrics, /api/status, the status page

    def stop(self, grace: float | None = None) -> None:
        _stop_serving(self.server, self.status, grace)


def _stop_serving(server: grpc.Server, status: StatusServer | None, grace: float | None) -> None:
    """Stop serving silos (in-flight RPCs get ``grace`` seconds), then the status endpoint."""
    try:
        server.stop(grace).wait()
    finally:
        if status is not None:
            status.close()


def initial_state(config: Config) -> tuple[ExpertLayout, str, dict]:
    """Layout, base fingerprint and initial global unit vectors, from the model config alone."""
    model = build_model(config.model, "cpu", seed=config.run.seed)
    layout = ExpertLayout.from_model(model)
    return layout, base_fingerprint(model), layout.split(trainable_state(model))


def build_coordinator(config: Config, *, run_id: str | None = None, resume: bool = False) -> Coordinator:
    """The run's coordinator, from the config alone (the model defines layout and initial global).

    With ``aggregator.resume`` (the default) a run in ``run.output_dir`` that stopped without an
    outcome (killed, crashed, stopped by a signal) goes on from its last completed round, so a crashed
    aggregator is restarted with the same command. A run that *aborted* (e.g. silos missed the join
    deadline) goes on only with ``resume=True`` (``--resume``): whatever stopped it needs a look first.
    A finished run is never resumed. A new run moves earlier checkpoints aside, under a random id or
    ``run_id`` (benchmarks, for repeatable sketch keys: masks, shares and silos' records are keyed by
    the run id too, so one id must never name two runs that share silos or an output folder).
    Nothing on disk changes before every check here has passed."""
    layout, fingerprint, initial = initial_state(config)
    checkpoints = config.run.output_dir / "checkpoints"
    strategy = build_strategy(config.federation.strategy, config.federation.min_group_size)
    if resume and not config.aggregator.resume:
        raise ConfigError("--resume given, but aggregator.resume is false in the config; drop one of them")
    point = resume_point(checkpoints, layout.hash, fingerprint, strategy.name) if config.aggregator.resume else None
    if point is not None and point.record.outcome and not resume:
        raise ConfigError(f"{checkpoints} holds run {point.record.run_id}, which stopped at round "
                          f"{point.checkpoint.version}: {point.record.outcome}; start again with --resume to go on "
                          "from there, or set aggregator.resume: false (or another run.output_dir) for a new run")
    if resume and point is None:
        raise ConfigError(f"--resume: {checkpoints} holds no unfinished run to go on with (a finished run is never "
                          "resumed); start without --resume for a new run")
    if point is not None and run_id is not None:
        raise ConfigError(f"run id {run_id!r} given for a new run, but {checkpoints} holds unfinished run "
                          f"{point.record.run_id}; set aggregator.resume: false")
    return Coordinator(config, layout.hash, fingerprint, layout.unit_sizes(), initial, strategy, config.run.output_dir,
                       resume=point, run_id=run_id)


def start_aggregator(config: Config, resume: bool = False) -> RunningAggregator:
    """Every start-up check first (certificates, port, writable folders, the run to resume), then the
    first write: a start that fails leaves the disk as it found it."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.aggregator.max_workers),
                         options=GRPC_OPTIONS)
    address = f"{config.aggregator.host}:{config.aggregator.port}"
    # the port first: a second aggregator on it stops here, before it touches the run's files
    try:
        credentials = server_credentials(PkiPaths(config.aggregator.pki_dir))
    except PkiError as exc:
        raise ConfigError(f"aggregator.pki_dir = {config.aggregator.pki_dir}: {exc} (`fcmoe certs --dir DIR --silos "
                          "NAMES` creates a CA and every certificate)") from None
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio raises where older versions returned 0
        port = 0
    if port == 0:
        raise ConfigError(f"aggregator.port = {config.aggregator.port}: cannot listen on {address} (in use, e.g. by "
                          "another aggregator, or not an address of this machine); stop it or choose another port")
    status: StatusServer | None = None
    try:
        check_writable_folder(config.run.output_dir, "run.output_dir")
        if config.aggregator.port_file is not None:
            check_writable_folder(config.aggregator.port_file.parent, "aggregator.port_file")
        if config.aggregator.status_port is not None:  # bound now: a port in use fails before any write
            auth = read_basic_auth(config.aggregator.status_auth_file) if config.aggregator.status_auth_file else None
            status = StatusServer(config.aggregator.status_host, config.aggregator.status_port, auth)
        coordinator = build_coordinator(config, resume=resume)
        pb_grpc.add_FederationServicer_to_server(FederationService(coordinator), server)
        server.start()
        if status is not None:
            status.serve(coordinator.status)
        if config.aggregator.port_file is not None:
            write_atomic(config.aggregator.port_file, str(port))
    except BaseException:  # nothing of a failed start keeps serving
        _stop_serving(server, status, 0)
        raise
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
    return RunningAggregator(server, coordinator, port, status)


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


def run_aggregator(config: Config, progress: bool = True, resume: bool = False) -> int:
    """Serve the run to its end; SIGTERM/SIGINT stop it between steps, resumable by the same command."""
    with StopRequest() as stop:
        running = start_aggregator(config, resume=resume)
        try:
            drive(running.coordinator, stop.event, progress=progress)
            if stop.signal is None:
                time.sleep(0.5)  # let silos collect their DONE task
            if running.status is not None and running.coordinator.done:  # the final state, for one more scrape
                stop.event.wait(config.aggregator.status_linger_s)
        finally:
            running.stop(grace=2)
    coordinator = running.coordinator
    if stop.signal is not None and not coordinator.done:
        log_event(log, "stopped", level=logging.WARNING, signal=stop.signal.name, run_id=coordinator.run_id,
                  version=coordinator.machine.version,
                  to_go_on="start the aggregator again with the same command: the run resumes from this version")
        return stop.exit_status
    print(final_table(coordinator.metrics.rows()))
    print(f"report: {Path(config.run.output_dir).resolve()}")
    return 0 if coordinator.machine.succeeded else 1
