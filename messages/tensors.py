"""How a model's tensors are named, laid out and digested: one home for the model's shape.

* :class:`Layout` maps a dict of tensors to one flat vector and back (sorted names, C order).
  The aggregator, the detector, the privacy mechanism and the simulator all flatten through
  it, so a row of the round's matrix means the same coordinates everywhere.
* :func:`model_digest` is the SHA-256 a ``round.opened`` / ``model.published`` names and a
  participant recomputes over the tensors it loads (docs/messages.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.generic]
Tensors = Mapping[str, Array]
#: a flat vector of a model's values (float32 rows of a round's matrix, float64 sums)
Flat = npt.NDArray[np.floating[Any]]


@dataclass(frozen=True)
class Layout:
    """Tensor names (sorted), shapes and dtypes of a model: how a dict of tensors maps to
    one flat vector and back."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, tensors: Tensors) -> Layout:
        names = tuple(sorted(tensors))
        return cls(
            names,
            tuple(tuple(int(s) for s in tensors[n].shape) for n in names),
            tuple(str(tensors[n].dtype) for n in names),
        )

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes))

    def entries(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape, dtype) of each tensor, in layout order."""
        return list(zip(self.names, self.shapes, self.dtypes, strict=True))

    def check(self, tensors: Tensors, who: str) -> None:
        """Raise ValueError (naming ``who``) unless ``tensors`` have exactly this layout."""
        other = Layout.of(tensors)
        if other != self:
            raise ValueError(
                f"{who}: tensors {other.entries()} do not match the model's {self.entries()}"
            )

    def flatten(
        self, tensors: Tensors, dtype: npt.DTypeLike = np.float32, out: Flat | None = None
    ) -> Flat:
        """One flat vector of ``dtype`` (written into ``out`` when given, a vector of
        :attr:`size` values of any float dtype: no intermediate copy)."""
        out = np.empty(self.size, dtype=dtype) if out is None else out
        offset = 0
        for name in self.names:
            a = np.asarray(tensors[name])
            out[offset : offset + a.size] = a.reshape(-1)
            offset += a.size
        return out

    def unflatten(self, flat: Flat) -> dict[str, Array]:
        """The tensors of ``flat`` (a vector of :attr:`size` values), each in its own shape
        and dtype (views of ``flat`` where the dtype is already the tensor's)."""
        if flat.shape != (self.size,):
            raise ValueError(f"a vector of {self.size} values needed, got shape {flat.shape}")
        out: dict[str, Array] = {}
        offset = 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            n = int(np.prod(shape, dtype=np.int64))
            out[name] = np.ascontiguousarray(flat[offset : offset + n].reshape(shape)).astype(
                dtype, copy=False
            )
            offset += n
        return out


def model_digest(tensors: Tensors) -> bytes:
    """SHA-256 of a model in canonical form: for each tensor by sorted name, the name,
    dtype, shape and little-endian C-order bytes. ``round.opened``/``model.published``
    carry it; a client recomputes it over the tensors it loads."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        le = a.astype(a.dtype.newbyteorder("<"), copy=False)
        h.update(name.encode())
        h.update(b"\x00")
        h.update(le.dtype.str.encode())
        h.update(repr(tuple(int(s) for s in a.shape)).encode())
        h.update(np.ascontiguousarray(le).data)
    return h.digest()
