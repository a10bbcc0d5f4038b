"""Shared plumbing for the robust rules: input checks, array kinds, pairwise geometry.

Every rule computes on NumPy views of its input (``torch.Tensor.numpy()`` is zero-copy on
CPU) and hands back the same kind it was given. Pairwise geometry goes through one Gram
matrix X X^T, several times faster here than cdist (measurements in docs/robust.md); its
float32 GEMM rounds about eps |x_i| |x_j|, so squared distances between updates that
share a large common component lose digits (docs/robust.md, "Precision").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import torch

#: updates as the rules see them: float32 or float64 rows
FloatArray: TypeAlias = npt.NDArray[np.floating[Any]]
F64: TypeAlias = npt.NDArray[np.float64]
#: optional per-update weights [n], validated by ``check_weights``
Weights: TypeAlias = F64 | None
BoolArray: TypeAlias = npt.NDArray[np.bool_]
IntArray: TypeAlias = npt.NDArray[np.intp]
#: what a rule accepts and returns: a NumPy array or a CPU tensor
ArrayLike: TypeAlias = FloatArray | torch.Tensor
#: a Generator, a seed, or None for fresh OS entropy
RngLike: TypeAlias = np.random.Generator | int | None


def check_int(name: str, value: Any, *, minimum: int = 0) -> int:
    """Validate an integer hyperparameter at construction."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False) -> float:
    """Validate a real hyperparameter at construction (ints are accepted as reals)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not np.isfinite(v) or v < minimum or (strict and v == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be finite and {op} {minimum}, got {value!r}")
    return v


@dataclass(frozen=True)
class Batch:
    """A validated [n, d] input as a NumPy view plus how to hand results back."""

    x: FloatArray
    weights: Weights
    is_torch: bool

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    def back(self, out: FloatArray) -> ArrayLike:
        res = np.ascontiguousarray(out, dtype=self.x.dtype)
        return torch.from_numpy(res) if self.is_torch else res


def as_batch(updates: Any, weights: Any = None) -> Batch:
    """Check an [n, d] float array or CPU tensor (and optional [n] weights)."""
    if isinstance(updates, torch.Tensor):
        if updates.device.type != "cpu":
            raise ValueError(f"updates must be on the CPU, got device {updates.device}")
        x: npt.NDArray[Any] = updates.detach().numpy()
        is_torch = True
    elif isinstance(updates, np.ndarray):
        x, is_torch = updates, False
    else:
        raise TypeError(
            f"updates must be a numpy array or torch tensor, got {type(updates).__name__}"
        )
    check_matrix("updates", x)
    return Batch(x, check_weights(weights, x.shape[0]), is_torch)


def check_matrix(what: str, x: np.ndarray) -> None:
    """Refuse anything but an [n, d] float32/float64 array with n, d >= 1 (the updates of a
    round, in memory or as a block source), naming ``what``."""
    if x.ndim != 2:
        raise ValueError(f"{what} must have shape [n, d], got shape {tuple(x.shape)}")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{what} must be float32 or float64, got {x.dtype}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{what} must have n >= 1 and d >= 1, got shape {tuple(x.shape)}")


def check_weights(weights: Any, n: int) -> Weights:
    """Validate optional per-update weights: [n], finite, >= 0, positive sum."""
    if weights is None:
        return None
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().numpy()
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"weights must have shape [{n}], got {tuple(w.shape)}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and sum to a positive value")
    return w


def require(cond: bool, rule: str, text: str) -> None:
    """Raise the call-time requirement error with the numbers in it."""
    if not cond:
        raise ValueError(f"{rule}: requirement violated: {text}")


def finite_rows(x: FloatArray) -> BoolArray:
    """Mask of the rows the geometry can use: every entry finite and the squared norm
    representable in x's dtype (one BLAS dot per row).

    A float32 row of entries near 1e20 is finite, but its squared norm overflows the
    float32 GEMM behind ``gram``, and one such row turned the geometric median into NaN
    and made CAF's and SMEA's eigensolvers fail. No honest update is that large, so it
    counts as non-finite.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        sq = np.fromiter((np.dot(r, r) for r in x), np.float64, x.shape[0])
    ok: BoolArray = np.isfinite(sq)
    return ok


def _t(a: FloatArray) -> torch.Tensor:
    # torch.from_numpy shares memory but refuses negative strides.
    return torch.from_numpy(a if all(s >= 0 for s in a.strides) else np.ascontiguousarray(a))


def gram(x: FloatArray) -> F64:
    """Raw Gram matrix X X^T (float64 result of a float32/64 GEMM).

    Through torch: on this shared 2-core machine NumPy's bundled OpenBLAS ran the same
    product 5-15x slower than torch's GEMM (``torch.from_numpy`` is zero-copy).
    """
    t = _t(x)
    g: F64 = (t @ t.T).double().numpy()
    # The GEMM may round G_ij and G_ji differently; a tie between d(i, j) and d(j, i)
    # (Krum's scores of two copies) must stay a tie, broken by index.
    return (g + g.T) * 0.5


#: The column grid of detection's Gram matrix (:func:`grid_gram`): 65536 columns a chunk,
#: as the aggregator's (``services/aggregator/core.py``, ``GRID``).
GRAM_GRID = 1 << 16

#: The address to which :func:`gram_sum` aligns a chunk (bytes): MKL's float32 GEMM rounds
#: differently by the operand's address modulo 64 (measured here: of 15 misalignments of
#: the same 7 x 5000 rows, 12 gave other bits; at 64-byte alignment none did).
_ALIGN = 64


def _aligned(x: FloatArray) -> FloatArray:
    """x itself when C-contiguous, writable (torch's GEMM) and 64-byte aligned, otherwise
    such a copy."""
    if x.flags.c_contiguous and x.flags.writeable and x.ctypes.data % _ALIGN == 0:
        return x
    raw = np.empty(x.nbytes + _ALIGN, dtype=np.uint8)
    at = -raw.ctypes.data % _ALIGN
    out: FloatArray = raw[at : at + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


def gram_sum(chunks: Iterable[FloatArray], m: int) -> F64:
    """sum of :func:`gram` over ``chunks`` (each [m, w], in order): each chunk's product in
    its dtype, at one alignment, summed in float64. The same chunks give the same bits
    however they were read; a non-finite row poisons only its own row and column."""
    g: F64 = np.zeros((m, m))
    with np.errstate(invalid="ignore", over="ignore"):
        for xb in chunks:
            if xb.shape[0] != m:
                raise ValueError(f"a chunk of {xb.shape[0]} rows for a Gram matrix of {m}")
            g += gram(_aligned(xb))
    return g


def grid_gram(x: FloatArray) -> F64:
    """X X^T of an [n, d] array on the column grid :data:`GRAM_GRID`: what
    :func:`qflare.robust.blocks.grid_view` accumulates from the same rows read in blocks
    of any size, bit for bit."""
    d = x.shape[1]
    return gram_sum((x[:, a : a + GRAM_GRID] for a in range(0, d, GRAM_GRID)), x.shape[0])


def finite_from_gram(g: F64, dtype: np.dtype[Any]) -> BoolArray:
    """Rows of Gram matrix ``g`` the geometry can use: a finite squared norm representable
    in the rows' ``dtype`` (what :func:`finite_rows` counts, from the Gram matrix)."""
    sq = np.diag(g)
    with np.errstate(invalid="ignore"):
        ok: BoolArray = np.isfinite(sq) & (sq <= float(np.finfo(dtype).max))
    return ok


def centred_gram(x: FloatArray) -> F64:
    """Gram matrix of the rows after subtracting their mean: H G H, in float64.

    Squared distances follow as G_ii + G_jj - 2 G_ij; centring in n x n space costs
    nothing on the d side.
    """
    return centre_gram(gram(x))


def centre_gram(g: F64) -> F64:
    # Non-finite rows poison g; callers test the result and drop them (no warning noise).
    with np.errstate(invalid="ignore", over="ignore"):
        r = g.mean(axis=1, keepdims=True)
        out: F64 = g - r - r.T + g.mean()
        return out


def row_norms(x: FloatArray) -> F64:
    """Euclidean norm of every row: one BLAS dot per row, no temporary.

    Measured here (200 x 1e5): 19 ms, against 28 ms for einsum, 32 ms for torch's
    vector_norm and 90 ms for np.linalg.norm (which squares into a temporary).
    """
    with np.errstate(over="ignore"):  # an overflowing row gives inf; callers drop it
        sq = np.fromiter((float(np.dot(r, r)) for r in x), np.float64, x.shape[0])
    return np.sqrt(sq)


def mm(a: F64, x: FloatArray) -> FloatArray:
    """a [m, n] @ x [n, d] in x's dtype: GEMV by NumPy, GEMM through torch (see ``gram``).

    Measured here at n=50, d=1e6: NumPy's GEMV 29 ms, torch's 44 ms.
    """
    ax = np.ascontiguousarray(a, dtype=x.dtype)
    if ax.shape[0] == 1:
        with np.errstate(invalid="ignore", over="ignore"):  # see combine's fallback
            return ax @ x
    out: FloatArray = (torch.from_numpy(ax) @ _t(x)).numpy()
    return out


def sq_dists_from_gram(g: F64) -> F64:
    """Squared pairwise distances from a Gram matrix, clamped at 0, exact 0 diagonal."""
    diag = np.diag(g)
    d2 = diag[:, None] + diag[None, :] - 2.0 * g
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    return d2


def pairwise_sq_dists(x: FloatArray) -> F64:
    """Squared pairwise distances of the rows of x (n x n, float64).

    From the raw Gram matrix: centring it afterwards cannot restore what the GEMM rounded
    (the error is about eps |x_i| |x_j| either way) and would add rounding of its own,
    which breaks exact ties between distances of exactly representable updates.
    """
    return sq_dists_from_gram(gram(x))


def weighted_mean(x: FloatArray, w: Weights) -> FloatArray:
    """Mean of rows: unweighted in x's dtype, weighted as float64 via one GEMV."""
    if w is None:
        out: FloatArray = x.mean(axis=0)  # float32 accumulation over n rows: fast, exact enough
        return out
    return combine(x, w / w.sum())


def combine(x: FloatArray, coef: F64) -> F64:
    """sum_i coef_i x_i; rows with a zero coefficient never reach the result.

    One GEMV over all rows; only if a zero-weighted non-finite row poisoned it (0 * inf)
    are the selected rows gathered and the product redone.
    """
    out: F64 = mm(coef[None, :], x)[0].astype(np.float64)
    if np.all(np.isfinite(out)):
        return out
    nz = np.flatnonzero(coef)
    redone: F64 = mm(coef[None, nz], x[nz])[0].astype(np.float64)
    return redone


def sorted_rows(x: FloatArray) -> FloatArray:
    """Copy of x sorted along axis 0 (NaN last); faster here than np.median, and on par
    with one np.partition (docs/robust.md)."""
    return np.sort(x, axis=0)


def median_from_sorted(s: FloatArray) -> FloatArray:
    """Coordinate-wise median in s's dtype (mean of the two middle values for even n,
    as np.median)."""
    n = s.shape[0]
    if n % 2:
        middle: FloatArray = s[n // 2].copy()
        return middle
    mid: FloatArray = (s[n // 2 - 1] + s[n // 2]) * s.dtype.type(0.5)
    return mid


def closest_window_mean(s: FloatArray, centre: FloatArray, k: int) -> FloatArray:
    """Per coordinate, the mean of the k sorted values closest to centre (s's dtype).

    Ties in distance go to the smaller value. s must be finite (callers drop the other
    rows). The k values nearest a point form a contiguous window of the sorted column:
    sliding the window one step right swaps its first value for the next one after it,
    and the best start is one past the last step where that swap brings a strictly
    closer value, so no n x d array of |x - centre| is built. The chosen window is then
    summed directly: a running sum slid along the column (add the entering value,
    subtract the leaving one) cancels catastrophically when a leaving value is huge
    (Byzantine updates near 1e15 left 10-40% error in the mean of honest values near 1,
    near 1e13 0.2%). Column blocks keep the float64 temporaries small.
    """
    n, d = s.shape
    out = np.empty(d, dtype=s.dtype)
    step = 1 << 14
    for j in range(0, d, step):
        sb, cb = s[:, j : j + step], centre[j : j + step].astype(np.float64)
        best: npt.NDArray[np.unsignedinteger[Any]] = np.zeros(
            sb.shape[1], dtype=np.min_scalar_type(n - k)
        )
        for i in range(n - k):
            closer = np.abs(sb[i + k] - cb) < np.abs(sb[i] - cb)
            best = np.where(closer, i + 1, best)
        # Rows n - k .. k - 1 lie in every window; row r elsewhere lies in the windows
        # starting at max(0, r - k + 1) .. min(r, n - k).
        acc = sb[n - k : k].sum(axis=0, dtype=np.float64) if k > n - k else np.zeros(len(cb))
        for r in range(n):
            if n - k <= r < k:
                continue
            lo, hi = max(0, r - k + 1), min(r, n - k)
            acc += sb[r] * ((best >= lo) & (best <= hi))
        out[j : j + step] = acc / k
    return out
