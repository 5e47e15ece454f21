"""A streaming safetensors writer: files planned from shapes alone, tensors appended one at a time.

The format (huggingface/safetensors): an 8-byte little-endian header length N; N bytes of JSON,
`{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}`,
padded with spaces to a multiple of 8 so that the data after it is aligned; then every tensor's raw
little-endian C-order bytes, back to back with no holes, offsets counted from the end of the header.
Since every offset is known from the shapes, a file's header is written first and each tensor's bytes
are appended as they arrive: the writer never holds more than the tensor it is given.

Several files are named `model-0000k-of-0000n.safetensors` and listed in `model.safetensors.index.json`
(`{"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}`), as transformers writes them; a
model that fits in one file is a lone `model.safetensors` with no index.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import ml_dtypes  # noqa: F401  (registers bfloat16 & co. as numpy dtypes)
import numpy as np

# numpy dtype name -> safetensors dtype tag
DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, dtype (a numpy name such as "bfloat16") and shape: all a plan needs."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def plan_files(tensors: Sequence[TensorInfo], max_file_bytes: int) -> list[list[TensorInfo]]:
    """Split `tensors`, in order, into files of at most `max_file_bytes` of data (greedy; a tensor
    larger than that gets a file of its own)."""
    files: list[list[TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        if files[-1] and size + t.nbytes > max_file_bytes:
            files.append([])
            size = 0
        files[-1].append(t)
        size += t.nbytes
    return files


def file_names(n_files: int) -> list[str]:
    if n_files == 1:
        return [SINGLE_FILE]
    return [f"model-{k:05d}-of-{n_files:05d}.safetensors" for k in range(1, n_files + 1)]


def header_bytes(tensors: Sequence[TensorInfo], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the JSON header of a file holding `tensors` in this order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in tensors:
        if t.dtype not in DTYPES:
            raise ValueError(f"{t.name}: dtype {t.dtype} has no safetensors tag (known: {sorted(DTYPES)})")
        header[t.name] = {
            "dtype": DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class SafetensorsWriter:
    """Writes a planned set of tensors into `directory`, given one at a time in plan order.

        with SafetensorsWriter(directory, infos, max_file_bytes) as writer:
            for info in infos:
                writer.write(info.name, host_array)
        files = writer.files_written

    Each tensor is checked against the plan (name, dtype, shape); leaving the `with` block before the
    last tensor is an error, and no index is written then.
    """

    def __init__(
        self,
        directory: str,
        tensors: Sequence[TensorInfo],
        max_file_bytes: int,
        metadata: dict[str, str] | None = None,
    ):
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise ValueError("tensor names repeat in the plan")
        self.directory = directory
        self.metadata = {"format": "pt", **(metadata or {})}  # transformers asks for format=pt
        self.plan = plan_files(tensors, max_file_bytes)
        self.names = file_names(len(self.plan))
        self._todo = [(k, t) for k, file in enumerate(self.plan) for t in file]
        self._next = 0
        self._file = None
        self._file_index = -1
        self._closed = False
        self.files_written: list[str] = []

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if self._file is not None:
                self._file.close()
            return
        self.close()

    def write(self, name: str, array: np.ndarray) -> None:
        """Append `array` (a host array with the planned name, dtype and shape) to its file."""
        if self._next >= len(self._todo):
            raise ValueError(f"{name}: every planned tensor has been written already")
        k, info = self._todo[self._next]
        if (name, array.dtype.name, tuple(array.shape)) != (info.name, info.dtype, info.shape):
            raise ValueError(
                f"expected {info.name} {info.dtype}{list(info.shape)} next, got {name} "
                f"{array.dtype.name}{list(array.shape)}"
            )
        if k != self._file_index:
            self._finish_file()
            self._file_index = k
            self._file = open(os.path.join(self.directory, self.names[k]), "wb")
            self._file.write(header_bytes(self.plan[k], self.metadata))
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._next += 1

    def close(self) -> list[str]:
        """Finish the last file and write the index (several files); returns the files written."""
        if self._next != len(self._todo):
            missing = [t.name for _, t in self._todo[self._next :]]
            raise ValueError(f"{len(missing)} planned tensors were never written: {missing[:4]}")
        if self._closed:
            return self.files_written
        if self._todo:
            self._finish_file()
        else:  # nothing to write: still a valid file
            with open(os.path.join(self.directory, self.names[0]), "wb") as f:
                f.write(header_bytes([], self.metadata))
            self.files_written.append(self.names[0])
        if len(self.plan) > 1:
            self._write_index()
        self._closed = True
        return self.files_written

    def _finish_file(self) -> None:
        if self._file is None:
            return
        size = self._file.tell()
        self._file.close()
        self._file = None
        tensors = self.plan[self._file_index]
        expected = len(header_bytes(tensors, self.metadata)) + sum(t.nbytes for t in tensors)
        if size != expected:
            raise OSError(f"{self.names[self._file_index]}: wrote {size} bytes, planned {expected}")
        self.files_written.append(self.names[self._file_index])

    def _write_index(self) -> None:
        weight_map = {t.name: self.names[k] for k, t in self._todo}
        total = sum(t.nbytes for _, t in self._todo)
        with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        self.files_written.append(INDEX_FILE)
