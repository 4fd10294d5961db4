"""Shared fixtures: tiny configs, certificates, an in-process aggregator over real mutual TLS."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from crypto.pki import PkiPaths, ensure_pki
from fcmoe.config import Config, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def smoke_config(tmp_path: Path, strategy: dict | None = None, **federation) -> Config:
    """configs/smoke.yaml with its output under tmp_path and federation fields overridden."""
    data = load_config(SMOKE).model_dump(mode="json")
    data["run"]["output_dir"] = str(tmp_path / "run")
    data["federation"].update(federation)
    if strategy:
        data["federation"]["strategy"] = strategy
    data["aggregator"].update({"port": 0, "pki_dir": str(tmp_path / "certs")})
    data.pop("simulation", None)
    return parse_config(data)


def silo_config(config: Config, name: str, port: int, index: int = 0, num_silos: int = 3) -> Config:
    data = config.model_dump(mode="json")
    data["silo"] = {"name": name, "aggregator": f"127.0.0.1:{port}", "pki_dir": data["aggregator"]["pki_dir"],
                    "index": index, "num_silos": num_silos, "threads": 1, "connect_timeout_s": 20,
                    "accept_modes": [config.federation.secure_aggregation.mode],
                    "min_group_size": max(2, config.federation.min_group_size)}
    return parse_config(data)


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    return ensure_pki(tmp_path / "certs", ["silo0", "silo1", "silo2"])


class InProcessAggregator:
    def __init__(self, config: Config):
        from aggregator.server import drive, start_aggregator

        self.running = start_aggregator(config)
        self.port = self.running.port
        self.coordinator = self.running.coordinator
        self.stop = threading.Event()
        self.thread = threading.Thread(target=drive, args=(self.coordinator, self.stop), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.running.server.stop(0).wait()


@pytest.fixture
def aggregator_factory() -> Iterator:
    started: list[InProcessAggregator] = []

    def start(config: Config) -> InProcessAggregator:
        agg = InProcessAggregator(config)
        started.append(agg)
        return agg

    yield start
    for agg in started:
        agg.close()
