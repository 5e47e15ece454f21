"""Why a checkpoint did not restore: another config wrote it, the storage failed for a moment, or its
bytes are damaged. Only damaged bytes are a reason to set a checkpoint aside.

  mismatch   the arrays the run expects (paths, shapes, dtypes) differ from the ones the checkpoint
             holds: the config changed (model size, LoRA rank, targets...). One error naming the config
             fields that differ; nothing on disk is touched, so the old config still resumes.
  transient  an I/O error, a storage service that is unavailable or slow, a permission, out of memory:
             retried, then one error; nothing on disk is touched.
  damaged    checksums that differ, a truncated or missing file, an undecodable array or JSON: the
             only case where the loop falls back to an older checkpoint (the damaged one is moved to
             `<directory>_corrupt/`, never deleted).
  unknown    anything else: an error, nothing moved (a bug must not cost a user their checkpoints).
"""

from __future__ import annotations

import errno
import json
import re
from typing import Any

import jax

from jsft.errors import ConfigError

MISMATCH, TRANSIENT, DAMAGED, UNKNOWN = "mismatch", "transient", "damaged", "unknown"


class CheckpointError(RuntimeError):
    """No checkpoint could be restored; the message names the directory and each step's reason."""


class CorruptCheckpoint(ValueError):
    """A checkpoint whose arrays differ from the checksums written when it was saved."""


class CheckpointMismatch(ConfigError):
    """A checkpoint written by another config (its arrays' shapes, dtypes or tree differ)."""


# errno values of failures that say nothing about the bytes on disk.
_TRANSIENT_ERRNOS = {
    errno.EIO, errno.EAGAIN, errno.ENOMEM, errno.EACCES, errno.EPERM, errno.EBUSY, errno.ENFILE,
    errno.EMFILE, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
    errno.ESTALE, errno.EINTR, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH,
}  # fmt: skip
# TensorStore/absl status codes (in the message of the error or of its cause).
_TRANSIENT_CODES = (
    "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAUTHENTICATED",
    "ABORTED", "CANCELLED",
)  # fmt: skip
_DAMAGED_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND")
_DAMAGED_TEXT = ("Error decoding", "was not found in the checkpoint", "No such file or directory")


def _chain(e: BaseException) -> list[BaseException]:
    seen = []
    while e is not None and e not in seen and len(seen) < 8:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def classify(e: BaseException) -> str:
    """TRANSIENT, DAMAGED or UNKNOWN for an exception raised while reading a checkpoint (MISMATCH is
    found before reading, from the metadata: see `layout_changes`)."""
    chain = _chain(e)
    for x in chain:  # a transient cause wins: a read that failed says nothing about the bytes
        if isinstance(x, MemoryError | TimeoutError | ConnectionError | PermissionError):
            return TRANSIENT
        if isinstance(x, OSError) and x.errno in _TRANSIENT_ERRNOS:
            return TRANSIENT
        text = str(x)
        if any(code in text for code in _TRANSIENT_CODES) or "out of memory" in text.lower():
            return TRANSIENT
        os_error = re.search(r"\[OS error (\d+)", text)
        if os_error and int(os_error.group(1)) in _TRANSIENT_ERRNOS:
            return TRANSIENT
    for x in chain:
        if isinstance(x, CorruptCheckpoint | json.JSONDecodeError | FileNotFoundError | UnicodeDecodeError):
            return DAMAGED
        text = str(x)
        if any(code in text for code in _DAMAGED_CODES) or any(t in text for t in _DAMAGED_TEXT):
            return DAMAGED
    return UNKNOWN


def _key(entry) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _arrays(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{'a/b/0/c': (shape, dtype)}: paths written alike for a TrainState (attributes, namedtuples) and
    for the nested dicts and lists orbax's metadata holds."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = {}
    for path, leaf in flat:
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            out["/".join(_key(p) for p in path)] = (tuple(leaf.shape), str(leaf.dtype))
    return out


def layout_changes(saved: Any, expected: Any) -> list[str]:
    """What differs between the arrays a checkpoint holds (`saved`: orbax's metadata tree) and those
    the run expects (`expected`: its abstract state), one phrase each; [] when they agree."""
    old, new = _arrays(saved), _arrays(expected)
    if not old:  # metadata that names no array is damaged, not another config's: the restore judges it
        return []
    changes = []
    for path in sorted(set(old) | set(new)):
        if path not in new:
            changes.append(f"{path} only in the checkpoint")
        elif path not in old:
            changes.append(f"{path} not in the checkpoint")
        elif old[path] != new[path]:
            (s0, d0), (s1, d1) = old[path], new[path]
            was, now = (s0, s1) if s0 != s1 else (d0, d1)
            changes.append(f"{path} {was} in the checkpoint, {now} now")
    return changes


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_changes(old: dict | None, new: dict) -> list[str]:
    """`field: old in the checkpoint, new now` for each config field that differs (model.* first)."""
    if not old:
        return []
    a, b = (
        _flatten(json.loads(json.dumps(old, default=str))),
        _flatten(json.loads(json.dumps(new, default=str))),
    )
    keys = sorted(
        (k for k in set(a) | set(b) if a.get(k) != b.get(k)), key=lambda k: (k.split(".")[0] != "model", k)
    )
    return [f"{k}: {a.get(k, '(absent)')!r} in the checkpoint, {b.get(k, '(absent)')!r} now" for k in keys]


def mismatch_message(directory: str, step: int, arrays: list[str], fields: list[str]) -> str:
    """One line: which config fields (else which arrays) differ, that nothing moved, what to do."""
    if fields:
        what = (
            "config fields that differ: "
            + "; ".join(fields[:8])
            + (f"; and {len(fields) - 8} more" if len(fields) > 8 else "")
        )
    else:
        what = (
            "arrays that differ: "
            + "; ".join(arrays[:4])
            + (f"; and {len(arrays) - 4} more" if len(arrays) > 4 else "")
        )
    return (
        f"the checkpoint at step {step} in {directory} was written with another config ({what}). "
        "Nothing was moved: rerun with the checkpoint's config to resume, or use another --workdir to "
        "start afresh"
    )
