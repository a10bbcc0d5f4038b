"""How a model's tensors are named, laid out and digested: one home for the model's shape.

* :class:`Layout` maps a dict of tensors to one flat vector and back (sorted names, C order).
  The aggregator, the detector, the privacy mechanism and the simulator all flatten through
  it, so a row of the round's matrix means the same coordinates everywhere.
* :class:`RoundRows` holds one round's updates as the rows of one float32 matrix in that
  layout, each written into its row as it arrives; the aggregator and the detector both
  keep their round there (and reuse its memory from round to round). An update received
  in parts goes into its row a range at a time (:meth:`RoundRows.writer`) and counts as
  held only once every value is in.
* :func:`model_digest` is the SHA-256 a ``round.opened`` / ``model.published`` names and a
  participant recomputes over the tensors it loads (docs/messages.md).
"""

from __future__ import annotations

import hashlib
import mmap
import threading
from collections.abc import Mapping, Sequence
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


Rows = npt.NDArray[np.float32]
#: what a round's row is held under: (client, digest of its update)
RowRef = tuple[str, bytes]


class RoundRows:
    """One round's updates as the rows of one float32 matrix, each update written straight
    into its row as it arrives (:class:`Layout`: tensors in sorted-name order, the same
    coordinates in every service). A verdict or an aggregation then needs no stacking after
    the round closes: no second copy of the round, and no allocation of n x d at the moment
    latency counts (a fresh 400 MB array costs up to a second of page faults on small
    machines). :meth:`reset` empties it for another round and keeps the matrix, whose pages
    are touched already.

    ``clients`` (optional, unique) gives each client a home row, its index there: a
    client's first update goes to its home row, anything else (a second digest, a client
    not named) to the rows after them, in arrival order. With ``clients`` in client-id
    order (the aggregator passes a round's selected participants, sorted) the matrix of a
    round whose every client sent and was kept is already in order: :meth:`matrix` moves
    nothing. ``layout`` (optional) fixes the rows' layout; otherwise the round's first
    update fixes it. ``capacity`` rows are reserved (address space only: a row's memory is
    touched when it is written); more rows double it. Safe to call from worker threads."""

    def __init__(
        self, capacity: int, clients: Sequence[str] = (), layout: Layout | None = None
    ) -> None:
        self._x: Rows | None = None
        self._lock = threading.Lock()
        self.generation = 0
        self._start(capacity, clients, layout)

    def _start(self, capacity: int, clients: Sequence[str], layout: Layout | None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        homes = {c: i for i, c in enumerate(clients)}
        if len(homes) != len(clients):
            raise ValueError("clients must be unique")
        self._capacity = max(capacity, len(clients))
        self._homes = homes
        self._layout = layout
        self._rows: dict[RowRef, int] = {}
        self._owners: list[RowRef | None] = [None] * len(clients)
        # rows being written a range at a time (an update in parts), not held yet, and how
        # many writers each has (one the read-ahead's, one a fetch's: the same values)
        self._partial: dict[RowRef, int] = {}
        self._writers: dict[RowRef, int] = {}

    def reset(
        self, capacity: int, clients: Sequence[str] = (), layout: Layout | None = None
    ) -> int:
        """Empty the rows for another round (the arguments as for a new one) and return the
        new :attr:`generation`. The matrix is kept when the next round's rows fit it."""
        with self._lock:
            self._start(capacity, clients, layout)
            if self._x is not None and (
                self._x.shape[0] < self._capacity
                or (layout is not None and self._x.shape[1] != layout.size)
            ):
                self._x = None
            self.generation += 1
            return self.generation

    def __contains__(self, ref: object) -> bool:
        return ref in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def layout(self) -> Layout | None:
        return self._layout

    def add(self, ref: RowRef, tensors: Tensors, generation: int | None = None) -> bool:
        """Write ``tensors`` as the row of ``ref``; False when ``ref`` is held already or
        ``generation`` is not the current one (a write meant for the round before a
        :meth:`reset`). Raises ValueError when their names, shapes or dtypes differ from the
        rows' layout."""
        with self._lock:
            if ref in self._rows or (generation is not None and generation != self.generation):
                return False
            layout = self._layout
            if layout is None:
                layout = Layout.of(tensors)
            else:
                layout.check(tensors, f"update of {ref[0]}")
            i = self._free_row(ref[0])
            self._write_row(i, layout, tensors)
            self._layout = layout
            if i == len(self._owners):
                self._owners.append(None)
            self._owners[i] = ref
            self._rows[ref] = i
            return True

    def _write_row(self, i: int, layout: Layout, tensors: Tensors) -> None:
        """Row ``i`` := ``tensors`` flattened (the matrix grown to hold it)."""
        x = self._reserve(layout.size, i + 1)
        layout.flatten(tensors, out=x[i])

    def _write_range(self, i: int, width: int, start: int, values: Flat) -> None:
        """Row ``i``'s values ``start:start + values.size`` := ``values``."""
        x = self._reserve(width, i + 1)
        x[i, start : start + values.size] = values

    def writer(
        self, ref: RowRef, layout: Layout, generation: int | None = None
    ) -> RowWriter | None:
        """A row for ``ref`` written a range at a time (an update received in parts): it
        counts as holding ``ref`` only once the writer wrote every value and
        :meth:`RowWriter.commit` ran; until then the row is reserved, and an aborted one is
        free again. None when ``ref`` is held already or ``generation`` is not the current
        one. A second writer of a ref being written shares its row (the same digest: the
        same values). Raises ValueError when ``layout``'s names or shapes differ from the
        rows' (the values are float32 whatever the rows' dtypes say)."""
        with self._lock:
            if ref in self._rows or (generation is not None and generation != self.generation):
                return None
            ours = self._layout
            if ours is None:
                self._layout = layout
            elif (ours.names, ours.shapes) != (layout.names, layout.shapes):
                raise ValueError(
                    f"update of {ref[0]}: tensors {layout.entries()} do not match the "
                    f"model's {ours.entries()}"
                )
            if ref in self._partial:
                self._writers[ref] += 1
            else:
                i = self._free_row(ref[0])
                if i == len(self._owners):
                    self._owners.append(None)
                self._owners[i] = ref
                self._partial[ref] = i
                self._writers[ref] = 1
            return RowWriter(self, ref, self.generation, layout.size)

    def _put(self, w: RowWriter, start: int, values: Flat) -> bool:
        with self._lock:
            i = self._partial.get(w.ref)
            if i is None or w.generation != self.generation:
                return False
            if start < 0 or start + values.size > w.width:
                raise ValueError(
                    f"values {start}..{start + values.size} outside a row of {w.width}"
                )
            self._write_range(i, w.width, start, values)
            return True

    def _commit(self, w: RowWriter, complete: bool) -> bool:
        with self._lock:
            if w.generation != self.generation:
                return False
            if w.ref in self._rows:
                return True  # another writer of the same values finished first
            if not complete:
                self._release(w)
                return False
            i = self._partial.pop(w.ref, None)
            if i is None:
                return False
            del self._writers[w.ref]
            self._rows[w.ref] = i
            return True

    def _abort(self, w: RowWriter) -> None:
        with self._lock:
            if w.generation == self.generation:
                self._release(w)

    def _release(self, w: RowWriter) -> None:
        if w.ref not in self._partial:
            return
        self._writers[w.ref] -= 1
        if self._writers[w.ref] == 0:
            del self._writers[w.ref]
            self._owners[self._partial.pop(w.ref)] = None

    def _free_row(self, client: str) -> int:
        home = self._homes.get(client)
        if home is not None and self._owners[home] is None:
            return home
        for i in range(len(self._homes), len(self._owners)):
            if self._owners[i] is None:
                return i
        return len(self._owners)

    def _reserve(self, width: int, rows: int) -> Rows:
        """The matrix, allocated (or grown, keeping the rows written) to hold ``rows``."""
        x = self._x
        if x is None or x.shape[1] != width:
            x = self._x = fresh_rows(max(self._capacity, rows), width)
        elif rows > x.shape[0]:
            grown = fresh_rows(max(2 * x.shape[0], rows), width)
            used = len(self._owners)
            grown[:used] = x[:used]
            x = self._x = grown
        return x

    def matrix(self, refs: Sequence[RowRef]) -> tuple[list[str], Rows]:
        """The rows of ``refs`` (one per client, all held: KeyError otherwise) in client-id
        order, and those clients: a view of the first ``len(refs)`` rows, reordered in place
        (the other rows stay held, after them). The view is the caller's until the next
        :meth:`add`, :meth:`matrix` or :meth:`reset`; it may change it (the aggregation
        clips it in place)."""
        order = sorted(refs)
        clients = [c for c, _d in order]
        if len(set(clients)) != len(clients):
            raise ValueError(f"one row per client: {clients}")
        with self._lock:
            width = self._layout.size if self._layout is not None else 0
            if self._x is None or not order:
                if order:
                    raise KeyError(order[0])
                return clients, np.empty((0, width), np.float32)
            idx = [self._rows[r] for r in order]
            chosen = set(idx)
            perm = idx + [i for i in range(len(self._owners)) if i not in chosen]
            if perm != list(range(len(perm))):
                live = [o is not None for o in self._owners]
                _gather_rows(self._x, perm, live)
                self._owners = [self._owners[i] for i in perm]
                owned = [(r, i) for i, r in enumerate(self._owners) if r is not None]
                self._rows = {r: i for r, i in owned if r not in self._partial}
                self._partial = {r: i for r, i in owned if r in self._partial}
            return clients, self._x[: len(order)]


class RowWriter:
    """One writer of a row of :class:`RoundRows` (:meth:`RoundRows.writer`): each part of
    an update received in parts is written at its place (:meth:`write`), then
    :meth:`commit` makes the row count as holding the update if this writer wrote every
    value, or :meth:`abort` gives the row back. Safe to call from worker threads."""

    def __init__(self, rows: RoundRows, ref: RowRef, generation: int, width: int) -> None:
        self.rows, self.ref, self.generation, self.width = rows, ref, generation, width
        self.written = 0
        """Values this writer wrote (each part once: the feed refuses repeated parts)."""
        self._closed = False

    def write(self, start: int, values: Flat) -> bool:
        """Write ``values`` (1-D) at the row's flat index ``start``; False when the row is
        no longer being written (the round was reset, the writer aborted, or another writer
        finished it: :meth:`commit` tells which). ValueError outside the row."""
        if self._closed or not self.rows._put(self, start, values):
            return False
        self.written += int(values.size)
        return True

    def commit(self) -> bool:
        """Whether the row now holds the update: True once this writer wrote all
        :attr:`width` values (or another writer of the same ref did); otherwise the row is
        given back and False."""
        if self._closed:
            return False
        self._closed = True
        return self.rows._commit(self, self.written == self.width)

    def abort(self) -> None:
        """Give the row back, unless it is held or another writer still writes it."""
        if not self._closed:
            self._closed = True
            self.rows._abort(self)


def fresh_rows(n: int, width: int) -> Rows:
    """An uninitialised ``n`` x ``width`` float32 matrix in an anonymous mapping of its own,
    its pages left to the kernel's default policy. NumPy advises transparent huge pages for
    every large array; where the kernel then compacts memory at the first touch (THP
    ``defrag`` set to ``madvise``, the common default) writing a fresh 400 MB matrix took
    0.08-1.1 s here, against a steady 0.15-0.26 s without the advice (docs/architecture.md,
    "Cost of a round"). A round's matrix is written once per round, so the steady cost wins."""
    nbytes = n * width * np.dtype(np.float32).itemsize
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    if nbytes == 0 or not flags:  # nothing to map, or no anonymous private mappings here
        return np.empty((n, width), np.float32)
    memory = mmap.mmap(-1, nbytes, flags=flags)
    return np.frombuffer(memory, np.float32).reshape(n, width)


def _gather_rows(x: Rows, idx: Sequence[int], live: Sequence[bool] | None = None) -> None:
    """``x[i] = x[idx[i]]`` for every i of the permutation ``idx``, in place, following its
    cycles with one spare row. A row whose ``live`` is False holds nothing: it is
    overwritten without being saved, and nothing is copied into its new place."""
    done = [False] * len(idx)
    spare = np.empty(x.shape[1], x.dtype)
    for start in range(len(idx)):
        if done[start] or idx[start] == start:
            done[start] = True
            continue
        saved = live is None or live[start]
        if saved:
            spare[:] = x[start]
        j = start
        while True:
            done[j] = True
            k = idx[j]
            if k == start:
                if saved:
                    x[j] = spare
                break
            if live is None or live[k]:
                x[j] = x[k]
            j = k


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
