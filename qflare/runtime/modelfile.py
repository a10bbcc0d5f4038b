"""A model's tensors in a safetensors file, read and written a range of flat values at a
time (docs/architecture.md, "Large models").

The aggregator stores each model version as a safetensors file. A model of 500 MB loaded
whole, or built whole in memory before it is written, would cost the aggregator that much
resident memory at least once per round; :class:`ModelFile` instead reads and writes the
values of :class:`~qflare.messages.tensors.Layout` coordinates ``[a, b)`` (the tensors
by sorted name, each in C order) with positioned I/O, so the aggregation reads its base
model and writes the new one block by block (:func:`qflare.services.aggregator.core.
aggregate_blocks`), and the model is published in parts from the file.

The file is the safetensors format (an 8-byte little-endian header length, a JSON header
naming each tensor's dtype, shape and data offsets, then the raw little-endian data), with
the tensors laid out in layout order: what ``safetensors.numpy.save`` writes for a model of
one dtype, and what ``safetensors.numpy.load`` reads. A file is created under a temporary
name and renamed into place only when complete and synced (:meth:`ModelFile.commit`): a
crash leaves no half-written version behind.

Reads go through ``os.pread`` rather than a memory map, whose touched pages would count in
the process's resident set.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from qflare.messages.tensors import Array, Layout, Tensors

#: safetensors' dtype names of the numpy dtypes a model may hold
_ST_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
#: a header larger than this is not one of ours (safetensors itself caps it at 100 MB)
_MAX_HEADER = 100 * 1024 * 1024
#: bytes read or written per call when a whole tensor is hashed or copied
_IO_BYTES = 8 * 1024 * 1024


class ModelFileError(ValueError):
    """The file is not a model file this module can read (the message says why)."""


def _header(layout: Layout) -> tuple[bytes, list[tuple[int, int]]]:
    """The JSON header (padded with spaces to a multiple of 8 bytes, as safetensors pads
    it) and each tensor's (start, stop) in the data section, in layout order."""
    entries: dict[str, Any] = {}
    spans = []
    offset = 0
    for name, shape, dtype in layout.entries():
        if dtype not in _ST_DTYPES:
            raise ModelFileError(f"tensor {name!r}: dtype {dtype} cannot be stored")
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        entries[name] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        spans.append((offset, offset + nbytes))
        offset += nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, spans


class ModelFile:
    """One model file, open for positioned reads (and writes, when created here)."""

    def __init__(
        self,
        path: Path,
        fd: int,
        layout: Layout,
        data_start: int,
        starts: list[int] | None = None,
        *,
        final: Path | None = None,
    ) -> None:
        self.path = path
        self.layout = layout
        self._fd = fd
        self._data_start = data_start
        self._final = final  # where commit() renames a file being written
        self._offsets: list[int] = []  # first flat coordinate of each tensor
        self._bytes: list[int] = []  # first byte of each tensor in the data section
        flat = byte = 0
        for _name, shape, dtype in layout.entries():
            self._offsets.append(flat)
            self._bytes.append(byte)
            flat += math.prod(shape)
            byte += math.prod(shape) * np.dtype(dtype).itemsize
        self._canonical = [*self._bytes, byte]  # each tensor's first byte in layout order
        if starts is not None:  # a file written elsewhere: its tensors in its own order
            self._bytes = list(starts)
        self.nbytes = byte

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], layout: Layout) -> ModelFile:
        """A new file for a model of ``layout`` at ``path``, written under a temporary name
        next to it (values zero until written) until :meth:`commit`."""
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
        header, spans = _header(layout)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.pwrite(fd, struct.pack("<Q", len(header)) + header, 0)
            data_start = 8 + len(header)
            os.ftruncate(fd, data_start + (spans[-1][1] if spans else 0))
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return cls(tmp, fd, layout, data_start, final=final)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ModelFile:
        """An existing model file, for reading (any safetensors file of known dtypes whose
        tensors cover its data section without overlap). :class:`ModelFileError` if not."""
        p = Path(path)
        fd = os.open(p, os.O_RDONLY)
        try:
            layout, data_start, starts = _read_header(fd, p)
        except BaseException:
            os.close(fd)
            raise
        return cls(p, fd, layout, data_start, starts)

    @classmethod
    def write(cls, path: str | os.PathLike[str], tensors: Tensors) -> ModelFile:
        """Store ``tensors`` at ``path`` (committed), one tensor at a time; the file is
        returned open for reading."""
        f = cls.create(path, Layout.of(tensors))
        try:
            for i, name in enumerate(f.layout.names):
                a = np.ascontiguousarray(np.asarray(tensors[name]))
                le = a.astype(a.dtype.newbyteorder("<"), copy=False)
                _pwrite_all(f._fd, _bytes_of(le), f._data_start + f._bytes[i])
            f.commit()
        except BaseException:
            f.discard()
            raise
        return f

    @property
    def writing(self) -> bool:
        """Whether this file is being written (created here and not committed yet)."""
        return self._final is not None

    @property
    def target(self) -> Path:
        """Where the file is (or, while being written, where :meth:`commit` puts it)."""
        return self.path if self._final is None else self._final

    def copy_to(self, path: str | os.PathLike[str]) -> ModelFile:
        """This model stored again at ``path`` (committed; in layout order), copied a few MB
        at a time; returned open for reading."""
        out = ModelFile.create(path, self.layout)
        try:
            step = max(1, _IO_BYTES // 8)
            for a in range(0, self.size, step):
                for lo, hi, dt, at in self._runs(a, min(a + step, self.size)):
                    raw = _pread_all(self._fd, (hi - lo) * dt.itemsize, at)
                    for _lo, _hi, _dt, there in out._runs(lo, hi):
                        _pwrite_all(out._fd, memoryview(raw), there)
            out.commit()
        except BaseException:
            out.discard()
            raise
        return out

    def commit(self) -> None:
        """Sync a file being written and rename it into place (then sync its folder)."""
        if self._final is None:
            raise ValueError(f"{self.path} is not being written")
        os.fsync(self._fd)
        os.replace(self.path, self._final)
        dir_fd = os.open(self._final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.path, self._final = self._final, None

    def discard(self) -> None:
        """Close a file being written and remove it (nothing is left at ``path``)."""
        self.close()
        if self._final is not None:
            self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._final is not None:
            self.discard()
        else:
            self.close()

    # -- values ----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Values in the model (the layout's flat size)."""
        return self.layout.size

    def _spans(self, a: int, b: int) -> Iterator[tuple[int, int, int, int]]:
        """(tensor index, first coordinate of the tensor, lo, hi) of coordinates [a, b)."""
        if not 0 <= a <= b <= self.size:
            raise IndexError(f"values [{a}, {b}) outside a model of {self.size}")
        for i, start in enumerate(self._offsets):
            stop = start + math.prod(self.layout.shapes[i])
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                yield i, start, lo, hi

    def _runs(self, a: int, b: int) -> Iterator[tuple[int, int, np.dtype[Any], int]]:
        """(lo, hi, dtype, at) for each tensor's piece of coordinates [a, b): values [lo, hi)
        lie from byte ``at`` of the file, little-endian ``dtype``."""
        for i, start, lo, hi in self._spans(a, b):
            dt = np.dtype(self.layout.dtypes[i]).newbyteorder("<")
            yield lo, hi, dt, self._data_start + self._bytes[i] + (lo - start) * dt.itemsize

    def read(
        self, a: int, b: int, dtype: npt.DTypeLike = np.float64
    ) -> npt.NDArray[np.floating[Any]]:
        """Coordinates [a, b) of ``layout.flatten(tensors, dtype)``."""
        if not 0 <= a <= b <= self.size:
            raise IndexError(f"values [{a}, {b}) outside a model of {self.size}")
        out = np.empty(b - a, dtype=dtype)
        for lo, hi, dt, at in self._runs(a, b):
            raw = _pread_all(self._fd, (hi - lo) * dt.itemsize, at)
            out[lo - a : hi - a] = np.frombuffer(raw, dtype=dt)
        return out

    def read_bytes(self, a: int, b: int) -> bytes:
        """Bytes [a, b) of the model's canonical byte string: every tensor's little-endian
        C-order bytes, by sorted name (what ``model_digest`` hashes and model parts carry)."""
        if not 0 <= a <= b <= self._canonical[-1]:
            raise IndexError(f"bytes [{a}, {b}) outside a model of {self._canonical[-1]}")
        pieces = []
        for i, start in enumerate(self._canonical[:-1]):
            lo, hi = max(a, start), min(b, self._canonical[i + 1])
            if lo < hi:
                at = self._data_start + self._bytes[i] + lo - start
                pieces.append(_pread_all(self._fd, hi - lo, at))
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def write_values(self, a: int, values: npt.ArrayLike) -> None:
        """Write ``values`` at coordinates [a, a + len), each cast to its tensor's dtype."""
        v = np.asarray(values).reshape(-1)
        for lo, hi, dt, at in self._runs(a, a + v.size):
            chunk = np.ascontiguousarray(v[lo - a : hi - a].astype(dt, copy=False))
            _pwrite_all(self._fd, _bytes_of(chunk), at)

    def tensor(self, name: str) -> Array:
        """One tensor, read whole."""
        i = self.layout.names.index(name)
        start = self._offsets[i]
        shape = self.layout.shapes[i]
        dt = np.dtype(self.layout.dtypes[i])
        flat = self.read(start, start + math.prod(shape), dtype=dt)
        return flat.reshape(shape)

    def tensors(self) -> dict[str, Array]:
        """The whole model in memory (for models that fit)."""
        return {name: self.tensor(name) for name in self.layout.names}

    def digest(self) -> bytes:
        """:func:`~qflare.messages.tensors.model_digest` of the model, read a few MB at a
        time."""
        h = hashlib.sha256()
        for i, (name, shape, dtype) in enumerate(self.layout.entries()):
            dt = np.dtype(dtype).newbyteorder("<")
            h.update(name.encode())
            h.update(b"\x00")
            h.update(dt.str.encode())
            h.update(repr(tuple(int(s) for s in shape)).encode())
            left = math.prod(shape) * dt.itemsize
            pos = self._data_start + self._bytes[i]
            while left:
                step = min(left, _IO_BYTES)
                h.update(_pread_all(self._fd, step, pos))
                pos += step
                left -= step
        return h.digest()


def _read_header(fd: int, path: Path) -> tuple[Layout, int, list[int]]:
    """The layout, the data section's first byte, and each tensor's first byte in it."""
    head = os.pread(fd, 8, 0)
    if len(head) != 8:
        raise ModelFileError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER:
        raise ModelFileError(f"{path}: header of {n} bytes")
    raw = os.pread(fd, n, 8)
    try:
        entries = json.loads(raw)
    except ValueError as exc:
        raise ModelFileError(f"{path}: header is not JSON ({exc})") from None
    if not isinstance(entries, dict):
        raise ModelFileError(f"{path}: header is not a JSON object")
    entries.pop("__metadata__", None)
    names = tuple(sorted(entries))
    shapes, dtypes, starts, spans = [], [], [], []
    for name in names:
        e = entries[name]
        try:
            dtype = _NP_DTYPES[e["dtype"]]
            shape = tuple(int(s) for s in e["shape"])
            lo, hi = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{path}: tensor {name!r}: bad header entry {e!r}") from None
        if min(shape, default=0) < 0 or hi - lo != math.prod(shape) * np.dtype(dtype).itemsize:
            raise ModelFileError(f"{path}: tensor {name!r}: {shape} does not fit ({lo}, {hi})")
        shapes.append(shape)
        dtypes.append(dtype)
        starts.append(lo)
        spans.append((lo, hi))
    end = 0
    for lo, hi in sorted(spans):
        if lo != end:
            raise ModelFileError(f"{path}: tensor data overlaps or leaves a gap at byte {end}")
        end = hi
    if os.fstat(fd).st_size != 8 + n + end:
        raise ModelFileError(f"{path}: {os.fstat(fd).st_size} bytes, expected {8 + n + end}")
    return Layout(names, tuple(shapes), tuple(dtypes)), 8 + n, starts


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    parts = []
    while size:
        got = os.pread(fd, min(size, _IO_BYTES), offset)
        if not got:
            raise ModelFileError(f"file ends at byte {offset}")
        parts.append(got)
        size -= len(got)
        offset += len(got)
    return b"".join(parts)


def _bytes_of(a: np.ndarray[Any, Any]) -> memoryview:
    """The raw bytes of a C-contiguous array, without a copy."""
    return memoryview(a.data).cast("B") if a.size else memoryview(b"")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data[:_IO_BYTES], offset)
        data = data[done:]
        offset += done
