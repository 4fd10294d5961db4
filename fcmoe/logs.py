"""Structured logging: one line per event, ``key=value`` pairs after the event name.

Every component logs through :func:`log_event` so that lines are greppable and machine-readable
(``event=round_closed round=3 updates=4``) without a JSON parser in the operator's way.
"""

from __future__ import annotations

import logging
import sys
from typing import Any


def _fmt(value: Any) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    if text == "" or any(c in text for c in ' ="\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event as a single line: ``event=NAME k1=v1 k2=v2``."""
    parts = [f"event={event}"] + [f"{k}={_fmt(v)}" for k, v in fields.items()]
    logger.log(level, " ".join(parts))


def setup_logging(role: str, level: str = "INFO", stream: Any = None) -> logging.Logger:
    """Configure the root logger once per process; every line carries time, level and role."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s role={role} logger=%(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return logging.getLogger("fcmoe")
