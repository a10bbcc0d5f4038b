"""qflare.robust against ByzFL 0.0.11 and Flower 1.42 on random inputs.

Convention differences, written down where they matter:
- Krum: ByzFL's Krum(f) scores with n - f - 1 neighbours, Flower's aggregate_krum(m) with
  n - m - 2, so ours (ByzFL's) with f equals Flower's with m = f - 1; Multi-Krum keeps
  n - f, which is Flower's to_keep.
- Trimmed mean: ours and ByzFL drop f per side; Flower drops int(p * n), p = (f + .5) / n.
- Bulyan: ByzFL has none; Flower's Krum inside uses n' - f - 2 neighbours, reproduced by
  ``bulyan(x, f, neighbour_offset=2)`` (the registered rule uses ByzFL's n' - f - 1).
- Centered clipping: ByzFL keeps its last output as the next reference; ours takes it as
  ``reference=``. ByzFL's Clipping and ARC rescale their input in place; ours do not.
- CAF and SMEA: ByzFL estimates the top eigenvalue with one power iteration from a
  random start; ours is exact. They coincide in d = 1, where that estimate is exact.
  CAF's tau_max: ours over the updates still weighted (ends within n passes), ByzFL's over
  all; ``caf(x, f, tau_over="all")`` reproduces ByzFL.
- Bucketing: ByzFL shuffles with np.random; ours takes the permutation explicitly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qflare.robust import get_rule
from qflare.robust.pre.bucketing import Bucketing
from qflare.robust.rules.bulyan import bulyan
from qflare.robust.rules.caf import caf

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import peers

byzfl = peers.load_byzfl()
flwr = peers.load_flwr_aggregate()

SHAPES = [(7, 5), (10, 40), (15, 200), (24, 64)]


def data(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Honest cloud plus a few far rows, so that selections are decisive.
    x = rng.normal(size=(n, d)) + rng.normal(size=d)
    x[: max(1, n // 5)] += rng.normal(scale=5.0, size=(max(1, n // 5), d))
    return x.astype(np.float32)


def fl(x: np.ndarray, counts: np.ndarray | None = None) -> list:
    counts = np.ones(len(x), int) if counts is None else counts
    return [([row.astype(np.float64)], int(c)) for row, c in zip(x, counts, strict=True)]


def close(a, b, tol: float = 2e-5) -> None:
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=tol, atol=tol)


def f_of(n: int) -> int:
    return max(1, (n - 1) // 4)


@pytest.mark.parametrize("n,d", SHAPES)
def test_mean_median_trimmed(n: int, d: int) -> None:
    x = data(n, d, n * d)
    f = f_of(n)
    close(get_rule("mean")(x), byzfl.Average()(x.copy()))
    close(get_rule("median")(x), byzfl.Median()(x.copy()))
    close(get_rule("median")(x), flwr.aggregate_median(fl(x))[0])
    close(get_rule(f"trimmed_mean(f={f})")(x), byzfl.TrMean(f)(x.copy()))
    close(get_rule(f"trimmed_mean(f={f})")(x), flwr.aggregate_trimmed_avg(fl(x), (f + 0.5) / n)[0])
    counts = np.arange(1, n + 1)
    close(get_rule("mean")(x, counts), flwr.aggregate(fl(x, counts))[0])


@pytest.mark.parametrize("n,d", SHAPES)
def test_krum_family(n: int, d: int) -> None:
    x = data(n, d, n + d)
    f = f_of(n)
    ours = get_rule(f"krum(f={f})")(x)
    close(ours, byzfl.Krum(f)(x.copy()))
    close(ours, flwr.aggregate_krum(fl(x), f - 1, 0)[0])
    mk = get_rule(f"multikrum(f={f})")(x)
    close(mk, byzfl.MultiKrum(f)(x.copy()))
    close(mk, flwr.aggregate_krum(fl(x), f - 1, n - f)[0])


@pytest.mark.parametrize("n,d", [(7, 5), (11, 40), (15, 200)])
def test_bulyan_against_flower(n: int, d: int) -> None:
    x = data(n, d, 3 * n + d)
    f = (n - 3) // 4
    close(
        bulyan(x, f, neighbour_offset=2),
        flwr.aggregate_bulyan(fl(x), f, flwr.aggregate_krum, to_keep=0)[0],
    )


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("T", [0, 1, 3, 8])
def test_geomed(n: int, d: int, T: int) -> None:
    x = data(n, d, n * T + d)
    close(get_rule(f"geomed(nu=0.1, T={T})")(x), byzfl.GeometricMedian(nu=0.1, T=T)(x.copy()), 1e-4)


@pytest.mark.parametrize("n,d", SHAPES)
def test_centered_clipping_two_rounds(n: int, d: int) -> None:
    x1, x2 = data(n, d, 1), data(n, d, 2)
    peer = byzfl.CenteredClipping(L=3, tau=2.0)
    rule = get_rule("cc(tau=2.0, L=3)")
    first = rule(x1)
    close(first, peer(x1.copy()), 1e-4)
    close(rule(x2, reference=first), peer(x2.copy()), 1e-4)


@pytest.mark.parametrize("n,d", [(7, 5), (10, 40), (12, 64)])
def test_subset_rules(n: int, d: int) -> None:
    x = data(n, d, 5 * n + d)
    f = f_of(n)
    close(get_rule(f"mda(f={f})")(x), byzfl.MDA(f)(x.copy()))
    for idx in (0, n - 1):
        close(get_rule(f"monna(f={f}, idx={idx})")(x), byzfl.MoNNA(f, idx)(x.copy()))
    close(get_rule(f"meamed(f={f})")(x), byzfl.Meamed(f)(x.copy()))


@pytest.mark.parametrize("n", [7, 10, 13])
def test_caf_smea_in_one_dimension(n: int) -> None:
    x = data(n, 1, n)
    f = f_of(n)
    close(caf(x, f, tau_over="all"), byzfl.CAF(f)(x.astype(np.float64)), 1e-4)
    close(get_rule(f"smea(f={f})")(x), byzfl.SMEA(f)(x.astype(np.float64)), 1e-5)


@pytest.mark.parametrize("n,d", SHAPES)
def test_pre_aggregators(n: int, d: int) -> None:
    x = data(n, d, 7 * n + d)
    f = f_of(n)
    ours, _ = get_rule(f"nnm(f={f})+mean").pres[0](x)
    close(ours, byzfl.NNM(f)(x.copy()))
    for s in (1, 2, 3):
        np.random.seed(s)
        theirs = byzfl.Bucketing(s)(x.copy())
        np.random.seed(s)
        perm = np.random.permutation(n)
        mine, _ = Bucketing(s).transform(x, None, perm=perm)
        close(mine, theirs)
    c = float(np.median(np.linalg.norm(x, axis=1)))
    peer_in = x.copy()
    clipped = byzfl.Clipping(c)(peer_in)
    before = x.copy()
    mine, _ = get_rule(f"clip(c={c})+mean").pres[0](x)
    close(mine, clipped)
    assert not np.array_equal(peer_in, before), "ByzFL's Clipping no longer works in place"
    np.testing.assert_array_equal(x, before)
    peer_in = x.copy()
    arc = byzfl.ARC(f)(peer_in)
    mine, _ = get_rule(f"arc(f={f})+mean").pres[0](x)
    close(mine, arc)
    np.testing.assert_array_equal(x, before)


def test_torch_inputs_match_numpy_and_peer() -> None:
    x = data(12, 30, 9)
    t = torch.from_numpy(x.copy())
    for spec, peer in [
        ("median", byzfl.Median()),
        ("krum(f=2)", byzfl.Krum(2)),
        ("trimmed_mean(f=2)", byzfl.TrMean(2)),
        ("meamed(f=2)", byzfl.Meamed(2)),
    ]:
        out = get_rule(spec)(t)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        close(out, get_rule(spec)(x))
        close(out, peer(t.clone()))
