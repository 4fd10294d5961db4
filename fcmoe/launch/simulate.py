"""A whole federation on one machine: the aggregator and N silos as separate processes on loopback.

The launcher writes one config file per role (exactly what a real deployment would use), makes the
certificates on first use, starts the aggregator on a free port, then the silos, and waits. Each
process logs to ``OUTPUT/logs/<role>.log``. Children are terminated if the launcher is interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from fcmoe.config import SILO_PLACEHOLDER, AggregatorConfig, Config, DataConfig, SiloConfig, dump_config, silo_names
from fcmoe.errors import ConfigError, RunError
from fcmoe.logs import log_event
from fcmoe.signals import StopRequest

log = logging.getLogger(__name__)


def silo_data(data: DataConfig, name: str) -> DataConfig:
    """Silo ``name``'s own data section: its ``data.silos`` entry, or ``{silo}`` in ``train_file`` /
    ``eval_file`` replaced by its name; other sources (builtin, shakespeare) are the same for every silo."""
    if data.silos is not None:
        files = data.silos[name]
        train, held_out = files.train_file, files.eval_file
    elif data.train_file is not None and data.eval_file is not None:
        train, held_out = data.train_file, data.eval_file
    else:
        return data
    return data.model_copy(update={"silos": None, "train_file": _expand(train, name),
                                   "eval_file": _expand(held_out, name)})


def _expand(path: Path, name: str) -> Path:
    return Path(str(path).replace(SILO_PLACEHOLDER, name))


def missing_data_files(config: Config) -> list[str]:
    """``KEY = PATH`` for every simulated silo's data file that is not a file (checked before anything starts)."""
    assert config.simulation is not None
    data, missing = config.data, []
    for name in silo_names(config.simulation.silos):
        own = silo_data(data, name)
        for key in ("train_file", "eval_file"):
            path = getattr(own, key)
            if path is None or path.is_file():
                continue
            if data.silos is not None:
                where = f"data.silos.{name}.{key}"
            else:  # one file for every silo is named once
                where = f"data.{key}" + (f" ({name})" if SILO_PLACEHOLDER in str(getattr(data, key)) else "")
            if f"{where} = {path}" not in missing:
                missing.append(f"{where} = {path}")
    return missing


def role_configs(config: Config, port: int, sketch_key: str | None = None) -> tuple[Config, list[Config]]:
    """The aggregator's and every silo's own config, derived from one simulation file.

    ``sketch_key`` (the silos' shared secret for keyed sketches) goes into silo files only.
    """
    sim = config.simulation
    assert sim is not None
    out = config.run.output_dir
    pki = out / "certs"
    agg = config.model_copy(update={
        "aggregator": AggregatorConfig(**{**config.aggregator.model_dump(), "port": port, "pki_dir": pki,
                                          "port_file": out / "aggregator.port",
                                          "resume": False}),  # one launch, one run: silos start afresh too
        "simulation": None,
    })
    silos = []
    for i, name in enumerate(silo_names(sim.silos)):
        silo = SiloConfig(name=name, aggregator=f"127.0.0.1:{port}", pki_dir=pki, index=i, num_silos=sim.silos,
                          threads=sim.threads_per_silo, connect_timeout_s=min(sim.timeout_s, 600.0),
                          sketch_key=sketch_key, accept_modes=[config.federation.secure_aggregation.mode],
                          min_group_size=max(2, config.federation.min_group_size),
                          dp=sim.silo_dp.model_copy(update={"ledger": out / "ledgers" / f"{name}.jsonl"}))
        silos.append(config.model_copy(update={"silo": silo, "simulation": None, "data": silo_data(config.data, name)}))
    return agg, silos


class _Stopped(Exception):
    """The launcher was asked to stop (SIGTERM/SIGINT)."""


def _spawn(role: str, config_path: Path, log_path: Path, threads: int, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    log_file = open(log_path, "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "fcmoe", role, str(config_path), "--no-progress", *extra],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    finally:
        log_file.close()


def _wait_for_port(path: Path, aggregator: subprocess.Popen, timeout_s: float) -> int:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        if aggregator.poll() is not None:
            raise RunError(f"aggregator exited with status {aggregator.returncode} before listening; "
                              f"see {path.parent / 'logs' / 'aggregator.log'}")
        time.sleep(0.1)
    raise RunError(f"aggregator did not listen within {timeout_s:.0f} s")


def _completed_rounds(out: Path, since: float) -> int:
    """Rounds this run completed (a ``latest`` left by an earlier run in the same folder does not count)."""
    latest = out / "checkpoints" / "latest"
    try:
        if latest.stat().st_mtime < since:
            return 0
        return int(latest.read_text().strip().split("-")[-1])
    except (OSError, ValueError):
        return 0


def simulate(config: Config, progress: bool = True, resume: bool = False) -> int:
    """Run the federation as local processes; SIGTERM/SIGINT pass on to them (each stops at its next
    safe point), and the same command resumes the run."""
    with StopRequest() as stop:
        return _simulate(config, progress, resume, stop)


def _simulate(config: Config, progress: bool, resume: bool, stop: StopRequest) -> int:
    from crypto.pki import ensure_pki

    sim = config.simulation
    if sim is None:
        raise ConfigError("simulation section missing: set simulation.silos to run a local federation")
    if config.federation.min_silos > sim.silos:
        raise ConfigError(f"federation.min_silos = {config.federation.min_silos}: exceeds simulation.silos = {sim.silos}")
    missing = missing_data_files(config)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ConfigError(f"no such file: {'; '.join(missing[:3])}{more}")
    out = config.run.output_dir
    logs, roles = out / "logs", out / "roles"
    logs.mkdir(parents=True, exist_ok=True)
    (out / "aggregator.port").unlink(missing_ok=True)
    ensure_pki(out / "certs", silo_names(sim.silos))
    agg_config, _ = role_configs(config, 0)
    dump_config(agg_config, roles / "aggregator.yaml")
    started = time.time()  # for the progress bar: checkpoints older than this are another run's
    procs: list[subprocess.Popen] = []
    bar = None
    try:
        aggregator = _spawn("aggregator", roles / "aggregator.yaml", logs / "aggregator.log", 1,
                            *(["--resume"] if resume else []))
        procs.append(aggregator)
        port = _wait_for_port(out / "aggregator.port", aggregator, timeout_s=300)
        _, silo_configs = role_configs(config, port, secrets.token_hex(32))
        for silo_config in silo_configs:
            assert silo_config.silo is not None
            path = roles / f"{silo_config.silo.name}.yaml"
            dump_config(silo_config, path)
            procs.append(_spawn("silo", path, logs / f"{silo_config.silo.name}.log", sim.threads_per_silo))
        log_event(log, "simulation_started", port=port, silos=sim.silos, output=out)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=config.federation.rounds, desc="rounds", unit="round")
        deadline = time.monotonic() + sim.timeout_s
        while aggregator.poll() is None:
            if stop.event.is_set():
                break  # the children are told below, each stops at its own safe point
            if time.monotonic() > deadline:
                raise RunError(f"simulation exceeded simulation.timeout_s = {sim.timeout_s}")
            dead = [i for i, p in enumerate(procs[1:]) if p.poll() not in (None, 0)]
            if dead:
                raise RunError(f"silo{dead[0]} exited with status {procs[1 + dead[0]].returncode}; "
                                  f"see {logs / f'silo{dead[0]}.log'}")
            if bar is not None:
                bar.n = _completed_rounds(out, started)
                bar.refresh()
            time.sleep(0.5)
        if bar is not None:
            bar.n = _completed_rounds(out, started)
            bar.close()
            bar = None
        if stop.event.is_set():
            raise _Stopped
        silo_codes = []
        # after a failed aggregator the silos only retry connecting: do not wait for them
        grace_s = 60 if aggregator.returncode == 0 else 0.5
        for p in procs[1:]:
            try:
                silo_codes.append(p.wait(timeout=grace_s))
            except subprocess.TimeoutExpired:
                p.kill()
                silo_codes.append(-9)
    except _Stopped:
        log_event(log, "simulation_stopped", level=logging.WARNING, signal=stop.signal.name if stop.signal else "",
                  to_go_on="run the same command again: the run resumes from its last completed round")
        return stop.exit_status
    finally:
        if bar is not None:
            bar.close()
        for p in procs:
            if p.poll() is None:
                p.terminate()  # SIGTERM: each process stops at its next safe point
        for p in procs:
            try:
                p.wait(timeout=30 if stop.event.is_set() else 10)
            except subprocess.TimeoutExpired:
                p.kill()
    print_report(out)
    failed = [f"silo{i}={c}" for i, c in enumerate(silo_codes) if c != 0]
    if failed:
        print(f"silo processes failed: {', '.join(failed)} (see {logs})", file=sys.stderr)
    return aggregator.returncode or (1 if failed else 0)


def print_report(out: Path) -> None:
    from aggregator.metrics import final_table

    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    print(final_table(rows))
    print(f"report: {out.resolve()} (metrics.csv, metrics.jsonl, loss.png, checkpoints/, logs/)")
