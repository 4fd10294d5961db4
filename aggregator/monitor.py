"""The aggregator's status endpoint (``aggregator.status_port``): ``/metrics`` for Prometheus,
``/api/status`` as JSON, ``/`` a read-only page that follows the run.

It runs in the aggregator's process, on threads of its own, and only reads: every response is made
from one :meth:`Coordinator.status` snapshot (aggregator/status.py), so what it shows is what the
aggregator's log lines already say — never a silo's data, update, sketch or key. A request that fails
is answered 500 and logged in one line; it cannot touch a round. Bound to 127.0.0.1 unless
``aggregator.status_host`` says otherwise; ``aggregator.status_auth_file`` (one ``USER:PASSWORD``
line) turns on HTTP basic auth, which needs TLS in front of it (a reverse proxy) off the host.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from aggregator.rounds import Phase
from aggregator.status import SILO_STATES
from fcmoe.errors import ConfigError
from fcmoe.logs import log_event

log = logging.getLogger(__name__)

# Every series /metrics serves, with its help text: docs/operator.md lists the same for dashboards.
SERIES = {
    "fcmoe_rounds_completed": "rounds completed (the global model's version)",
    "fcmoe_rounds_planned": "rounds the run is configured for",
    "fcmoe_round": "the round in progress (1-based; the last one once the run is done)",
    "fcmoe_round_attempt": "attempt of the round in progress (a round redone after a failed phase counts up)",
    "fcmoe_round_phase": "1 for the phase the run is in, 0 for the others",
    "fcmoe_phase_deadline_seconds": "seconds until the open phase's deadline (0 when no phase is open)",
    "fcmoe_round_seconds": "wall time of the last completed round",
    "fcmoe_secure_seconds": "the aggregator's secure-aggregation work in the last completed round",
    "fcmoe_silos_joined": "silos that joined the run",
    "fcmoe_silos_late": "joined silos past the open phase's deadline or silent for 15 s while idle",
    "fcmoe_silo_state": "1 for each silo's state (answered, working, declined, idle, late)",
    "fcmoe_silo_last_seen_seconds": "seconds since the silo was last heard from",
    "fcmoe_global_loss": "held-out loss of the newest global model evaluated (mean over domains)",
    "fcmoe_global_loss_version": "the version that fcmoe_global_loss belongs to",
    "fcmoe_bytes_received": "bytes received from each silo (reports, updates, sketches, secure messages)",
    "fcmoe_rpc_refused": "RPCs refused, by method and gRPC status",
    "fcmoe_silo_epsilon": "epsilon a DP silo reported spent (its claim; its signed ledger is the proof)",
    "fcmoe_silo_epsilon_budget": "the epsilon budget a DP silo reported",
}


def _gauge(name: str, value: float | None = None, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, SERIES[name], value=value, labels=labels)


def metric_families(status: dict[str, Any]) -> Iterator[Metric]:
    """The Prometheus series of one status snapshot (pure: the shape of /api/status in, metrics out)."""
    yield CounterMetricFamily("fcmoe_rounds_completed", SERIES["fcmoe_rounds_completed"],
                              value=status["rounds_completed"])
    yield _gauge("fcmoe_rounds_planned", status["rounds"])
    yield _gauge("fcmoe_round", status["round"])
    yield _gauge("fcmoe_round_attempt", status["attempt"])
    phase = _gauge("fcmoe_round_phase", labels=["phase"])
    for p in Phase:
        phase.add_metric([p.value], 1.0 if p.value == status["phase"] else 0.0)
    yield phase
    yield _gauge("fcmoe_phase_deadline_seconds", status["deadline_seconds"] or 0.0)
    done = [row for row in status["losses"] if row.get("round_seconds") is not None]
    if done:
        yield _gauge("fcmoe_round_seconds", done[-1]["round_seconds"])
        yield _gauge("fcmoe_secure_seconds", done[-1].get("aggregator_secure_seconds", 0.0))
    silos = status["silos"]
    yield _gauge("fcmoe_silos_joined", len(silos))
    yield _gauge("fcmoe_silos_late", len(status["late"]))
    state = _gauge("fcmoe_silo_state", labels=["silo", "state"])
    seen = _gauge("fcmoe_silo_last_seen_seconds", labels=["silo"])
    received = CounterMetricFamily("fcmoe_bytes_received", SERIES["fcmoe_bytes_received"], labels=["silo"])
    for name, entry in silos.items():
        for s in SILO_STATES:
            state.add_metric([name, s], 1.0 if entry["state"] == s else 0.0)
        seen.add_metric([name], entry["last_seen_seconds"])
        received.add_metric([name], entry["bytes_received"])
    yield state
    yield seen
    yield received
    evaluated = [row for row in status["losses"] if row.get("global_loss") is not None]
    if evaluated:
        yield _gauge("fcmoe_global_loss", evaluated[-1]["global_loss"])
        yield _gauge("fcmoe_global_loss_version", evaluated[-1]["version"])
    epsilon = _gauge("fcmoe_silo_epsilon", labels=["silo"])
    budget = _gauge("fcmoe_silo_epsilon_budget", labels=["silo"])
    for name, p in status["privacy"].items():
        epsilon.add_metric([name], p["epsilon"])
        budget.add_metric([name], p["epsilon_budget"])
    yield epsilon
    yield budget
    refused = CounterMetricFamily("fcmoe_rpc_refused", SERIES["fcmoe_rpc_refused"], labels=["rpc", "code"])
    for r in status["refused"]:
        refused.add_metric([r["rpc"], r["code"]], r["count"])
    yield refused


class _Snapshot:
    """A prometheus_client collector over the coordinator's status, read at every scrape."""

    def __init__(self, status: Callable[[], dict[str, Any]]):
        self.status = status

    def collect(self) -> Iterator[Metric]:
        yield from metric_families(self.status())


def read_basic_auth(path: Path) -> str:
    """The expected ``Authorization`` header for the file's one ``USER:PASSWORD`` line."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"aggregator.status_auth_file = {path}: cannot read ({reason})") from None
    user, sep, password = text.partition(":")
    if not sep or not user or not password or "\n" in text:
        raise ConfigError(f"aggregator.status_auth_file = {path}: expected one line USER:PASSWORD")
    return "Basic " + base64.b64encode(text.encode()).decode()


def page_html() -> bytes:
    return resources.files("aggregator").joinpath("status_page.html").read_bytes()


class StatusServer:
    """The HTTP endpoint: constructing it binds the port (a port in use fails before anything else
    starts), :meth:`serve` answers from a status callable on threads of its own, :meth:`close` stops it."""

    def __init__(self, host: str, port: int, auth: str | None = None):
        self._status: Callable[[], dict[str, Any]] | None = None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(self.status))
        page = page_html()
        status = self.status

        class Handler(BaseHTTPRequestHandler):
            server_version = "fcmoe-status"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if auth is not None and not hmac.compare_digest(self.headers.get("Authorization", ""), auth):
                    self._send(401, b"authentication required\n", "text/plain; charset=utf-8",
                               {"WWW-Authenticate": 'Basic realm="fcmoe status"'})
                    return
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                    elif path == "/api/status":
                        self._send(200, json.dumps(status()).encode(), "application/json")
                    elif path in ("/", "/index.html"):
                        self._send(200, page, "text/html; charset=utf-8")
                    else:
                        self._send(404, b"not found: /metrics, /api/status or /\n", "text/plain; charset=utf-8")
                except Exception as exc:  # noqa: BLE001 - a failed request never reaches the round
                    log_event(log, "status_request_failed", level=logging.WARNING, path=path[:100],
                              reason=f"{type(exc).__name__}: {exc}"[:300])
                    self._send(500, b"status unavailable\n", "text/plain; charset=utf-8")

            def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
                pass  # scrapes every few seconds would drown the run's own log lines

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"aggregator.status_port = {port}: cannot listen on {host}:{port} "
                              f"({exc.strerror or exc}); choose another port or leave it unset") from None
        self.httpd.daemon_threads = True
        self.address, self.port, self.auth = host, self.httpd.server_address[1], auth is not None
        self._thread: threading.Thread | None = None

    def status(self) -> dict[str, Any]:
        if self._status is None:
            raise RuntimeError("the status endpoint is not serving yet")
        return self._status()

    def serve(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="status-http", daemon=True)
        self._thread.start()
        log_event(log, "status_listening", address=f"{self.address}:{self.port}",
                  auth="basic" if self.auth else "none")

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
        self.httpd.server_close()
