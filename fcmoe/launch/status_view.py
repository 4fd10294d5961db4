"""``fcmoe status HOST:PORT``: the aggregator's status endpoint (/api/status) as a table in the
terminal, once or, with ``--watch``, redrawn until interrupted. Reads only; the aggregator must run
with ``aggregator.status_port`` set."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fcmoe.errors import FcMoeError


class StatusError(FcMoeError):
    """The endpoint could not be read (the message names the address and why)."""


def _auth_header(auth_file: Path | None) -> dict[str, str]:
    if auth_file is None:
        return {}
    try:
        text = auth_file.read_text().strip()
    except OSError as exc:
        raise StatusError(f"{auth_file}: cannot read ({exc.strerror or type(exc).__name__})") from None
    return {"Authorization": "Basic " + base64.b64encode(text.encode()).decode()}


def fetch_status(address: str, auth_file: Path | None = None, timeout_s: float = 10.0) -> dict[str, Any]:
    """The JSON of ``http://ADDRESS/api/status``; StatusError (one line) when it cannot be had."""
    url = address if "://" in address else f"http://{address}"
    url = url.rstrip("/") + "/api/status"
    request = urllib.request.Request(url, headers=_auth_header(auth_file))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        hint = " (pass --auth-file)" if exc.code == 401 else ""
        raise StatusError(f"{url}: HTTP {exc.code} {exc.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"{url}: cannot connect ({reason}); is aggregator.status_port set and the run live?") from None
    try:
        status = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise StatusError(f"{url}: the answer is not JSON (another service on that port?)") from None
    if not isinstance(status, dict) or "phase" not in status:
        raise StatusError(f"{url}: the answer is not an FC-MoE status")
    return status


def render(status: dict[str, Any]):
    """A rich renderable: the run line, the silos table, the last losses."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    deadline = status.get("deadline_seconds")
    head = Text.assemble(
        ("run ", "dim"), (str(status["run_id"]), "bold"), f"  {status['strategy']}  round {status['round']}"
        f"/{status['rounds']} ({status['rounds_completed']} completed)  phase ", (status["phase"], "bold"),
        f"  deadline in {deadline:.0f} s" if deadline is not None else "",
        f"  secure aggregation {status['secure_aggregation']['mode']}",
        (f"  outcome: {status['outcome']}", "bold red") if status.get("outcome") else "")
    silos = Table(title="silos", title_justify="left")
    for column, justify in (("silo", "left"), ("state", "left"), ("last seen", "right"), ("bytes received", "right"),
                            ("epsilon / budget (DP)", "right")):
        silos.add_column(column, justify=justify)
    for name, silo in status["silos"].items():
        style = "bold red" if silo["state"] == "late" else None
        p = status.get("privacy", {}).get(name)
        silos.add_row(name, silo["state"], f"{silo['last_seen_seconds']:.0f} s ago", f"{silo['bytes_received']:,}",
                      f"{p['epsilon']:.3f} / {p['epsilon_budget']:g}" if p else "–", style=style)
    losses = Table(title="global model, held-out loss", title_justify="left")
    losses.add_column("version", justify="right")
    losses.add_column("loss (mean over domains)", justify="right")
    losses.add_column("round seconds", justify="right")
    for row in status["losses"][-8:]:
        loss = row.get("global_loss")
        seconds = row.get("round_seconds")
        losses.add_row(str(row["version"]), "–" if loss is None else f"{loss:.4f}",
                       "–" if seconds is None else f"{seconds:.1f}")
    parts = [head, silos, losses]
    if status.get("late"):
        parts.insert(1, Text(f"late: {', '.join(status['late'])}", style="bold red"))
    return Group(*parts)


def run_status_view(address: str, watch: bool = False, interval_s: float = 2.0, auth_file: Path | None = None,
                    as_json: bool = False) -> int:
    from rich.console import Console

    console = Console()
    if as_json:
        print(json.dumps(fetch_status(address, auth_file)))
        return 0
    if not watch:
        console.print(render(fetch_status(address, auth_file)))
        return 0
    from rich.live import Live

    with Live(render(fetch_status(address, auth_file)), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval_s)
            status = fetch_status(address, auth_file)
            live.update(render(status), refresh=True)
            if status["phase"] == "done":
                return 0
