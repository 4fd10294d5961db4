"""Time spent in a component's methods, for reports of where a round's time goes."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def timed(method: F) -> F:
    """Add the wall time of every call (also a failing one) to ``self.seconds``."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    return wrapper  # type: ignore[return-value]
