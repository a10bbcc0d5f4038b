"""A round's matrix kept in a file: :class:`SpilledRows`, the :class:`RoundRows
<qflare.messages.tensors.RoundRows>` of a round too large for memory.

The aggregator and the detector keep each round's updates as the rows of one n x d float32
matrix. Its size grows with the number of participants times the model's: 100 clients of
a 100 MB model make 10 GB. Past a service's ``rows_in_memory_mb`` the rows go, as each
update arrives, into an unlinked file in the service's data folder (one positioned write
per tensor, no flattened copy; one per part of an update received in parts), and the
round is computed on column blocks read back from it (:meth:`SpilledRows.source`, a
:class:`~qflare.robust.blocks.BlockSource`): the aggregation by
:func:`~qflare.services.aggregator.core.aggregate_source`, bit for bit the model of the
in-memory round. Reads go through ``preadv`` rather than a memory map: a
map's pages, once touched, count in the process's resident set.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qflare.messages.tensors import Layout, RoundRows, RowRef, Rows, Tensors

#: bytes in a float32 value: the rows' dtype in memory and in the file
_ITEM = np.dtype(np.float32).itemsize


class SpilledRows(RoundRows):
    """:class:`RoundRows` whose rows live in an unlinked file under ``folder`` (gone when
    closed or when the process ends). Rows are written and read with positioned I/O, so
    nothing of size n x d is ever in memory; :meth:`matrix` is refused, :meth:`source`
    reads the rows block by block."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        capacity: int,
        clients: Sequence[str] = (),
        layout: Layout | None = None,
    ) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 (closed by close())
        super().__init__(capacity, clients, layout)

    def close(self) -> None:
        """Give the file back. Under the rows' lock, and a new generation: a write still in
        flight for this round (a late update in a worker thread) finishes first or is
        dropped, and never lands in whatever file reuses the descriptor."""
        with self._lock:
            self.generation += 1
            self._file.close()

    def _write_row(self, i: int, layout: Layout, tensors: Tensors) -> None:
        if self._file.closed:
            raise ValueError("the round's rows were released")
        offset = i * layout.size * _ITEM
        fd = self._file.fileno()
        for name in layout.names:
            flat = np.ascontiguousarray(tensors[name], dtype=np.float32).reshape(-1)
            data = flat.data.cast("B")
            while data:
                written = os.pwritev(fd, [data], offset)
                data, offset = data[written:], offset + written

    def _write_range(self, i: int, width: int, start: int, values: Any) -> None:
        if self._file.closed:
            raise ValueError("the round's rows were released")
        offset = (i * width + start) * _ITEM
        flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        data = flat.data.cast("B")
        while data:
            written = os.pwritev(self._file.fileno(), [data], offset)
            data, offset = data[written:], offset + written

    def matrix(self, refs: Sequence[RowRef]) -> tuple[list[str], Rows]:
        raise TypeError("a spilled round is read in column blocks: use source()")

    def source(self, refs: Sequence[RowRef]) -> tuple[list[str], Any]:
        """The rows of ``refs`` (one per client, all held: KeyError otherwise) in client-id
        order as a block source, and those clients."""
        order = sorted(refs)
        clients = [c for c, _d in order]
        if len(set(clients)) != len(clients):
            raise ValueError(f"one row per client: {clients}")
        with self._lock:
            idx = [self._rows[r] for r in order]
            width = self._layout.size if self._layout is not None else 0
        return clients, FileRows(self._file.fileno(), idx, width)


class FileRows:
    """A :class:`~qflare.robust.blocks.BlockSource` over rows ``idx`` (in that order) of a
    row-major float32 file of rows of ``d`` values, open as ``fd``: each block is one
    positioned read per row into a fresh [n, b] array."""

    def __init__(self, fd: int, idx: Sequence[int], d: int) -> None:
        self._fd, self._idx, self._d = fd, list(idx), d

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self._idx), self._d)

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(np.float32)

    def block(self, start: int, stop: int) -> Rows:
        if not 0 <= start < stop <= self._d:
            raise ValueError(f"columns [{start}, {stop}) are not within [0, {self._d})")
        out = np.empty((len(self._idx), stop - start), dtype=np.float32)
        for k, i in enumerate(self._idx):
            view = memoryview(out[k]).cast("B")
            offset = (i * self._d + start) * _ITEM
            while view:
                got = os.preadv(self._fd, [view], offset)
                if got == 0:
                    raise ValueError(f"short read of row {i} at byte {offset}")
                view, offset = view[got:], offset + got
        return out


def round_rows(
    folder: str | os.PathLike[str],
    budget_bytes: int,
    capacity: int,
    clients: Sequence[str] = (),
    layout: Layout | None = None,
) -> RoundRows:
    """A round's matrix: in memory when ``capacity`` rows of ``layout`` fit in
    ``budget_bytes``, else in a file under ``folder`` (:class:`SpilledRows`). Without a
    layout (the round's first update fixes it) the rows stay in memory."""
    rows = max(capacity, len(clients))
    if layout is not None and rows * layout.size * _ITEM > budget_bytes:
        return SpilledRows(folder, capacity, clients, layout)
    return RoundRows(capacity, clients, layout)


def next_rows(
    spare: RoundRows | None,
    folder: str | os.PathLike[str],
    budget_bytes: int,
    capacity: int,
    clients: Sequence[str] = (),
    layout: Layout | None = None,
) -> tuple[RoundRows, int]:
    """A round's matrix (:func:`round_rows`) and its generation: the job's ``spare`` from
    the round before, reset, when both are in memory (its pages are touched already); else
    new rows, and the spare given back (:func:`release`)."""
    rows = round_rows(folder, budget_bytes, capacity, clients, layout)
    if spare is not None and type(spare) is type(rows) is RoundRows:
        return spare, spare.reset(capacity, clients, layout)
    if spare is not None:
        release(spare)
    return rows, rows.generation


def release(rows: RoundRows) -> None:
    """Give back what ``rows`` holds outside memory (a spilled round's file)."""
    if isinstance(rows, SpilledRows):
        rows.close()


#: Bytes of rows a block read from a spilled round holds at most (a block computation
#: holds a few arrays of that size at once): what a service needs on top of its imports
#: when its round is in a file, whatever the round's size.
SPILL_BLOCK_BYTES = 32 * 2**20


def spill_block(budget_bytes: int, n: int) -> int:
    """Columns a block of ``n`` spilled rows may span: :data:`SPILL_BLOCK_BYTES` of rows
    (a quarter of the budget if that is less), at least 65,536 (the aggregation's grid)."""
    limit = min(SPILL_BLOCK_BYTES, budget_bytes // 4)
    return max(65_536, limit // (max(n, 1) * _ITEM))
