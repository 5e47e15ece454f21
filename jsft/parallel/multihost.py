"""Small agreements between processes: gather JSON-able objects, agree on a stop."""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def allgather_json(obj: Any) -> list:
    """Every process's `obj`, in process order (one collective; identity with one process)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    longest = int(np.max(multihost_utils.process_allgather(np.array([len(data)], np.int32))))
    padded = np.zeros(longest, np.uint8)
    padded[: len(data)] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in gathered]


def any_process(flag: bool) -> bool:
    """True on every process if it is True on any (e.g. one of them received SIGTERM)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.bool_))))


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
