"""Block-wise rules, pre-aggregators and detection equal the in-memory ones.

Every rule and pre-aggregator registered by qflare.robust is taken from the registry, so a
new one is covered (or fails here) without editing this file. Relative error is
||blockwise - in_memory|| / ||in_memory|| over the result vector (over the clients for a
detection score), at most 1e-5, at block sizes 1, 7, a divisor of d, d and above d.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qflare.robust import PRE_AGGREGATORS, RULES, Aggregator, detect, get_rule
from qflare.robust._base import BlockwiseUnsupported, PreAggregator
from qflare.robust._core import FloatArray, Weights
from qflare.robust.blocks import (
    ArrayBlocks,
    BlockSource,
    FileBlocks,
    TapColumns,
    accumulate_gram,
    aggregate_blocks,
    detect_blocks,
    iter_aggregate,
    open_memmap,
    spans,
)

D = 41  # prime: only 1 and 41 divide it
SIZES = [1, 7, 12, D, 100]
TOL = 1e-5


def ours(table: dict[str, Any]) -> list[str]:
    """Registered names whose class is qflare's own (other tests register plug-ins)."""
    return sorted(k for k, v in table.items() if v.__module__.startswith("qflare.robust"))


def rule_spec(name: str, f: int) -> str:
    """A spec of rule ``name`` with its f, and parameters that make it do something."""
    cls = RULES[name]
    params = inspect.signature(cls).parameters
    args: dict[str, Any] = {"f": f} if "f" in params and name != "cc" else {}
    extra: dict[str, dict[str, Any]] = {
        "monna": {"idx": 1},
        "cc": {"tau": 1.0, "L": 3},
        "geomed": {"T": 5},
    }
    args.update(extra.get(name, {}))
    inner = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return f"{name}({inner})"


def pre_spec(name: str, f: int) -> str:
    params = inspect.signature(PRE_AGGREGATORS[name]).parameters
    args = {"clip": "c=2.5", "bucketing": "s=2"}.get(name, f"f={f}" if "f" in params else "")
    return f"{name}({args})"


def updates(n: int, f: int, dtype: type, seed: int) -> FloatArray:
    """n updates around a common direction with per-client spread; the last f pulled away
    (so clipping, filtering and selection all have something to do)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 1.0, size=(n, D)) + rng.normal(0.0, 1.0, size=(n, 1))
    x[n - f :] += rng.normal(4.0, 2.0, size=(f, D))
    return x.astype(dtype)


def rel_err(a: FloatArray, b: FloatArray) -> float:
    """Relative error over the finite entries; the others (a mean over a NaN row) must be
    the same non-finite values in both (inf otherwise)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a64)
    if not np.array_equal(a64[~ok], b64[~ok], equal_nan=True):
        return float("inf")
    a64, b64 = a64[ok], b64[ok]
    return float(np.linalg.norm(a64 - b64) / max(float(np.linalg.norm(a64)), 1e-30))


def in_memory(rule: Aggregator, x: FloatArray, **kw: Any) -> FloatArray | Exception:
    try:
        return np.asarray(rule(x, **kw))
    except ValueError as exc:
        return exc


def check_same(rule: Aggregator, x: FloatArray, *, sizes: list[int] = SIZES, **kw: Any) -> None:
    """Block-wise equals in memory at every size, or both refuse with the same message."""
    want = in_memory(rule, x, **kw)
    for size in sizes:
        if isinstance(want, Exception):
            with pytest.raises(type(want)) as got:
                aggregate_blocks(rule, x, size, **kw)
            assert str(got.value) == str(want)
            continue
        out = aggregate_blocks(rule, x, size, **kw)
        assert out.dtype == x.dtype and out.shape == (x.shape[1],)
        err = rel_err(want, out)
        assert err <= TOL, f"{rule!r} at block size {size}: relative error {err:.2e}"


CASES = [(9, 1), (9, 2), (12, 2), (12, 3), (15, 3)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n,f", CASES, ids=[f"n{n}-f{f}" for n, f in CASES])
@pytest.mark.parametrize("name", ours(RULES))
def test_every_rule_blockwise_equals_in_memory(name: str, n: int, f: int, dtype: type) -> None:
    x = updates(n, f, dtype, seed=n * 10 + f)
    kw: dict[str, Any] = {}
    if name == "cc":
        kw["reference"] = np.full(D, 0.3, dtype=dtype)
    check_same(get_rule(rule_spec(name, f)), x, **kw)


@pytest.mark.parametrize("name", ours(RULES))
def test_every_rule_needs_a_working_case(name: str) -> None:
    """At least one case above runs the rule rather than comparing two refusals."""
    runs = [
        not isinstance(
            in_memory(get_rule(rule_spec(name, f)), updates(n, f, np.float32, 0)), Exception
        )
        for n, f in CASES
    ]
    assert any(runs)


@pytest.mark.parametrize("rule", ours(RULES))
@pytest.mark.parametrize("pre", ours(PRE_AGGREGATORS))
def test_every_pre_aggregator_before_every_rule(pre: str, rule: str) -> None:
    n, f = 15, 2
    x = updates(n, f, np.float32, seed=7)
    chain = get_rule(f"{pre_spec(pre, f)}+{rule_spec(rule, f)}")
    kw: dict[str, Any] = {"rng": 11}
    if rule == "cc":
        kw["reference"] = np.full(D, 0.3, dtype=np.float32)
    check_same(chain, x, sizes=[1, 12, D], **kw)


@pytest.mark.parametrize("n,f", CASES, ids=[f"n{n}-f{f}" for n, f in CASES])
@pytest.mark.parametrize("pre", ours(PRE_AGGREGATORS))
def test_every_pre_aggregator_sizes(pre: str, n: int, f: int) -> None:
    x = updates(n, f, np.float64, seed=3)
    check_same(get_rule(f"{pre_spec(pre, f)}+mean"), x, rng=5)
    check_same(get_rule(f"{pre_spec(pre, f)}+median"), x, rng=5)


def test_pre_aggregators_chained() -> None:
    # float64: in float32 a selection in the chain can flip on a near-tie between two
    # distances the in-memory path (differences) and the block path (Gram matrix) round
    # differently (seed 1 on this machine's BLAS: another client kept, 11% apart; the
    # single rules' float32 agreement is checked above)
    x = updates(16, 3, np.float64, seed=1)
    check_same(get_rule("clip(c=3.0)+bucketing(s=2)+nnm(f=1)+multikrum(f=1)"), x, rng=2)
    check_same(get_rule("arc(f=3)+nnm(f=3)+trimmed_mean(f=3)"), x)


@pytest.mark.parametrize(
    "name", [r for r in ours(RULES) if RULES[r].weighted], ids=lambda r: str(r)
)
def test_weighted_rules(name: str) -> None:
    n, f = 12, 2
    x = updates(n, f, np.float32, seed=4)
    w = np.random.default_rng(0).uniform(0.5, 2.0, n)
    kw: dict[str, Any] = {"weights": w}
    if name == "cc":
        kw["reference"] = np.full(D, 0.3, dtype=np.float32)
    check_same(get_rule(rule_spec(name, f)), x, **kw)
    check_same(get_rule(f"bucketing(s=3)+{rule_spec(name, f)}"), x, rng=1, **kw)


@pytest.mark.parametrize("name", ours(RULES))
def test_non_finite_rows_are_left_out_as_in_memory(name: str) -> None:
    """A NaN row and an Inf row (in different blocks): dropped globally, f lowered."""
    n, f = 15, 3
    x = updates(n, f, np.float64, seed=9)
    x[n - 1, 3] = np.nan
    x[n - 2, 30] = np.inf
    check_same(get_rule(rule_spec(name, f)), x, sizes=[1, 7, D])
    for pre in ours(PRE_AGGREGATORS):  # a row that reads a non-finite one is non-finite
        check_same(get_rule(f"{pre_spec(pre, f)}+{rule_spec(name, f)}"), x, sizes=[7], rng=3)


def test_gram_accumulated_equals_in_memory() -> None:
    x = updates(10, 2, np.float64, seed=0)
    ref = np.linspace(-1, 1, D)
    z = np.vstack([x, ref])
    for size in SIZES:
        assert np.allclose(accumulate_gram(x, size, ref), z @ z.T, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("kind", ["memmap", "file"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_file_sources(tmp_path: Path, kind: str, dtype: type) -> None:
    """A read-only memmap and positioned file reads, each read twice (Gram, then rows)."""
    x = updates(13, 2, dtype, seed=2)
    path = tmp_path / "rows.bin"
    x.tofile(path)
    src: BlockSource = (
        open_memmap(path, x.shape, dtype) if kind == "memmap" else FileBlocks(path, x.shape, dtype)
    )
    assert np.array_equal(src.block(5, 18), x[:, 5:18])
    out: FloatArray = np.memmap(tmp_path / "out.bin", dtype=dtype, mode="w+", shape=(D,))  # type: ignore[assignment]
    for spec in ("nnm(f=2)+multikrum(f=2)", "trimmed_mean(f=2)", "bulyan(f=2)", "geomed"):
        rule = get_rule(spec)
        got = aggregate_blocks(rule, src, 7, out=out)
        assert got is out
        assert rel_err(np.asarray(rule(x)), out) <= TOL
    assert detect_blocks(src, 2, 7).flagged == detect(x, 2).flagged


class Counting(ArrayBlocks):
    """Counts the blocks read."""

    reads = 0

    def block(self, start: int, stop: int) -> FloatArray:
        self.reads += 1
        return super().block(start, stop)


@pytest.mark.parametrize(
    "spec,passes",
    [("trimmed_mean(f=1)", 1), ("median", 1), ("mean", 1), ("meamed(f=1)", 2), ("krum(f=1)", 2)],
)
def test_passes_over_the_blocks(spec: str, passes: int) -> None:
    """A coordinate-wise rule that drops nothing never reads the geometry: one pass."""
    src = Counting(updates(9, 1, np.float32, seed=0))
    list(iter_aggregate(spec, src, 10))
    assert src.reads == passes * len(list(spans(D, 10)))


def detection_updates(dup: bool) -> FloatArray:
    """20 clients: 14 honest, 6 attackers (sign-flipped and scaled, plus copies)."""
    rng = np.random.default_rng(5)
    honest = rng.normal(1.0, 1.0, size=(14, D)) + rng.normal(0, 0.5, size=(14, 1))
    bad = -2.0 * honest[:6] + rng.normal(0, 0.3, size=(6, D))
    if dup:
        bad[:3] = bad[0]
    return np.vstack([honest, bad])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("dup", [False, True], ids=["spread", "copies"])
def test_every_detection_statistic(dup: bool, dtype: type) -> None:
    x: FloatArray = detection_updates(dup).astype(dtype)
    ids = [f"c{i:02d}" for i in range(len(x))]
    want = detect(x, 6, ids=ids)
    for size in SIZES:
        got = detect_blocks(x, 6, size, ids=ids)
        assert (got.status, got.kept, got.flagged, got.reasons) == (
            want.status,
            want.kept,
            want.flagged,
            want.reasons,
        )
        keys = sorted(next(iter(want.scores.values())))
        assert sorted(next(iter(got.scores.values()))) == keys
        for k in keys:
            a = np.array([want.scores[c][k] for c in ids])
            b = np.array([got.scores[c][k] for c in ids])
            assert rel_err(a, b) <= TOL, f"{k} at block size {size}: {rel_err(a, b):.2e}"
    if not dup:
        assert "neighbourhood" in keys  # every statistic ran
    else:
        assert want.scores["c14"]["duplicate"] == 1.0


def test_detection_non_finite_and_insufficient() -> None:
    x = detection_updates(False)
    x[3, 5] = np.nan
    x[4, 40] = np.inf
    got, want = detect_blocks(x, 6, 7), detect(x, 6)
    assert (got.flagged, got.reasons) == (want.flagged, want.reasons)
    assert {"3", "4"} <= set(got.flagged) and "non_finite" in got.reasons["3"]
    small = x[:4]
    assert detect_blocks(small, 2, 7).status == detect(small, 2).status == "insufficient"


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "7"])
def test_bad_block_size(size: Any) -> None:
    x = updates(9, 1, np.float32, seed=0)
    with pytest.raises((ValueError, TypeError), match="block size"):
        aggregate_blocks("median", x, size)
    with pytest.raises((ValueError, TypeError), match="block size"):
        detect_blocks(x, 1, size)


def test_shape_mismatches(tmp_path: Path) -> None:
    x = updates(9, 1, np.float32, seed=0)
    with pytest.raises(ValueError, match="reference must have 41 entries"):
        aggregate_blocks("cc", x, 7, reference=np.zeros(D + 1))
    with pytest.raises(ValueError, match=r"reference must be \[1, 41\]"):
        aggregate_blocks("cc", x, 7, reference=ArrayBlocks(np.zeros((2, D))))
    with pytest.raises(ValueError, match=r"weights must have shape \[9\]"):
        aggregate_blocks("mean", x, 7, weights=np.ones(8))
    with pytest.raises(ValueError, match=r"out must have shape \(41,\)"):
        aggregate_blocks("mean", x, 7, out=np.empty(D - 1, np.float32))
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        ArrayBlocks(np.zeros(D, np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        ArrayBlocks(np.zeros((3, D), np.int64))
    with pytest.raises(TypeError, match="numpy array or memmap"):
        ArrayBlocks([[1.0]])  # type: ignore[arg-type]
    path = tmp_path / "rows.f32"
    x.tofile(path)
    with pytest.raises(ValueError, match="holds 1476 bytes, not the 1512 of 9 x 42 float32"):
        FileBlocks(path, (9, 42), "float32")
    with pytest.raises(ValueError, match="holds 1476 bytes, not the 2952 of 9 x 41 float64"):
        FileBlocks(path, (9, 41), "float64")
    with pytest.raises(TypeError, match="float32 or float64"):
        FileBlocks(path, (9, 41), "int32")
    with pytest.raises(ValueError, match=r"columns \[40, 42\) are not within \[0, 41\)"):
        FileBlocks(path, (9, 41), "float32").block(40, 42)
    with pytest.raises(ValueError, match="no weighted form"):
        aggregate_blocks("median", x, 7, weights=np.arange(1.0, 10.0))


class InMemoryOnly(Aggregator):
    name = "in_memory_only_for_blocks_test"

    def apply(self, x: FloatArray, w: Weights) -> FloatArray:
        out: FloatArray = x[0]
        return out


class ShiftPre(PreAggregator):
    name = "shift_pre_for_blocks_test"

    def transform(
        self, x: FloatArray, w: Weights, *, rng: Any = None
    ) -> tuple[FloatArray, Weights]:
        return x + 1.0, w


def test_a_rule_without_plan_is_refused_by_name() -> None:
    x = updates(9, 1, np.float32, seed=0)
    with pytest.raises(BlockwiseUnsupported, match="rule in_memory_only_for_blocks_test"):
        aggregate_blocks(InMemoryOnly(), x, 7)
    from qflare.robust import Chain

    with pytest.raises(BlockwiseUnsupported, match="pre-aggregator shift_pre_for_blocks_test"):
        aggregate_blocks(Chain([ShiftPre()], get_rule("mean")), x, 7)


@pytest.mark.parametrize("size", SIZES)
def test_tapped_columns_are_gathered_in_the_gram_pass(size: int) -> None:
    """TapColumns hands its blocks on unchanged and, after the one pass accumulate_gram
    makes, holds exactly the asked columns (unsorted, repeated, at block edges); before
    that pass it refuses to answer."""
    x = np.random.default_rng(5).standard_normal((6, D)).astype(np.float32)
    cols = [40, 0, 11, 12, 11, 6, 7]
    tap = TapColumns(x, cols)
    with pytest.raises(ValueError, match="not been read"):
        _ = tap.columns
    np.testing.assert_array_equal(accumulate_gram(tap, size), accumulate_gram(x, size))
    np.testing.assert_array_equal(tap.columns, x[:, cols])
    assert tap.columns.dtype == np.float32
    with pytest.raises(ValueError, match="lie in"):
        TapColumns(x, [D])
