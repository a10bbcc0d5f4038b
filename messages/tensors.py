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

import numpy as np

Tensors = Mapping[str, np.ndarray]


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

    def check(self, tensors: Tensors, who: str) -> None:
        other = Layout.of(tensors)
        if other.names != self.names or other.shapes != self.shapes or other.dtypes != self.dtypes:
            raise ValueError(
                f"{who}: tensors {list(zip(other.names, other.shapes, other.dtypes))} do not match "
                f"the model's {list(zip(self.names, self.shapes, self.dtypes))}"
            )

    def flatten(
        self, tensors: Tensors, dtype: type = np.float32, out: np.ndarray | None = None
    ) -> np.ndarray:
        """One flat vector (written into ``out`` when given: no intermediate copy)."""
        out = np.empty(self.size, dtype=dtype) if out is None else out
        offset = 0
        for name in self.names:
            a = np.asarray(tensors[name])
            out[offset : offset + a.size] = a.reshape(-1)
            offset += a.size
        return out

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
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
