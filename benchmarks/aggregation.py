"""Time every qflare.robust rule against a vectorised floor and the peers (ByzFL, Flower).

    python benchmarks/aggregation.py                      # all four sizes, 3 repeats
    python benchmarks/aggregation.py --sizes 50x1000000 --rules krum,median --repeats 5
    python benchmarks/aggregation.py --detection-only

For each (n, d) with f = floor(0.2 n), float32 Gaussian updates: the best of ``--repeats``
wall times of ours, of a plain vectorised NumPy floor (the same maths written the
shortest fast way: Gram-matrix distances, a sort along axis 0), of ByzFL 0.0.11 (NumPy
and torch inputs, the faster counts) and of Flower 1.42's aggregate.py where it has the
rule. Printed: ours / floor, fastest peer / ours, and the peak extra memory of ours as a
multiple of the input (kernel high-water mark of resident memory over a separate untimed
call). Peers
whose memory would not fit (ByzFL NNM gathers n x (n - f) x d) or whose Python loops
would run for minutes are skipped with the reason printed. Then the detection table:
precision / recall of ``detect`` at n=20, f=6, d=1e4 under each attack.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers

from qflare.robust import detect, get_attack, get_rule, list_attacks

SIZES = [(10, 1_000_000), (50, 1_000_000), (100, 100_000), (200, 100_000)]
RULES = [
    "mean",
    "median",
    "trimmed_mean",
    "krum",
    "multikrum",
    "geomed",
    "cc",
    "bulyan",
    "mda",
    "monna",
    "meamed",
    "caf",
    "smea",
    "nnm",
    "bucketing",
    "clip",
    "arc",
]
MAX_SUBSETS = 200_000


# ---------------------------------------------------------------- floors (plain NumPy)
def tmm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # torch GEMM: NumPy's bundled OpenBLAS ran X @ X.T 5-15x slower here.
    return (
        torch.from_numpy(np.ascontiguousarray(a)) @ torch.from_numpy(np.ascontiguousarray(b))
    ).numpy()


def _sqd(x: np.ndarray) -> np.ndarray:
    g = tmm(x, x.T).astype(np.float64)
    dg = np.diag(g)
    return np.maximum(dg[:, None] + dg[None, :] - 2 * g, 0)


def _krum_scores(d2: np.ndarray, f: int) -> np.ndarray:
    n = len(d2)
    return np.sort(d2, axis=1)[:, 1 : n - f].sum(1)


def _closest_mean(s: np.ndarray, k: int) -> np.ndarray:
    n = len(s)
    med = np.median(s, axis=0) if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    idx = np.argpartition(np.abs(s - med), k - 1, axis=0)[:k]
    return np.take_along_axis(s, idx, axis=0).mean(0)


def floor_fn(rule: str, f: int) -> Callable[[np.ndarray], Any]:
    def mean(x):
        return x.mean(0)

    def median(x):
        s = np.sort(x, axis=0)
        n = len(s)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2

    def trimmed(x):
        return np.sort(x, axis=0)[f : len(x) - f].mean(0)

    def krum(x):
        return x[np.argmin(_krum_scores(_sqd(x), f))]

    def multikrum(x):
        return x[np.argsort(_krum_scores(_sqd(x), f))[: len(x) - f]].mean(0)

    def geomed(x):
        z = np.zeros(x.shape[1], np.float32)
        for _ in range(3):
            b = 1 / np.maximum(np.linalg.norm(x - z, axis=1), 0.1)
            z = tmm((b / b.sum()).astype(np.float32)[None], x)[0]
        return z

    def cc(x):
        diffs = x - np.zeros(x.shape[1], np.float32)
        s = np.minimum(1.0, 100.0 / np.linalg.norm(diffs, axis=1))
        return tmm((s / len(x)).astype(np.float32)[None], diffs)[0]

    def bulyan(x):
        d2 = _sqd(x)
        left = list(range(len(x)))
        picked = []
        for _ in range(len(x) - 2 * f):
            sub = d2[np.ix_(left, left)]
            k = len(left) - f - 1
            best = left[int(np.argmin(np.sort(sub, 1)[:, 1 : k + 1].sum(1)))]
            picked.append(best)
            left.remove(best)
        s = np.sort(x[picked], axis=0)
        return _closest_mean(s, len(picked) - 2 * f)

    def subset_mean(score):
        def run(x):
            import itertools

            n = len(x)
            d2 = _sqd(x)
            best, bv = None, np.inf
            for c in itertools.combinations(range(n), n - f):
                v = score(d2, x, np.asarray(c))
                if v < bv:
                    best, bv = c, v
            return x[list(best)].mean(0)

        return run

    def mda_score(d2, x, c):
        return d2[np.ix_(c, c)].max()

    def smea_score(d2, x, c):
        g = x[c] - x[c].mean(0)
        return np.linalg.eigvalsh(tmm(g, g.T).astype(np.float64))[-1]

    def monna(x):
        dist = np.linalg.norm(x - x[0], axis=1)
        return x[np.argpartition(dist, len(x) - f - 1)[: len(x) - f]].mean(0)

    def meamed(x):
        return _closest_mean(x, len(x) - f)

    def caf(x):
        n = len(x)
        c = np.ones(n)
        best, bv = None, np.inf
        while c.sum() > n - 2 * f:
            mu = tmm((c / c.sum()).astype(np.float32)[None], x)[0]
            diffs = x - mu
            s = np.sqrt(c)
            gd = tmm(diffs, diffs.T).astype(np.float64)
            m = gd * s[:, None] * s[None, :] / c.sum()
            vals, vecs = np.linalg.eigh(m)
            if vals[-1] < bv:
                best, bv = mu, vals[-1]
            proj = gd @ (s * vecs[:, -1])
            tau = proj**2
            c = c * (1 - tau / tau.max())
        return best

    def nnm(x):
        n = len(x)
        idx = np.argsort(_sqd(x), axis=1)[:, : n - f]
        w = np.zeros((n, n), np.float32)
        np.put_along_axis(w, idx, 1.0 / (n - f), axis=1)
        return tmm(w, x)

    def bucketing(x):
        perm = np.random.default_rng(0).permutation(len(x))
        n2 = len(x) // 2 * 2
        return x[perm[:n2]].reshape(n2 // 2, 2, -1).mean(1)

    def clip(x):
        nr = np.linalg.norm(x, axis=1)
        return x * np.minimum(1.0, 1.0 / nr).astype(np.float32)[:, None]

    def arc(x):
        n = len(x)
        nr = np.linalg.norm(x, axis=1)
        k = int(2 * f / n * (n - f))
        lim = np.sort(nr)[n - k - 1]
        return x * np.minimum(1.0, lim / nr).astype(np.float32)[:, None]

    table = {
        "mean": mean,
        "median": median,
        "trimmed_mean": trimmed,
        "krum": krum,
        "multikrum": multikrum,
        "geomed": geomed,
        "cc": cc,
        "bulyan": bulyan,
        "mda": subset_mean(mda_score),
        "smea": subset_mean(smea_score),
        "monna": monna,
        "meamed": meamed,
        "caf": caf,
        "nnm": nnm,
        "bucketing": bucketing,
        "clip": clip,
        "arc": arc,
    }
    return table[rule]


def ours_fn(rule: str, f: int) -> Callable[[np.ndarray], Any]:
    spec = {
        "mean": "mean",
        "median": "median",
        "geomed": "geomed",
        "cc": "cc",
        "nnm": f"nnm(f={f})+mean",
        "bucketing": "bucketing(s=2)+mean",
        "clip": "clip(c=1.0)+mean",
        "arc": f"arc(f={f})+mean",
    }.get(rule, f"{rule}(f={f})")
    r = get_rule(spec)
    if rule in ("nnm", "bucketing", "clip", "arc"):
        p = r.pres[0]  # time the pre-aggregator alone, as the floor and ByzFL do
        return lambda x: p.transform(x, None, rng=0)[0]
    return lambda x: r.aggregate(x, None)


# ---------------------------------------------------------------- peers
def byzfl_fn(bz: Any, rule: str, f: int) -> Callable[[Any], Any] | None:
    make = {
        "mean": lambda: bz.Average(),
        "median": lambda: bz.Median(),
        "trimmed_mean": lambda: bz.TrMean(f),
        "krum": lambda: bz.Krum(f),
        "multikrum": lambda: bz.MultiKrum(f),
        "geomed": lambda: bz.GeometricMedian(),
        "cc": lambda: bz.CenteredClipping(),
        "mda": lambda: bz.MDA(f),
        "monna": lambda: bz.MoNNA(f),
        "meamed": lambda: bz.Meamed(f),
        "caf": lambda: bz.CAF(f),
        "smea": lambda: bz.SMEA(f),
        "nnm": lambda: bz.NNM(f),
        "bucketing": lambda: bz.Bucketing(2),
        "clip": lambda: bz.Clipping(1.0),
        "arc": lambda: bz.ARC(f),
    }.get(rule)
    if make is None:
        return None
    inplace = rule in ("clip", "arc")
    return lambda x: make()(
        x.clone() if inplace and isinstance(x, torch.Tensor) else (x.copy() if inplace else x)
    )


def flwr_fn(fa: Any, rule: str, f: int, n: int) -> Callable[[Any], Any] | None:
    if rule == "mean":
        return lambda res: fa.aggregate(res)
    if rule == "median":
        return lambda res: fa.aggregate_median(res)
    if rule == "trimmed_mean":
        return lambda res: fa.aggregate_trimmed_avg(res, (f + 0.5) / n)
    if rule == "krum":
        return lambda res: fa.aggregate_krum(res, f - 1, 0)
    if rule == "multikrum":
        return lambda res: fa.aggregate_krum(res, f - 1, n - f)
    if rule == "bulyan":
        return lambda res: fa.aggregate_bulyan(list(res), f, fa.aggregate_krum, to_keep=0)
    return None


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def best_time(fn: Callable[[Any], Any], arg: Any, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        fn(arg)
        ts.append(time.perf_counter() - t)
    return min(ts)


_LIBC = ctypes.CDLL("libc.so.6")


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_extra(fn: Callable[[Any], Any], arg: Any) -> int:
    """Peak resident memory of one call above the level before it.

    Free heap pages are handed back first (malloc_trim) so that the call must fault in
    what it allocates, then the kernel's high-water mark is reset (clear_refs 5) and read
    after (VmHWM). Unlike tracemalloc this sees torch's allocations too.
    """
    gc.collect()
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _status("VmRSS:")
    out = fn(arg)
    peak = _status("VmHWM:")
    del out
    return max(0, peak - base)


def feasible(rule: str, n: int, f: int) -> str | None:
    if rule in ("mda", "smea") and math.comb(n, f) > MAX_SUBSETS:
        return f"C({n},{f})={math.comb(n, f):.2e} subsets"
    if rule == "bulyan" and n < 4 * f + 3:
        return f"needs n >= 4f+3 = {4 * f + 3}"
    return None


def bench_size(
    n: int, d: int, rules: list[str], repeats: int, use_peers: bool, bz: Any, fa: Any
) -> None:
    f = n // 5
    x = np.random.default_rng(n + d).standard_normal((n, d), dtype=np.float32)
    xt = torch.from_numpy(x)
    in_bytes = x.nbytes
    res = [([row], 1) for row in x]
    print(f"\n## n={n}, d={d:.0e}, f={f}, input {in_bytes / 2**20:.0f} MiB, best of {repeats}")
    print(
        "| rule | ours ms | floor ms | ours/floor | ByzFL ms | Flower ms | fastest peer/ours | ours peak extra / input |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for rule in rules:
        why = feasible(rule, n, f)
        if why:
            print(f"| {rule} | skipped: {why} | | | | | | |")
            continue
        ours = ours_fn(rule, f)
        t_ours = best_time(ours, x, repeats)
        mem = peak_extra(ours, x) / in_bytes
        t_floor = best_time(floor_fn(rule, f), x, max(1, repeats))
        peer_cells, peer_times = [], []
        if use_peers and bz is not None and byzfl_fn(bz, rule, f) is not None:
            fn = byzfl_fn(bz, rule, f)
            need = int(n * (n - f) * d * 4 * 1.1) if rule == "nnm" else 0
            if need and need > 0.7 * mem_available():
                peer_cells.append(
                    f"skipped: needs ~{need / 2**30:.1f} GiB, {mem_available() / 2**30:.1f} GiB free"
                )
            else:
                tt = [best_time(fn, a, 1) for a in (x, xt)]
                peer_times.append(min(tt))
                peer_cells.append(f"{min(tt) * 1e3:.0f} ({'np' if tt[0] <= tt[1] else 'torch'})")
        else:
            peer_cells.append("-")
        if use_peers and fa is not None and flwr_fn(fa, rule, f, n) is not None:
            fn = flwr_fn(fa, rule, f, n)
            probe = (
                best_time(lambda r: fa.aggregate_krum(r, f, 0), res, 1) if rule == "bulyan" else 0.0
            )
            if probe * (n - 2 * f) > 60:
                est = probe * (n - 2 * f)
                peer_cells.append(
                    f"skipped: ~{est:.0f} s ({n - 2 * f} Krum passes of {probe:.1f} s)"
                )
            else:
                tf = best_time(fn, res, 1)
                peer_times.append(tf)
                peer_cells.append(f"{tf * 1e3:.0f}")
        else:
            peer_cells.append("-")
        speed = f"{min(peer_times) / t_ours:.1f}x" if peer_times else "-"
        print(
            f"| {rule} | {t_ours * 1e3:.1f} | {t_floor * 1e3:.1f} | {t_ours / t_floor:.2f} | "
            f"{peer_cells[0]} | {peer_cells[1]} | {speed} | {mem:.2f} |",
            flush=True,
        )


def detection_table(seeds: int = 5) -> None:
    n, f, d = 20, 6, 10_000
    print(
        f"\n## detection: n={n}, f={f}, d={d:.0e}, honest = mu + 0.1 N(0, I), mu ~ 0.1 N(0, I) "
        f"(cosine to mu about 0.7), {seeds} seeds"
    )
    print("| attack | precision | recall | false-positive rate | most common reason |")
    print("|---|---|---|---|---|")
    for name in list_attacks():
        if name == "label_flip":
            continue
        tp = fp = fn_ = 0
        reasons: dict[str, int] = {}
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            mu = 0.1 * rng.normal(size=d)
            h = (mu + 0.1 * rng.normal(size=(n - f, d))).astype(np.float32)
            kw = {"rule": f"trimmed_mean(f={f})"} if name.startswith("optimal") else {}
            byz = get_attack(name, **kw)(h, f, rng=seed)
            v = detect(np.concatenate([h, byz]), f)
            flagged = {int(i) for i in v.flagged}
            truth = set(range(n - f, n))
            tp += len(flagged & truth)
            fp += len(flagged - truth)
            fn_ += len(truth - flagged)
            for i in flagged:
                for r in v.reasons[str(i)]:
                    reasons[r] = reasons.get(r, 0) + 1
        prec = f"{tp / (tp + fp):.2f}" if tp + fp else "- (none flagged)"
        top = max(reasons, key=reasons.get) if reasons else "-"
        print(f"| {name} | {prec} | {tp / (tp + fn_):.2f} | {fp / ((n - f) * seeds):.2f} | {top} |")
    print("label_flip is data-level (labels, not updates) and is not in this table.")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--sizes",
        default=",".join(f"{n}x{d}" for n, d in SIZES),
        help="comma-separated NxD, e.g. 50x1000000",
    )
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-detection", action="store_true")
    ap.add_argument("--detection-only", action="store_true")
    a = ap.parse_args()
    if not a.detection_only:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in a.sizes.split(",") if s]
        rules = [r for r in a.rules.split(",") if r]
        bad = [r for r in rules if r not in RULES]
        if bad:
            ap.error(f"unknown rules {bad}; known: {RULES}")
        bz = fa = None
        if not a.no_peers:
            try:
                bz = peers.load_byzfl()
            except ImportError as exc:
                print(f"ByzFL not available: {exc}")
            try:
                fa = peers.load_flwr_aggregate()
            except ImportError as exc:
                print(f"Flower not available: {exc}")
        print(
            f"torch threads {torch.get_num_threads()}, numpy {np.__version__}, torch {torch.__version__}"
        )
        for n, d in sizes:
            bench_size(n, d, rules, a.repeats, not a.no_peers, bz, fa)
    if not a.no_detection:
        detection_table()


if __name__ == "__main__":
    main()
