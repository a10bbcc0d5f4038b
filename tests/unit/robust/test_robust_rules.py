"""Hand-computed cases for every rule and pre-aggregator, requirement errors, purity."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from qflare.robust import PRE_AGGREGATORS, RULES, Chain, get_rule, list_rules
from qflare.robust.pre.bucketing import Bucketing

# Five points in the plane, the last far away. Squared distances (worked by hand):
#   p0=(0,0) p1=(1,0) p2=(0,2) p3=(1,1) p4=(10,10)
#   Krum(f=1) scores, 3 nearest: p0 1+2+4=7, p1 1+1+5=7, p2 2+4+5=11, p3 1+2+2=5, p4 large
X = np.array([[0, 0], [1, 0], [0, 2], [1, 1], [10, 10]], dtype=np.float32)
MEAN_P0_P3 = [0.5, 0.75]
R2 = math.sqrt(2.0)

HAND = [
    ("mean", X, [12 / 5, 13 / 5]),
    ("median", X, [1.0, 1.0]),
    ("trimmed_mean(f=1)", X, [2 / 3, 1.0]),  # col0 {0,1,1}, col1 {0,1,2}
    ("krum(f=1)", X, [1.0, 1.0]),  # p3 has the lowest score, 5
    ("multikrum(f=1)", X, MEAN_P0_P3),  # the four lowest: p3, p0, p1, p2
    ("mda(f=1)", X, MEAN_P0_P3),  # diameter^2 5 without p4
    ("smea(f=1)", X, MEAN_P0_P3),
    ("monna(f=1, idx=0)", X, MEAN_P0_P3),  # 4 nearest p0, itself included
    ("monna(f=1, idx=4)", X, [3.0, 3.25]),  # p4, p3, p2, p1
    ("meamed(f=1)", X, MEAN_P0_P3),  # col0 median 1 -> {0,1,0,1}; col1 1 -> {0,0,2,1}
    # Weiszfeld, one step from the origin: weights 1/max(0.1, |x_i|) = 10, 1, 1/2, 1/sqrt2, 1/sqrt200
    (
        "geomed(nu=0.1, T=1)",
        X,
        [
            (1 + 1 / R2 + 10 / math.sqrt(200)) / (10 + 1 + 0.5 + 1 / R2 + 1 / math.sqrt(200)),
            (1 + 1 / R2 + 10 / math.sqrt(200)) / (10 + 1 + 0.5 + 1 / R2 + 1 / math.sqrt(200)),
        ],
    ),
    # Clipped to norm 1 around the origin: p0, p1, p2/2, p3/sqrt2, p4/sqrt200
    (
        "cc(tau=1.0, L=1)",
        X,
        [(1 + 1 / R2 + 10 / math.sqrt(200)) / 5, (1 + 1 / R2 + 10 / math.sqrt(200)) / 5],
    ),
    # 1-D: Krum picks 2, 3, 1, 4, 0 (ties to the first); beta = 3 nearest the median 2
    ("bulyan(f=1)", np.array([[0], [1], [2], [3], [4], [5], [100]], np.float32), [2.0]),
    # 1-D [0, 2, 10], f=1: pass 1 mean 4 (variance 56/3); weights 5/9, 8/9, 0; pass 2 mean
    # 16/13 with variance below 1, then p1 keeps weight alone: 16/13 is returned.
    ("caf(f=1)", np.array([[0], [2], [10]], np.float32), [16 / 13]),
    # SMEA over pairs of [0, 2, 10]: scatter 2, 50, 32 -> {0, 2}
    ("smea(f=1)", np.array([[0], [2], [10]], np.float32), [1.0]),
]


@pytest.mark.parametrize("spec,x,expected", HAND, ids=[h[0] for h in HAND])
def test_hand_computed(spec: str, x: np.ndarray, expected: list[float]) -> None:
    out = get_rule(spec)(x)
    assert out.dtype == np.float32 and out.shape == (x.shape[1],)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_weighted_mean_and_zero_weight() -> None:
    np.testing.assert_allclose(get_rule("mean")(X, [1, 1, 1, 1, 0]), [0.5, 0.75])
    np.testing.assert_allclose(get_rule("multikrum(f=1)")(X, [1, 1, 1, 3, 5]), [4 / 6, 5 / 6])


def test_cc_reference_is_an_argument() -> None:
    rule = get_rule("cc(tau=1.0)")
    ref = np.array([1, 1], np.float32)
    # Around (1,1): differences p0 (-1,-1)->/sqrt2, p1 (0,-1), p2 (-1,1)->/sqrt2, p3 0, p4 clipped
    d = np.array([[-1 / R2, -1 / R2], [0, -1], [-1 / R2, 1 / R2], [0, 0], [1 / R2, 1 / R2]])
    np.testing.assert_allclose(rule(X, reference=ref), ref + d.mean(0), rtol=1e-5)
    np.testing.assert_array_equal(rule(X), rule(X))  # no state kept between calls


def test_pre_aggregators_by_hand() -> None:
    nnm, _ = get_rule("nnm(f=1)+mean").pres[0](X)
    np.testing.assert_allclose(nnm, [MEAN_P0_P3] * 4 + [[3.0, 3.25]], rtol=1e-6)
    out, w = Bucketing(2).transform(X, np.arange(1.0, 6.0), perm=np.array([4, 0, 1, 2, 3]))
    np.testing.assert_allclose(out, [[5, 5], [0.5, 1], [1, 1]])
    np.testing.assert_allclose(w, [6, 5, 4])
    clip, _ = get_rule("clip(c=1.0)+mean").pres[0](X)
    np.testing.assert_allclose(
        clip, [[0, 0], [1, 0], [0, 1], [1 / R2, 1 / R2], [1 / R2, 1 / R2]], rtol=1e-6
    )
    # ARC f=1, n=5: floor(2 * 1 / 5 * 4) = 1 clipped, to the next norm, 2
    arc, _ = get_rule("arc(f=1)+mean").pres[0](X)
    np.testing.assert_allclose(arc, [[0, 0], [1, 0], [0, 2], [1, 1], [R2, R2]], rtol=1e-6)


def test_chain_and_config_forms_build_the_same() -> None:
    x = np.random.default_rng(0).normal(size=(12, 30)).astype(np.float32)
    a = get_rule("nnm(f=3)+multikrum(f=3)")
    b = get_rule({"rule": "multikrum", "f": 3, "pre": [{"name": "nnm", "f": 3}]})
    c = get_rule(["nnm(f=3)", {"name": "multikrum", "f": 3}])
    d = get_rule("nnm+multikrum", f=3)
    e = get_rule("nnm+multikrum(f=3)")  # the pre-aggregator inherits the rule's f
    assert isinstance(a, Chain)
    assert repr(a) == repr(b) == repr(c) == repr(d) == repr(e) == "nnm(f=3)+multikrum(f=3)"
    assert repr(get_rule("nnm(f=1)+multikrum(f=3)")) == "nnm(f=1)+multikrum(f=3)"
    for r in (b, c, d, e):
        np.testing.assert_array_equal(a(x), r(x))
    np.testing.assert_array_equal(
        get_rule("bucketing(s=2)+cc(f=2,tau=1.0)")(x, rng=7),
        get_rule("bucketing(s=2)+cc(f=2,tau=1.0)")(x, rng=7),
    )
    assert get_rule("clip(c=1.0)+krum(f=2)")(x).shape == (30,)
    assert set(list_rules()["rules"]) == set(RULES) and "nnm" in list_rules()["pre"]


ALL_SPECS = [
    "mean",
    "median",
    "trimmed_mean(f=2)",
    "krum(f=2)",
    "multikrum(f=2)",
    "geomed",
    "cc(tau=1.0)",
    "bulyan(f=2)",
    "mda(f=2)",
    "monna(f=2)",
    "meamed(f=2)",
    "caf(f=2)",
    "smea(f=2)",
    "nnm(f=2)+mean",
    "bucketing(s=2)+mean",
    "clip(c=1.0)+mean",
    "arc(f=2)+mean",
]


def test_every_registered_name_is_exercised() -> None:
    names = {s.split("(")[0].split("+")[0] for s in ALL_SPECS}
    assert set(RULES) | set(PRE_AGGREGATORS) <= names


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_input_untouched_kind_kept(spec: str) -> None:
    x = np.random.default_rng(1).normal(size=(11, 17)).astype(np.float32)
    x[3] *= 50
    before = x.copy()
    t = torch.from_numpy(x.copy())
    tb = t.clone()
    out_np = get_rule(spec)(x, rng=3)
    out_t = get_rule(spec)(t, rng=3)
    np.testing.assert_array_equal(x, before)
    assert torch.equal(t, tb)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32 and out_np.shape == (17,)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_allclose(out_t.numpy(), out_np, rtol=1e-5, atol=1e-6)
    out64 = get_rule(spec)(x.astype(np.float64), rng=3)
    assert out64.dtype == np.float64


@pytest.mark.parametrize(
    "spec,n,message",
    [
        ("trimmed_mean(f=3)", 6, "n > 2f, got n=6, f=3"),
        ("krum(f=3)", 6, "n > 2f, got n=6, f=3"),
        ("multikrum(f=5)", 9, "n > 2f, got n=9, f=5"),
        ("bulyan(f=2)", 10, "n >= 4f + 3, got n=10, f=2 (4f + 3 = 11)"),
        ("mda(f=2)", 4, "n > 2f, got n=4, f=2"),
        (
            "mda(f=8, max_subsets=1000)",
            30,
            "C(n=30, n-f=22) = 5852925 subsets exceeds max_subsets=1000",
        ),
        ("smea(f=1)", 2, "n > 2f, got n=2, f=1"),
        ("monna(f=1, idx=7)", 5, "idx < n, got idx=7, n=5"),
        ("meamed(f=2)", 4, "n > 2f, got n=4, f=2"),
        ("caf(f=2)", 4, "n > 2f, got n=4, f=2"),
        ("nnm(f=5)+mean", 5, "f < n, got f=5, n=5"),
        ("arc(f=6)+mean", 5, "f <= n, got f=6, n=5"),
    ],
)
def test_requirements_checked_at_call(spec: str, n: int, message: str) -> None:
    rule = get_rule(spec)
    with pytest.raises(ValueError, match=re.escape(message)):
        rule(np.zeros((n, 3), np.float32))


@pytest.mark.parametrize(
    "spec,exc,message",
    [
        ("krum(f=-1)", ValueError, "f must be >= 0, got -1"),
        ("krum(f=1.5)", TypeError, "f must be an int, got 1.5"),
        ("krum(f=True)", TypeError, "f must be an int"),
        ("geomed(nu=0.0)", ValueError, "nu must be finite and > 0.0, got 0.0"),
        ("cc(tau=-1.0)", ValueError, "tau must be finite and >= 0.0, got -1.0"),
        ("bucketing(s=0)+mean", ValueError, "s must be >= 1, got 0"),
        ("clip(c='big')+mean", TypeError, "c must be a number, got 'big'"),
        ("krum(beta=2)", TypeError, "krum takes no parameter 'beta'"),
        ("nosuch", ValueError, "unknown rule 'nosuch'"),
        ("median+nnm(f=1)", ValueError, "rules go last"),
        ("krum(2)", ValueError, "must be named"),
        ("krum(f=", ValueError, "cannot parse"),
        ("", ValueError, "empty rule spec"),
    ],
)
def test_hyperparameters_checked_at_construction(spec: str, exc: type, message: str) -> None:
    with pytest.raises(exc, match=re.escape(message)):
        get_rule(spec)


def test_bad_inputs() -> None:
    rule = get_rule("median")
    with pytest.raises(ValueError, match=r"shape \[n, d\], got shape \(3,\)"):
        rule(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="float32 or float64, got int64"):
        rule(np.zeros((3, 2), np.int64))
    with pytest.raises(TypeError, match="numpy array or torch tensor, got list"):
        rule([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"weights must have shape \[5\]"):
        get_rule("mean")(X, [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        get_rule("mean")(X, [1, 1, 1, 1, -1])
    with pytest.raises(ValueError, match="median has no weighted form"):
        rule(X, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(rule(X, [2, 2, 2, 2, 2]), rule(X))
    with pytest.raises(ValueError, match="reference must have 2 entries"):
        get_rule("cc")(X, reference=np.zeros(3, np.float32))


@pytest.mark.parametrize(
    "spec",
    [
        "krum(f=2)",
        "multikrum(f=2)",
        "mda(f=2)",
        "meamed(f=2)",
        "caf(f=2)",
        "bulyan(f=2)",
        "geomed",
        "monna(f=2)",
        "median",
        "trimmed_mean(f=2)",
    ],
)
def test_non_finite_updates_count_against_f(spec: str) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(11, 6)).astype(np.float32)
    x[7] = np.inf
    x[9, 2] = np.nan
    out = get_rule(spec)(x)
    assert np.all(np.isfinite(out))
    if spec.split("(")[0] in ("krum", "multikrum", "mda", "meamed", "caf", "bulyan"):
        with pytest.raises(ValueError, match="3 updates are non-finite but f=2"):
            x[1, 0] = -np.inf
            get_rule(spec)(x)


@pytest.mark.parametrize(
    "spec",
    [
        "krum(f=2)",
        "multikrum(f=2)",
        "mda(f=2)",
        "smea(f=2)",
        "caf(f=2)",
        "bulyan(f=2)",
        "geomed",
        "monna(f=2)",
        "meamed(f=2)",
        "cc(tau=1.0)",
        "nnm(f=2)+mean",
    ],
)
def test_update_whose_squared_norm_overflows_counts_as_non_finite(spec: str) -> None:
    # Entries near 1e20 are finite float32, but the squared norm is not: it used to turn
    # the geometric median into NaN and stop CAF's and SMEA's eigensolvers.
    x = np.random.default_rng(6).normal(size=(11, 6)).astype(np.float32)
    x[4] = 1e20
    out = get_rule(spec)(x)
    assert np.all(np.isfinite(out))
    assert np.max(np.abs(out)) < 10
