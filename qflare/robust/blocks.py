"""Rules, pre-aggregators and detection over column blocks of a round's n x d matrix.

A model of 125M parameters and 100 updates is 50 GB of rows: the round's matrix need not
fit in memory, but its geometry does. Every distance-based rule, every pre-aggregator and
the detector read the updates only through the n x n Gram matrix X X^T (and inner
products with a reference vector), which is a sum over column blocks:
G = sum_b X[:, b] X[:, b]^T. So a round is at most two passes over the blocks:

1. accumulate the Gram matrix of the rows (and the reference, as row n) in float64;
2. ask the rule for its :class:`~qflare.robust._base.RowPlan` (``Aggregator.plan``): the
   pre-aggregators are linear maps of the rows (NNM: neighbour means, clipping and ARC:
   row scales, bucketing: bucket means) whose Gram matrix follows as T G T^T; a
   distance-based rule gives one row of coefficients (Krum's pick, Weiszfeld's weights,
   CAF's filter ...), a coordinate-wise rule (median, trimmed mean, Meamed, Bulyan's
   second phase) the rows it keeps and the function it applies to each column;
3. per column block, apply the pre-aggregators' maps to the block, form the rows the
   rule reads (coefficients @ rows) and map them to the block of the result.

Each rule's maths has one home, its class: ``plan`` runs the same functions on the
accumulated Gram matrix that ``aggregate`` runs on ``gram(x)``. A coordinate-wise rule
that drops no rows (mean, median, trimmed mean) with no pre-aggregator skips pass 1.

Detection: :func:`qflare.robust.detect` is a function of the updates' Gram matrix alone
(:func:`~qflare.robust.detection.detect_gram`), which it computes on a fixed column grid
(:data:`GRAM_GRID`); :func:`detect_blocks` accumulates the same grid's chunks from blocks
of any size (:func:`grid_view`), so its verdict and scores are the in-memory ones, bit for
bit.

Sources: :class:`ArrayBlocks` over an array or ``np.memmap``, :class:`FileBlocks` over a
raw row-major file read block by block. Measured here (20 x 5M float32 rows, a 400 MB
file, blocks of 2^18 columns, ``nnm(f=4)+multikrum(f=4)``): peak resident memory (VmHWM)
337 MB from a FileBlocks, 749 MB from a memmap (its touched pages count), 1075 MB for
the file loaded whole and the in-memory rule; the interpreter with torch and NumPy imported starts at 235 MB.

Numbers: the block-wise Gram matrix sums per-block products (in the rows' dtype) in
float64, so it is no less exact than the in-memory one; results agree with the in-memory
rules to float32 rounding (tests/unit/robust/test_blocks.py checks relative error <= 1e-5
for every registered rule and pre-aggregator). On one grid the sum is the same bits
whatever the block size: each chunk's GEMM runs on a 64-byte aligned copy
(:func:`~qflare.robust._core.gram_sum`; MKL rounds by the operand's alignment). The
aggregator runs its rule through :func:`aggregate_blocks` on a fixed column grid
(:class:`GridBlocks`; ``services/aggregator/core.py``, ``GRID``), in memory and block by
block alike, so that its model does not depend on the block size. The detector judges a
round (``services/detector/core.py``, ``decide_source``; in memory too) by
:func:`detect_view` on the Gram matrix on :data:`GRAM_GRID` (:func:`grid_view`), with a
:class:`TapColumns` gathering its reputation's sketch columns in the same pass.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ._base import (
    Aggregator,
    GramView,
    RowPlan,
    as_reference,
    is_scaling,
    refuse_unequal_weights,
)
from ._core import (
    F64,
    GRAM_GRID,
    FloatArray,
    RngLike,
    check_int,
    check_matrix,
    check_weights,
    gram_sum,
    mm,
)
from .detection import Thresholds, Verdict, detect_gram
from .spec import get_rule


class BlockSource(Protocol):
    """An n x d float32/float64 matrix read one column block at a time, as often as
    asked (a round makes up to two passes)."""

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def dtype(self) -> np.dtype[Any]: ...

    def block(self, start: int, stop: int) -> FloatArray:
        """Columns [start, stop) of every row: [n, stop - start]."""
        ...


class ArrayBlocks:
    """A :class:`BlockSource` over a NumPy array or ``np.memmap`` (never copied whole)."""

    def __init__(self, x: FloatArray) -> None:
        if not isinstance(x, np.ndarray):
            raise TypeError(f"blocks come from a numpy array or memmap, got {type(x).__name__}")
        check_matrix("a block source", x)
        self._x = x

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self._x.shape[0]), int(self._x.shape[1]))

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._x.dtype

    def block(self, start: int, stop: int) -> FloatArray:
        return self._x[:, start:stop]


class FileBlocks:
    """A :class:`BlockSource` over a raw row-major file of n rows of d (float32/float64),
    each block read with one positioned read per row into a fresh [n, b] array.

    Unlike a memmap, reading costs only the block's own bytes of resident memory: a
    memmap's pages, once touched, count in the process's resident set (VmHWM) until the
    kernel reclaims them, so a pass over a 400 MB file lifted the peak by 400 MB.
    """

    def __init__(
        self, path: str | Path, shape: tuple[int, int], dtype: npt.DTypeLike = "float32"
    ) -> None:
        self._path = Path(path)
        self._dtype = np.dtype(dtype)
        if self._dtype not in (np.float32, np.float64):
            raise TypeError(f"a block source holds float32 or float64, got {self._dtype}")
        n, d = (check_int("n", shape[0], minimum=1), check_int("d", shape[1], minimum=1))
        self._shape = (n, d)
        size = self._path.stat().st_size
        if size != n * d * self._dtype.itemsize:
            raise ValueError(
                f"{self._path} holds {size} bytes, not the {n * d * self._dtype.itemsize} "
                f"of {n} x {d} {self._dtype}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._dtype

    def block(self, start: int, stop: int) -> FloatArray:
        n, d = self._shape
        if not 0 <= start < stop <= d:
            raise ValueError(f"columns [{start}, {stop}) are not within [0, {d})")
        out: FloatArray = np.empty((n, stop - start), dtype=self._dtype)
        item = self._dtype.itemsize
        fd = os.open(self._path, os.O_RDONLY)
        try:
            for i in range(n):
                want = (stop - start) * item
                got = os.preadv(fd, [memoryview(out[i]).cast("B")], (i * d + start) * item)
                if got != want:
                    raise ValueError(f"{self._path}: short read of row {i} ({got} of {want} bytes)")
        finally:
            os.close(fd)
        return out


class DerivedBlocks:
    """Base of a :class:`BlockSource` whose blocks are made from those of ``inner``
    (subclasses define ``block``): the same shape and dtype as ``inner``."""

    def __init__(self, inner: BlockSource | FloatArray) -> None:
        self._inner = as_source(inner)

    @property
    def shape(self) -> tuple[int, int]:
        return self._inner.shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._inner.dtype


class GridBlocks(DerivedBlocks):
    """A :class:`BlockSource` that serves any column span of ``inner`` as a C-contiguous
    array while reading ``inner`` only in blocks of ``read`` columns (aligned at multiples
    of ``read``, one held at a time; a span across two is joined).

    So a computation runs on a grid of its own choosing (the aggregator's, whose sums
    must not depend on how the rows are read) in memory O(n * (read + span))."""

    def __init__(self, inner: BlockSource | FloatArray, read: int) -> None:
        super().__init__(inner)
        self._read = check_int("block size", read, minimum=1)
        self._held: tuple[int, int, FloatArray] | None = None

    def block(self, start: int, stop: int) -> FloatArray:
        n, d = self.shape
        if not 0 <= start < stop <= d:
            raise ValueError(f"columns [{start}, {stop}) are not within [0, {d})")
        parts: list[FloatArray] = []
        pos = start
        while pos < stop:
            if self._held is None or not self._held[0] <= pos < self._held[1]:
                a = pos - pos % self._read
                b = min(a + self._read, d)
                got = self._inner.block(a, b)
                if got.shape != (n, b - a):
                    raise ValueError(f"a block of columns [{a}, {b}) has shape {got.shape}")
                self._held = (a, b, got)
            a, b, held = self._held
            end = min(stop, b)
            parts.append(held[:, pos - a : end - a])
            pos = end
        joined = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        out: FloatArray = np.ascontiguousarray(joined)
        return out


def open_memmap(
    path: str | Path, shape: tuple[int, int], dtype: npt.DTypeLike = "float32"
) -> ArrayBlocks:
    """A read-only block source over a raw row-major file of ``shape`` (n rows of d)."""
    return ArrayBlocks(np.memmap(path, dtype=np.dtype(dtype), mode="r", shape=shape))


def as_source(x: BlockSource | FloatArray) -> BlockSource:
    return ArrayBlocks(x) if isinstance(x, np.ndarray) else x


def spans(d: int, size: int) -> Iterator[tuple[int, int]]:
    """[start, stop) of the column blocks of width ``size`` (the last one narrower)."""
    size = check_int("block size", size, minimum=1)
    for start in range(0, d, size):
        yield start, min(start + size, d)


def _reference_source(reference: BlockSource | FloatArray | None, d: int) -> BlockSource | None:
    if reference is None:
        return None
    if isinstance(reference, np.ndarray):
        return ArrayBlocks(as_reference(reference, d).reshape(1, -1))
    if tuple(reference.shape) != (1, d):
        raise ValueError(f"reference must be [1, {d}], got shape {tuple(reference.shape)}")
    return reference


def accumulate_gram(
    src: BlockSource | FloatArray,
    size: int,
    reference: BlockSource | FloatArray | None = None,
) -> F64:
    """Gram matrix of the rows (then the reference as row n), one block at a time.

    Each block's product is :func:`~qflare.robust._core.gram` (the rows' dtype, as in
    memory) summed in float64 (:func:`~qflare.robust._core.gram_sum`); a non-finite row
    poisons only its own row and column. The sum depends on ``size``:
    :func:`grid_view` sums on a fixed grid instead.
    """
    src = as_source(src)
    n, d = src.shape
    ref = _reference_source(reference, d)

    def chunks() -> Iterator[FloatArray]:
        for a, b in spans(d, size):
            xb = src.block(a, b)
            if ref is None:
                yield xb
            else:
                yield np.concatenate([xb, ref.block(a, b).astype(xb.dtype)])

    return gram_sum(chunks(), n + int(ref is not None))


def gram_view(
    src: BlockSource | FloatArray,
    size: int,
    reference: BlockSource | FloatArray | None = None,
) -> GramView:
    """The rows' :class:`GramView`, accumulated on first use (see :class:`GramView`)."""
    s = as_source(src)
    check_int("block size", size, minimum=1)  # refused now, not on first use
    n = s.shape[0]
    return GramView(
        n, s.dtype, lambda: accumulate_gram(s, size, reference), has_ref=reference is not None
    )


def grid_view(src: BlockSource | FloatArray, size: int) -> GramView:
    """The rows' :class:`GramView` on the column grid :data:`GRAM_GRID`, reading ``src``
    in blocks of ``size`` columns (:class:`GridBlocks`; memory O(n * (size + grid))): the
    Gram matrix :func:`~qflare.robust._core.grid_gram` gives the same rows in memory, bit
    for bit, whatever ``size``. Detection's view (:func:`detect_blocks`)."""
    return gram_view(GridBlocks(src, size), GRAM_GRID)


def plan_blocks(
    rule: Aggregator | str,
    src: BlockSource | FloatArray,
    size: int,
    weights: Any = None,
    *,
    reference: BlockSource | FloatArray | None = None,
    rng: RngLike = None,
) -> RowPlan:
    """The rule's plan for the rows of ``src`` (pass 1 when the rule needs geometry)."""
    agg = get_rule(rule) if isinstance(rule, str) else rule
    if not isinstance(agg, Aggregator):
        raise TypeError(f"rule must be an Aggregator or a rule spec, got {type(rule).__name__}")
    s = as_source(src)
    w = check_weights(weights, s.shape[0])
    refuse_unequal_weights(agg, w, "pass weights=None or equal weights")
    return agg.plan(gram_view(s, size, reference), w, rng=rng)


def iter_aggregate(
    rule: Aggregator | str,
    src: BlockSource | FloatArray,
    size: int,
    weights: Any = None,
    *,
    reference: BlockSource | FloatArray | None = None,
    rng: RngLike = None,
) -> Iterator[tuple[int, FloatArray]]:
    """``rule(X, weights, reference=, rng=)`` one column block at a time: yields
    (start, result[start:start + width]) in the rows' dtype, left to right."""
    s = as_source(src)
    n, d = s.shape
    ref = _reference_source(reference, d)
    plan = plan_blocks(rule, s, size, weights, reference=reference, rng=rng)
    m = n
    for t in (*plan.maps, plan.coef):
        if t.shape[1] != m:
            raise ValueError(f"a plan's map reads {t.shape[1]} rows, given {m}")
        m = t.shape[0]
    read = _reader(plan.coef)
    for a, b in spans(d, size):
        rows = s.block(a, b)
        for t in plan.maps:
            rows = apply_map(t, rows)
        rows = read(rows)
        if plan.ref_coef is not None and ref is not None:
            rows = rows + np.outer(plan.ref_coef, ref.block(a, b)).astype(rows.dtype)
        out = rows[0] if plan.per_block is None else plan.per_block(rows)
        yield a, np.asarray(out, dtype=s.dtype)


def aggregate_blocks(
    rule: Aggregator | str,
    src: BlockSource | FloatArray,
    size: int,
    weights: Any = None,
    *,
    reference: BlockSource | FloatArray | None = None,
    rng: RngLike = None,
    out: FloatArray | None = None,
) -> FloatArray:
    """:func:`iter_aggregate` gathered into ``out`` ([d], e.g. a writable memmap) or a
    new array; the same vector as the in-memory rule."""
    s = as_source(src)
    d = s.shape[1]
    if out is None:
        out = np.empty(d, dtype=s.dtype)
    elif out.shape != (d,):
        raise ValueError(f"out must have shape ({d},), got {tuple(out.shape)}")
    for a, block in iter_aggregate(rule, s, size, weights, reference=reference, rng=rng):
        out[a : a + len(block)] = block
    return out


def apply_map(t: F64, rows: FloatArray) -> FloatArray:
    """A pre-aggregator's map applied to a block of its input rows, in their dtype, with
    what it reads (:func:`~qflare.robust._base.reads`): a row scaling multiplies
    element-wise (as clipping does in memory), any other map sums each output row's
    nonzero terms only (a NaN row it leaves out does not poison it)."""
    with np.errstate(invalid="ignore", over="ignore"):
        if is_scaling(t):
            scaled: FloatArray = rows * np.diag(t).astype(rows.dtype)[:, None]
            return scaled
        bad = ~np.isfinite(rows).all(axis=1)
        if not bad.any():
            # Contiguous and writable for torch's GEMM (a read-only memmap is neither).
            return mm(t, np.require(rows, requirements=["C", "W"]))
        good = np.flatnonzero(~bad)
        out = mm(t[:, good], np.ascontiguousarray(rows[good]))
        for i in np.flatnonzero(np.any(t[:, bad] != 0, axis=1)):
            nz = np.flatnonzero(t[i])
            out[i] = mm(t[i : i + 1, nz], np.ascontiguousarray(rows[nz]))[0]
    return out


def _reader(coef: F64) -> Any:
    """How a block of the plan's rows is formed from a block of the input rows: rows that
    pick one input row as it is are gathered (exact, and a fresh array a per-block rule may
    sort in place), the others are combined over the input rows they read (a NaN row
    left out must not meet a 0 coefficient)."""
    nz = coef != 0
    picks = nz.sum(axis=1) == 1
    cols = np.argmax(nz, axis=1)
    if np.all(picks) and np.all(coef[np.arange(len(coef)), cols] == 1.0):
        return lambda xb: xb[cols]
    used = np.flatnonzero(nz.any(axis=0))
    sub = coef[:, used]

    def combine(xb: FloatArray) -> FloatArray:
        if len(used) == 0:
            return np.zeros((coef.shape[0], xb.shape[1]), dtype=xb.dtype)
        with np.errstate(invalid="ignore", over="ignore"):
            out: FloatArray = mm(sub, np.ascontiguousarray(xb[used]))
        return out

    return combine


def detect_blocks(
    src: BlockSource | FloatArray,
    f: int,
    size: int,
    *,
    ids: Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
) -> Verdict:
    """:func:`~qflare.robust.detect` over column blocks of ``size``: every score it
    computes is a function of the Gram matrix, accumulated on the column grid
    (:func:`grid_view`) as :func:`~qflare.robust.detect` computes it in memory, so the
    verdict and scores are the in-memory ones, bit for bit."""
    return detect_view(grid_view(src, size), f, ids=ids, thresholds=thresholds)


def detect_view(
    view: GramView,
    f: int,
    *,
    ids: Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
    arrival: Sequence[float] | None = None,
) -> Verdict:
    """:func:`~qflare.robust.detection.detect_gram` on the rows' :class:`GramView`
    (accumulated on first use; :func:`grid_view` for the in-memory verdict), for a caller
    that reads more of it (the detector's review reads ``view.finite``)."""
    return detect_gram(view.g, view.finite, f, ids=ids, thresholds=thresholds, arrival=arrival)


class TapColumns(DerivedBlocks):
    """``inner``'s blocks as they are, keeping a copy of its columns ``cols`` as the
    blocks pass: after one pass over every column (e.g. :func:`accumulate_gram`'s),
    :attr:`columns` is ``inner[:, cols]`` with no read of its own (a random subset of
    columns read alone costs one positioned read per row and column from a file)."""

    def __init__(self, inner: BlockSource | FloatArray, cols: Any) -> None:
        super().__init__(inner)
        n, d = self.shape
        self._cols = np.asarray(cols, dtype=np.intp).reshape(-1)
        if len(self._cols) and (self._cols.min() < 0 or self._cols.max() >= d):
            raise ValueError(f"columns must lie in [0, {d})")
        self._got: FloatArray = np.empty((n, len(self._cols)), dtype=self.dtype)
        self._seen = np.zeros(len(self._cols), dtype=bool)

    def block(self, start: int, stop: int) -> FloatArray:
        xb = self._inner.block(start, stop)
        hit = (self._cols >= start) & (self._cols < stop)
        if hit.any():
            self._got[:, hit] = xb[:, self._cols[hit] - start]
            self._seen |= hit
        return xb

    @property
    def columns(self) -> FloatArray:
        """``inner[:, cols]`` ([n, len(cols)], the rows' dtype)."""
        if not self._seen.all():
            missing = self._cols[~self._seen]
            raise ValueError(f"columns {missing[:5].tolist()}... have not been read yet")
        return self._got


__all__ = [
    "GRAM_GRID",
    "ArrayBlocks",
    "BlockSource",
    "DerivedBlocks",
    "FileBlocks",
    "GridBlocks",
    "TapColumns",
    "accumulate_gram",
    "aggregate_blocks",
    "detect_blocks",
    "detect_view",
    "gram_view",
    "grid_view",
    "iter_aggregate",
    "open_memmap",
    "plan_blocks",
    "spans",
]
