"""The aggregator's block-wise round (``aggregate_blocks``) equals ``aggregate_rows`` bit for
bit, whatever the block size.

Both run the round's arithmetic on one column grid (core.GRID, the norms'
``NORM_CHUNK``): the block size only says how many columns are read at a time. Most cases
shrink the grid to 8 columns (both modules patched together) so that a model of a few dozen
values spans several grid chunks and block sizes straddle them; two cases run on the real
grid with a model wider than two of its chunks.
"""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qflare.messages.jobs import JobSpec
from qflare.messages.tensors import Layout
from qflare.privacy import AdaptiveClipping, PrivacyError, mechanism
from qflare.robust.blocks import ArrayBlocks, FileBlocks, open_memmap
from qflare.runtime.modelfile import ModelFile
from qflare.services.aggregator import core
from qflare.services.aggregator.core import (
    Aggregate,
    AggregationResult,
    aggregate_blocks,
    aggregate_matrix,
    aggregate_rows,
    aggregate_source,
)

SMALL_GRID = 8
# 2 + 3*4 + 27 = 41 values: five chunks of 8 and one of 1
BASE = {
    "a.bias": np.linspace(-1.0, 1.0, 2, dtype=np.float32),
    "b.weight": np.linspace(0.5, -0.5, 12, dtype=np.float32).reshape(3, 4),
    "c.weight": np.linspace(-0.2, 0.3, 27, dtype=np.float32).reshape(3, 9),
}
D = 41
N = 9
SIZES = [1, 7, 12, D, 100]  # 12 divides neither d nor the grid; 100 > d
RULES = [
    "mean",
    "trimmed_mean",
    "median",
    "multikrum",
    "nnm+multikrum",
    "geomed(T=5)",
    "cc(tau=1.0, L=3)",
    "bucketing(s=2)+mean",
    "clip(c=0.5)+krum",
]


@pytest.fixture
def small_grid(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(mechanism, "NORM_CHUNK", SMALL_GRID)
    monkeypatch.setattr(core, "GRID", SMALL_GRID)
    yield


def rows_of(n: int, d: int, seed: int) -> np.ndarray:
    """Rows of varied norms (some inside the clip, some far out) and one near-copy pair."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x *= np.geomspace(0.02, 3.0, n, dtype=np.float32)[:, None] / np.sqrt(d, dtype=np.float32)
    if n > 2:
        x[1] = x[0] + np.float32(1e-4)
    return x


def clients(n: int) -> list[str]:
    return [f"c{i:02d}" for i in range(n)]


def arithmetic(rule: str, dp: bool, adaptive: bool) -> dict[str, Any]:
    return {
        "job": "job-blocks",
        "round_no": 3,
        "seed": 1234,
        "rule": rule,
        "f": 2,
        "clip": 0.3,
        "noise_multiplier": 0.8 if dp else 0.0,
        "expected_clients": 7.5,
        "server_lr": 0.7,
        "adaptive": AdaptiveClipping(count_noise_std=1.0) if adaptive else None,
    }


def assert_same(got: AggregationResult, want: AggregationResult) -> None:
    assert got.kept == want.kept
    assert got.next_clip.hex() == want.next_clip.hex()
    assert got.update_norm.hex() == want.update_norm.hex()
    assert sorted(got.model) == sorted(want.model)
    for name, tensor in want.model.items():
        assert got.model[name].dtype == tensor.dtype and got.model[name].shape == tensor.shape
        assert got.model[name].tobytes() == tensor.tobytes(), name


def in_memory(base: dict[str, np.ndarray], x: np.ndarray, **kw: Any) -> AggregationResult:
    return aggregate_rows(base=base, clients=clients(len(x)), rows=x.copy(), **kw)


@pytest.mark.usefixtures("small_grid")
@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("dp", [False, True], ids=["dp-off", "dp-on"])
@pytest.mark.parametrize("rule", RULES)
def test_every_block_size_gives_the_in_memory_model(rule: str, dp: bool, adaptive: bool) -> None:
    x = rows_of(N, D, seed=7)
    kw = arithmetic(rule, dp, adaptive)
    want = in_memory(BASE, x, **kw)
    assert not np.array_equal(want.model["c.weight"], BASE["c.weight"])
    for size in SIZES:
        got = aggregate_blocks(base=BASE, clients=clients(N), rows=x, block=size, **kw)
        assert_same(got, want)
    np.testing.assert_array_equal(x, rows_of(N, D, seed=7))  # the rows were not clipped


@pytest.mark.usefixtures("small_grid")
@pytest.mark.parametrize("rule", ["trimmed_mean", "nnm+multikrum", "geomed(T=5)"])
def test_memmap_and_file_rows_give_the_in_memory_model(rule: str, tmp_path: Path) -> None:
    x = rows_of(N, D, seed=8)
    path = tmp_path / "rows.f32"
    x.tofile(path)
    kw = arithmetic(rule, dp=True, adaptive=True)
    want = in_memory(BASE, x, **kw)
    for size in (1, 7, D + 1):
        for rows in (
            np.memmap(path, dtype=np.float32, mode="r", shape=(N, D)),  # read-only
            open_memmap(path, (N, D)),
            FileBlocks(path, (N, D)),
        ):
            got = aggregate_blocks(base=BASE, clients=clients(N), rows=rows, block=size, **kw)
            assert_same(got, want)


@pytest.mark.usefixtures("small_grid")
@pytest.mark.parametrize("rule", ["mean", "trimmed_mean", "multikrum"])
@pytest.mark.parametrize("dp", [False, True], ids=["dp-off", "dp-on"])
def test_a_model_read_from_and_written_to_files_is_the_in_memory_model(
    rule: str, dp: bool, tmp_path: Path
) -> None:
    """Base model read from its file, the new model written into one and the combined
    vector kept in a scratch file (a model too large to hold): the same bits."""
    x = rows_of(N, D, seed=9)
    kw = arithmetic(rule, dp=dp, adaptive=dp)
    want = in_memory(BASE, x, **kw)
    base = ModelFile.write(tmp_path / "base.safetensors", BASE)
    for size in (1, 7, D + 1):
        out = ModelFile.create(tmp_path / f"new{size}.safetensors", Layout.of(BASE))
        scratch = ModelFile.create(
            tmp_path / f"scratch{size}", Layout(("v",), ((D,),), ("float32",))
        )
        got = aggregate_blocks(
            base=base,
            clients=clients(N),
            rows=FileBlocks(_rows_file(tmp_path, x), (N, D)),
            block=size,
            out=out,
            scratch=scratch,
            **kw,
        )
        scratch.discard()
        assert got.model == {}
        out.commit()
        with ModelFile.open(out.path) as f:
            assert_same(
                AggregationResult(f.tensors(), got.kept, got.update_norm, got.next_clip), want
            )
        out.close()
    base.close()


def _rows_file(folder: Path, x: np.ndarray) -> Path:
    path = folder / "rows.f32"
    x.tofile(path)
    return path


@pytest.mark.usefixtures("small_grid")
def test_one_row_and_no_rows() -> None:
    kw = arithmetic("multikrum", dp=True, adaptive=True)
    x = rows_of(1, D, seed=9) * np.float32(40)  # far outside the clip
    want = in_memory(BASE, x, **kw)
    for size in SIZES:
        assert_same(aggregate_blocks(base=BASE, clients=["c00"], rows=x, block=size, **kw), want)
    none = aggregate_rows(base=BASE, clients=[], rows=np.empty((0, D), np.float32), **kw)
    for rows in (None, np.empty((0, D), np.float32)):
        assert_same(aggregate_blocks(base=BASE, clients=[], rows=rows, block=5, **kw), none)


@pytest.mark.usefixtures("small_grid")
def test_float64_base_and_float64_rows() -> None:
    base = {k: v.astype(np.float64) for k, v in BASE.items()}
    x = rows_of(N, D, seed=10).astype(np.float64)
    kw = arithmetic("median", dp=True, adaptive=False)
    want = in_memory(base, x, **kw)
    for size in SIZES:
        assert_same(aggregate_blocks(base=base, clients=clients(N), rows=x, block=size, **kw), want)


@pytest.mark.parametrize(
    ("rule", "sizes"),
    [("mean", [1000, 65536, 70001]), ("nnm+multikrum", [65536 + 1, 3 * 65536])],
)
def test_the_real_grid(rule: str, sizes: list[int]) -> None:
    """A model of two full grid chunks and a narrow third (131075 values)."""
    assert core.GRID == mechanism.NORM_CHUNK == 65536
    d = 2 * 65536 + 3
    base = {"w": np.linspace(-1.0, 1.0, d, dtype=np.float32)}
    x = rows_of(7, d, seed=11)
    kw = arithmetic(rule, dp=True, adaptive=True)
    want = in_memory(base, x, **kw)
    for size in sizes:
        got = aggregate_blocks(base=base, clients=clients(7), rows=x, block=size, **kw)
        assert_same(got, want)


def test_a_norm_does_not_depend_on_how_its_row_is_read() -> None:
    """l2_norm (clip_rows, the combined vector, the step) from the chunk sums of a
    [n, w] block: the same bits as the row's own norm, per row of any n."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((5, 3 * mechanism.NORM_CHUNK + 17)).astype(np.float32)
    grid = range(0, x.shape[1], mechanism.NORM_CHUNK)
    sums = np.stack([mechanism.square_sums(x[:, a : a + mechanism.NORM_CHUNK]) for a in grid])
    for i in range(len(x)):
        assert mechanism.norm_of_sums(sums[:, i]) == mechanism.l2_norm(x[i])
    short = x[0, :1000]  # one chunk: the plain pairwise sum
    assert mechanism.l2_norm(short) == float(np.sqrt(np.add.reduce(short.astype(np.float64) ** 2)))


@pytest.mark.usefixtures("small_grid")
@pytest.mark.parametrize("size", [0, -3, True, 2.5, "8"])
def test_a_bad_block_size_is_refused(size: Any) -> None:
    x = rows_of(N, D, seed=13)
    with pytest.raises(ValueError, match="block size"):
        aggregate_blocks(
            base=BASE, clients=clients(N), rows=x, block=size, **arithmetic("mean", True, False)
        )


@pytest.mark.usefixtures("small_grid")
@pytest.mark.parametrize(
    ("n_clients", "shape"),
    [(N, (N, D - 1)), (N, (N, D + 1)), (N, (N - 1, D)), (N - 1, (N, D)), (0, (2, D))],
    ids=["too-narrow", "too-wide", "too-few-rows", "too-many-rows", "rows-but-no-clients"],
)
def test_rows_that_do_not_match_the_layout_are_refused(
    n_clients: int, shape: tuple[int, int]
) -> None:
    x = np.zeros(shape, dtype=np.float32)
    kw = arithmetic("mean", True, False)
    for rows in (x, ArrayBlocks(x)):
        with pytest.raises(ValueError, match="rows"):
            aggregate_blocks(base=BASE, clients=clients(n_clients), rows=rows, block=4, **kw)
    with pytest.raises(ValueError, match="rows"):
        aggregate_blocks(base=BASE, clients=clients(N), rows=None, block=4, **kw)


@pytest.mark.usefixtures("small_grid")
def test_other_bad_rows_are_refused_as_aggregate_rows_refuses_them() -> None:
    x = rows_of(N, D, seed=14)
    kw = arithmetic("mean", True, False)
    with pytest.raises(ValueError, match="client-id order"):
        aggregate_blocks(base=BASE, clients=clients(N)[::-1], rows=x, block=4, **kw)
    with pytest.raises(TypeError, match="float32 or float64"):
        aggregate_blocks(base=BASE, clients=clients(N), rows=x.astype(np.float16), block=4, **kw)
    bad = x.copy()
    bad[4, 30] = np.nan
    for call in (aggregate_rows, aggregate_blocks):
        extra = {"block": 4} if call is aggregate_blocks else {}
        with pytest.raises(PrivacyError, match="update 4 has non-finite values"):
            call(base=BASE, clients=clients(N), rows=bad.copy(), **kw, **extra)


def test_noise_drawn_chunk_by_chunk_is_the_noise_drawn_at_once() -> None:
    """Release.step over chunks, each drawing its own noise from the source: the vector
    Release.step gives in one call (NumPy's normal draws of sizes a and b are its draw of
    size a + b)."""
    release = mechanism.Release.of(
        5, clip=0.3, noise_multiplier=0.8, expected_clients=7.5, adaptive=None
    )
    combined = np.random.default_rng(15).standard_normal(1001)
    whole = release.step(combined, len(combined), mechanism.NoiseSource(99))
    noise = mechanism.NoiseSource(99)
    cuts = [0, 1, 8, 500, 501, 1001]
    parts = [release.step(combined[a:b], b - a, noise) for a, b in itertools.pairwise(cuts)]
    assert np.concatenate(parts).tobytes() == whole.tobytes()


def test_nothing_of_n_by_d_is_held(tmp_path: Path) -> None:
    """Rows read from a file in small blocks: the peak of NumPy's allocations stays at a
    fraction of the rows' bytes (the combined vector and the model are d values each)."""
    n, d = 16, 1_200_000
    path = tmp_path / "rows.f32"
    with path.open("wb") as fh:
        for i in range(n):
            rows_of(1, d, seed=100 + i).tofile(fh)
    base = {"w": np.zeros(d, np.float32)}
    kw = arithmetic("nnm+multikrum", dp=True, adaptive=False)
    tracemalloc.start()
    try:
        aggregate_blocks(
            base=base, clients=clients(n), rows=FileBlocks(path, (n, d)), block=4096, **kw
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n * d * 4 / 3, f"peak {peak} bytes for {n * d * 4} bytes of rows"


@pytest.mark.usefixtures("small_grid")
@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_a_jobs_round_from_a_source_is_its_round_from_the_matrix(adaptive: bool) -> None:
    """aggregate_source (the job's settings, as aggregate_matrix takes them) over a model
    of float16, float32 and float64 tensors."""
    base = {
        "h": np.linspace(-1, 1, 10, dtype=np.float16),
        "s": np.ones((2, 5), np.float32),
        "w": np.linspace(0, 1, 21, dtype=np.float64).reshape(3, 7),
    }
    everyone = tuple(f"c{i:03d}" for i in range(12))
    spec = JobSpec.model_validate(
        {
            "job_id": "j",
            "rounds": 5,
            "participants": everyone,
            "rule": "trimmed_mean",
            "f": 2,
            "detection": False,
            "noise_multiplier": 1.0,
            "clip": 1.5,
            "seed": 99,
            "adaptive_clip": adaptive,
        }
    )
    kept = list(everyone[:N])
    refs = tuple((c, c.encode(), i) for i, c in enumerate(kept))
    cmd = Aggregate(3, 2, tuple(kept), (), refs, 1.2, population=len(everyone))
    x = rows_of(N, D, seed=16) * np.float32(5)
    want = aggregate_matrix(spec, cmd, base, kept, x.copy())
    for size in SIZES:
        assert_same(aggregate_source(spec, cmd, base, kept, x, size), want)
    with pytest.raises(ValueError, match="the round keeps"):
        aggregate_source(spec, cmd, base, kept[:-1], x[:-1], 4)


def test_no_read_is_wider_than_the_block() -> None:
    """The source is asked for blocks of at most ``block`` columns, each of them once per
    pass (norms, Gram matrix, rule)."""
    x = rows_of(N, 3 * 65536 + 5, seed=17)
    widths: list[int] = []

    class Counted(ArrayBlocks):
        def block(self, start: int, stop: int) -> np.ndarray:
            widths.append(stop - start)
            return super().block(start, stop)

    base = {"w": np.zeros(x.shape[1], np.float32)}
    kw = arithmetic("multikrum", dp=True, adaptive=False)
    aggregate_blocks(base=base, clients=clients(N), rows=Counted(x), block=50_000, **kw)
    assert max(widths) == 50_000 and sum(widths) == 3 * x.shape[1]


def test_a_plugin_rule_without_a_blockwise_form_runs_in_memory_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plug-in rule as a user writes one (``apply`` only): the in-memory round runs it as
    written (the job works as before); the block-wise round refuses it by name
    (BlockwiseUnsupported), never a different model."""
    from qflare.robust import RULES, Aggregator, BlockwiseUnsupported, has_blockwise_form

    class MeanOfMedianAndMean(Aggregator):
        name = "test_no_plan_rule"

        def apply(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
            return (np.median(x, axis=0) + x.mean(axis=0)) / 2

    monkeypatch.setitem(RULES, MeanOfMedianAndMean.name, MeanOfMedianAndMean)
    rule = MeanOfMedianAndMean()
    assert not has_blockwise_form(rule)
    x = rows_of(N, D, seed=3)
    kw = arithmetic("test_no_plan_rule", dp=False, adaptive=False)
    got = in_memory(BASE, x, **kw)
    assert_same(in_memory(BASE, x, **kw), got)  # as written, deterministic
    for other in ("mean", "median"):  # its own arithmetic, not a built-in's
        built_in = in_memory(BASE, x, **{**kw, "rule": other})
        assert not np.array_equal(built_in.model["c.weight"], got.model["c.weight"])
    with pytest.raises(BlockwiseUnsupported, match="test_no_plan_rule"):
        aggregate_blocks(base=BASE, clients=clients(N), rows=x, block=7, **kw)
