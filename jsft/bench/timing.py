"""A timed call: what the benchmarks share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable, *args: Any) -> tuple[Any, float]:
    """(fn(*args), the seconds it took)."""
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start
