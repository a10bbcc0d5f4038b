"""Per-round detection of suspicious updates.

First, coalitions of (near-)copies: two updates closer to each other than
``duplicate`` x the median pairwise distance of the round are joined, and every group of
two or more that is a strict minority of the round is flagged ``duplicate``. Honest
clients train on their own data and never send (near-)identical updates, while colluding
attacks that send one vector f times (sign flip of the mean, IPM, ALIE, min-max, Mimic)
do; such copies would otherwise pull any robust centre towards themselves (f identical
points are a mode the geometric median moves to). Flagged copies are then left out of
the reference: the robust centre and the median/MAD of every score below are computed on
the other updates only. A coalition that adds independent noise of more than that
fraction of the honest spread is not a duplicate group and meets the scores below.

Each update then gets six scores, computed on the n x n Gram matrix (so d costs one GEMM
per chunk of :data:`~qflare.robust._core.GRAM_GRID` columns: the chunks' float32 products
summed in float64, the same bits whether the rows are in memory or read in column blocks
of any size, :mod:`qflare.robust.blocks`):
- ``krum``: the Krum score (Blanchard et al., NeurIPS 2017) taken as the root mean square
  of the distances to the r - f' - 1 nearest reference updates (r of them, f' = f less
  the copies already flagged; a distance, like the next score: a sum of squares is
  right-skewed and its robust z overstated honest non-IID spread), as a robust z-score
  (median / MAD over the reference) across the round;
- ``distance``: distance to the robust centre (geometric median by Weiszfeld, Pillutla et
  al. 2022, of the reference updates), robust z-score;
- ``cosine``: cosine between the update and the robust centre, robust z-score (low side)
  with a one-sided reweighted scale: median and MAD are recomputed once without the
  updates already more than ``cosine_trim`` robust deviations below the median (one-step
  reweighting, cf. Rousseeuw & Leroy 1987, ch. 4). Updates that disagree in direction
  all sit on the low side; left in, they lower the median and inflate the MAD, which hid
  label flipping (cosine about 0.15 against 0.35-0.6 for honest clients) for the first
  4-8 rounds;
- ``neighbourhood``: the cosine above averaged over the update and its k = f' - 1 most
  similar reference updates (cosine similarity), as a low-side robust z whose median and
  MAD are taken over the reference averages left after dropping the min(f', r/3) lowest
  (the honest majority the threshold assumes); it flags only when two or more updates
  are past the threshold, since it is a coalition signal. A coalition that pushes one
  systematic direction (label flipping: every attacker trains on 9 - y) has its fellow
  attackers as nearest neighbours, so the average keeps their common disagreement with
  the centre and cancels the per-client spread of non-IID data, while an honest client
  that is unusual on its own has ordinary neighbours. On digits (20 clients, 6 flipping, Dirichlet 0.5) a flipped client's cosine
  to the centre (0.1-0.4 in round 1) overlaps the honest ones' (0.25-0.7); the
  neighbourhood average separates them from round 1-2 on (kNN smoothing of an outlier
  score, cf. the local outlier factor, Breunig et al., SIGMOD 2000);
- ``norm``: the update's norm, robust z-score, both sides;
- ``cluster``: two-means on the updates (Lloyd iterations in Gram space, seeded with the
  two farthest points, cf. Auror, Shen et al., ACSAC 2016); the smaller group is suspect
  when it has at most f members and its centre lies far from the other's relative to the
  spread inside the groups.
A score past its threshold gives a reason; a client with any reason is flagged. NaN/Inf
updates, and those whose squared norm overflows their dtype, are flagged ``non_finite``
before anything else. With fewer finite updates than
``max(3, 2f + 1)`` the verdict says ``insufficient`` and flags only non-finite ones.

:func:`label_consistency` scores, from the output layer alone, whether the images a client
labels c look like the images everyone else labels c (label flipping at strong non-IID,
where the scores above cannot tell a flipper from an honest client with two classes); its
flag rests on a running mean across rounds (:meth:`qflare.robust.Reputation.review`).

:func:`limit_flags` keeps at most f clients flagged on scores (the defence assumes at most
f Byzantine clients): it is applied after the evidence across rounds
(:meth:`qflare.robust.Reputation.review`), which adds and removes flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._core import (
    F64,
    BoolArray,
    FloatArray,
    IntArray,
    as_batch,
    centre_gram,
    check_float,
    check_int,
    finite_from_gram,
    grid_gram,
    sq_dists_from_gram,
)

OK = "ok"
INSUFFICIENT = "insufficient"

# Floors on the robust scale so that a round of near-identical honest updates does not
# turn rounding noise into outliers.
_MIN_REL_SCALE = 0.05
# In cosine units. Non-IID honest clients spread widely in cosine to the centre (digits,
# Dirichlet 0.5: 0.2-0.7, one client per split persistently near the low end); with the
# copies out of the reference, 0.05 flagged such a client in 4-8% of honest rounds.
_COS_MIN_SCALE = 0.1
# The neighbourhood average of k + 1 cosines spreads less than one cosine; 0.05 is half
# the single-cosine floor.
_NBHD_MIN_SCALE = 0.05


@dataclass(frozen=True)
class Verdict:
    """Kept and flagged clients of one round, with reasons and per-score values."""

    status: str
    kept: tuple[str, ...]
    flagged: tuple[str, ...]
    reasons: dict[str, tuple[str, ...]]
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    message: str = ""
    n: int = 0
    f: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "kept": list(self.kept),
            "flagged": list(self.flagged),
            "reasons": {k: list(v) for k, v in self.reasons.items()},
            "scores": {k: dict(v) for k, v in self.scores.items()},
            "message": self.message,
            "n": self.n,
            "f": self.f,
        }


@dataclass(frozen=True)
class Thresholds:
    z: float = 3.5  # robust z-score beyond which krum/distance/norm are outliers
    cosine_z: float = 3.5  # low-side robust z for the cosine
    separation: float = 3.0  # cluster centres apart / within-group spread
    # Two updates closer than this fraction of the round's median pairwise distance are
    # copies; honest non-IID digits clients measured >= 0.5 (nearest pair / median).
    duplicate: float = 0.1
    # Cosine scale: updates this many robust deviations below the median are left out of
    # the median/MAD (one reweighting step); see the module docstring.
    cosine_trim: float = 1.5
    neighbourhood_z: float = 3.5  # low-side robust z of the neighbourhood-averaged cosine

    def __post_init__(self) -> None:
        for k in ("z", "cosine_z", "separation", "duplicate", "cosine_trim", "neighbourhood_z"):
            check_float(k, getattr(self, k), strict=True)


def robust_z(v: F64, min_scale: float = 0.0, ref: BoolArray | None = None) -> F64:
    """Robust z of every entry of ``v``, median and MAD taken over ``v[ref]`` (default all)."""
    r = v if ref is None else v[ref]
    med = float(np.median(r))
    mad = 1.4826 * float(np.median(np.abs(r - med)))
    scale = max(mad, min_scale, 1e-12)
    return (v - med) / scale


def low_side_z(v: F64, ref: BoolArray, trim: float, min_scale: float) -> F64:
    """Robust z of ``v`` whose median/MAD leave out the ``ref`` entries already below
    ``-trim`` by the plain robust z (one reweighting step): a one-sided contamination
    (many low values) then does not set its own scale. One step, not iterated to a fixed
    point: iterating keeps trimming the honest lower tail (on 20 Gaussian values it
    flagged 4% of them at z 3.5, one step 1.6%, plain MAD 0.3%)."""
    z = robust_z(v, min_scale=min_scale, ref=ref)
    use = ref & (z > -trim)
    if use.sum() < max(2, (int(ref.sum()) + 1) // 2):
        return z
    return robust_z(v, min_scale=min_scale, ref=use)


def neighbourhood_mean(v: F64, sim: F64, ref: BoolArray, k: int) -> F64:
    """Mean of ``v`` over each row and its ``k`` most similar ``ref`` rows (by ``sim``,
    larger is closer; a row is never its own neighbour)."""
    s = np.where(ref[None, :], sim, -np.inf)
    np.fill_diagonal(s, -np.inf)
    k = min(k, int(ref.sum()) - 1)
    if k < 1:
        return v.copy()
    nn = np.argsort(-s, axis=1, kind="stable")[:, :k]
    out: F64 = (v + v[nn].sum(axis=1)) / (k + 1)
    return out


def upper_z(v: F64, ref: BoolArray, drop: int, min_scale: float) -> F64:
    """Robust z of ``v`` with median/MAD over the ``ref`` entries left after dropping the
    ``drop`` lowest: up to ``drop`` low values (attackers) then cannot set the scale."""
    vals = np.sort(v[ref])[::-1]
    keep = max(2, len(vals) - drop)
    top = vals[:keep]
    med = float(np.median(top))
    mad = 1.4826 * float(np.median(np.abs(top - med)))
    return (v - med) / max(mad, min_scale, 1e-12)


def duplicate_groups(
    d2: F64, ratio: float, *, f: int | None = None, arrival: F64 | Sequence[float] | None = None
) -> BoolArray:
    """Mask of rows in a group of >= 2 (near-)copies that is a strict minority.

    Rows i, j are linked when their distance is at most ``ratio`` x the median pairwise
    distance; groups are the connected components. A group of half the rows or more is
    the round's consensus by the honest-majority assumption and is not flagged (e.g. every
    client sending a zero update).

    A group of more than ``f`` rows holds an honest update, since at most ``f`` clients are
    Byzantine: the others copied it (Mimic, Karimireddy et al., ICLR 2022), so the group's
    content is honest. Given ``arrival`` (one value per row, lower is earlier: where the
    update sits in the update stream), its earliest member is left unflagged and the rest
    are flagged: a copy cannot be sent before the update it copies. Without ``arrival``
    (or ``f``) every member is flagged."""
    n = d2.shape[0]
    if n < 3:
        return np.zeros(n, dtype=bool)
    dist = np.sqrt(np.maximum(d2, 0.0))
    off = dist[~np.eye(n, dtype=bool)]
    scale = float(np.median(off))
    linked = dist <= ratio * scale
    np.fill_diagonal(linked, False)
    label = np.arange(n)
    for i, j in zip(*np.nonzero(np.triu(linked)), strict=True):
        a, b = label[i], label[j]
        if a != b:
            label[label == b] = a
    order = None if arrival is None else np.asarray(arrival, dtype=np.float64)
    if order is not None and (order.shape != (n,) or not np.isfinite(order).all()):
        raise ValueError(f"arrival must be {n} finite values, got {order.shape}: {order}")
    out = np.zeros(n, dtype=bool)
    for lab in np.unique(label):
        members = label == lab
        size = int(members.sum())
        if 2 <= size < n / 2:
            out |= members
            if order is not None and f is not None and size > f:
                rows = np.flatnonzero(members)
                out[rows[np.argmin(order[rows])]] = False  # the original (ties: first row)
    return out


def _geomed_coef(g: F64, iters: int = 50, eps: float = 1e-9, mask: BoolArray | None = None) -> F64:
    """Weiszfeld coefficients a (centre = sum_i a_i x_i) over the rows in ``mask``."""
    n = g.shape[0]
    if mask is not None and not mask.all():
        a = np.zeros(n)
        sub = np.flatnonzero(mask)
        a[sub] = _geomed_coef(g[np.ix_(sub, sub)], iters, eps)
        return a
    a = np.full(n, 1.0 / n)
    diag = np.diag(g)
    for _ in range(iters):
        ga = g @ a
        dist = np.sqrt(np.maximum(diag - 2 * ga + a @ ga, 0.0))
        beta = 1.0 / np.maximum(dist, eps * (1 + dist.max()))
        new: F64 = beta / beta.sum()
        if np.abs(new - a).max() < 1e-10:
            return new
        a = new
    return a


def two_means(d2: F64, g: F64, iters: int = 20) -> tuple[IntArray, float]:
    """Labels (0/1) and separation (centre distance / mean within-group distance)."""
    i, j = np.unravel_index(int(np.argmax(d2)), d2.shape)
    labels = (d2[:, j] < d2[:, i]).astype(int)
    diag = np.diag(g)
    for _ in range(iters):
        dists = []
        for k in (0, 1):
            members = labels == k
            if not members.any():
                return labels, 0.0
            a = members / members.sum()
            ga = g @ a
            dists.append(diag - 2 * ga + a @ ga)
        new = (dists[1] < dists[0]).astype(int)
        if np.array_equal(new, labels):
            break
        labels = new
    a0 = (labels == 0) / max(1, (labels == 0).sum())
    a1 = (labels == 1) / max(1, (labels == 1).sum())
    diff = a0 - a1
    centre_gap = float(np.sqrt(max(diff @ g @ diff, 0.0)))
    within = []
    for a, k in ((a0, 0), (a1, 1)):
        ga = g @ a
        dd = np.sqrt(np.maximum(diag - 2 * ga + a @ ga, 0.0))[labels == k]
        within.append(dd)
    spread = float(np.mean(np.concatenate(within)))
    return labels, centre_gap / max(spread, 1e-12 * (1 + centre_gap))


#: Rows of the output layer's update counted as "pushed up": bias update above this
#: fraction of the client's largest |bias update| (smaller ones divide by noise).
LABEL_FLOOR = 0.1


def _loo_median(vals: F64, member: BoolArray) -> tuple[F64, BoolArray]:
    """For each row i of ``vals`` [n, H]: the coordinate-wise median of the ``member`` rows
    other than i, and whether there was one (all at once: the median of the sorted members
    with the row's own rank skipped)."""
    n = vals.shape[0]
    out = np.zeros(vals.shape)
    ok = np.zeros(n, dtype=bool)
    idx = np.flatnonzero(member)
    m = len(idx)
    if m == 0:
        return out, ok
    sub = vals[idx]
    order = np.argsort(sub, axis=0, kind="stable")
    srt = np.take_along_axis(sub, order, axis=0)
    out[~member] = (srt[(m - 1) // 2] + srt[m // 2]) / 2
    ok[~member] = True
    if m >= 2:
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(m)[:, None], axis=0)
        lo, hi = (m - 2) // 2, (m - 1) // 2  # middle of the m - 1 others
        a = np.take_along_axis(srt, lo + (rank <= lo), axis=0)
        b = np.take_along_axis(srt, hi + (rank <= hi), axis=0)
        out[idx] = (a + b) / 2
        ok[idx] = True
    return out, ok


def _label_margins(weight: F64, bias: F64, use: BoolArray, floor: float) -> F64:
    """One pass of :func:`label_consistency`: every client's b-weighted mean margin, the
    consensus of each class taken over the ``use`` clients other than itself."""
    n, c, _ = weight.shape
    top = np.abs(bias).max(axis=1, keepdims=True)
    up = (bias > floor * top) & (top > 0)
    phi = weight / np.where(up, bias, 1.0)[:, :, None]
    cons = np.zeros_like(phi)
    ok = np.zeros((n, c), dtype=bool)
    for k in range(c):
        cons[:, k], ok[:, k] = _loo_median(phi[:, k], use & up[:, k])
    # the median over each client's classes with a consensus (NaN sorts last)
    srt = np.sort(np.where(ok[:, :, None], cons, np.nan), axis=1)
    k = ok.sum(axis=1)
    lo = np.maximum(k - 1, 0) // 2
    hi = k // 2 - (k == 0)
    centre = (
        np.take_along_axis(srt, lo[:, None, None], axis=1)[:, 0]
        + np.take_along_axis(srt, np.maximum(hi, 0)[:, None, None], axis=1)[:, 0]
    ) / 2
    centre = np.where((k > 0)[:, None], centre, 0.0)
    # the centre's direction projected out rather than the centre subtracted: what every
    # class shares is removed whatever its share in a row (a row of a client holding one
    # class carries the class's whole mean, one of a client holding several a contrast
    # against its other classes, with less of the shared part)
    u = centre / np.maximum(np.linalg.norm(centre, axis=1, keepdims=True), 1e-30)
    p = phi - np.einsum("irh,ih->ir", phi, u)[:, :, None] * u[:, None, :]
    q = cons - np.einsum("irh,ih->ir", cons, u)[:, :, None] * u[:, None, :]
    cos = np.einsum("irh,ich->irc", p, q) / np.maximum(
        np.linalg.norm(p, axis=2)[:, :, None] * np.linalg.norm(q, axis=2)[:, None, :], 1e-30
    )
    cos = np.where(ok[:, None, :], cos, -np.inf)
    own = np.einsum("irr->ir", cos).copy()
    diag = np.eye(c, dtype=bool)[None]
    others = np.where(diag, -np.inf, cos)
    rival = others.max(axis=2)
    nearest = others.argmax(axis=2)
    # how alike the consensus of the row's own class and of its rival are: a row whose
    # nearest other class looks like its own tells little about its labels
    qn = q / np.maximum(np.linalg.norm(q, axis=2, keepdims=True), 1e-30)
    between = np.einsum("ikh,ilh->ikl", qn, qn)  # [n, C, C]: consensus against consensus
    alike = np.take_along_axis(between, nearest[:, :, None], axis=2)[:, :, 0]
    rows = up & ok & (ok.sum(axis=1, keepdims=True) >= 2)
    w = np.where(rows, bias, 0.0)
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore"):
        margin = np.where(rows, (own - rival) * np.clip(1.0 - alike, 0.0, 1.0), 0.0)
    out = np.full(n, np.nan)
    has = total > 0
    out[has] = (w * margin).sum(axis=1)[has] / total[has]
    return out


def _label_coalition(weight: F64, bias: F64, use: BoolArray, floor: float, f: int) -> BoolArray:
    """The at most ``f`` clients of ``use`` that disagree with the majority's labels as a
    group: [n] flags, left out of the first pass's consensus by :func:`label_consistency`.

    Each pair of clients pushing up a common class is compared row by row: client i's row
    of class c against j's row of c, minus against j's closest row of another class (the
    margin of :func:`label_consistency`, with one client for the consensus; none where j
    pushes up nothing else). Two honest clients agree (positive), as do two clients that
    flip labels the same way; an honest client and a flipper disagree (the flipper's row
    of c holds images of another class, which it may also push up under that class's own
    label). The pairs' b-weighted margins, made symmetric, are a signed graph; its leading
    eigenvector splits the clients in two, and the side with fewer clients is the
    coalition where its members disagree with the majority and agree among themselves, on
    balance (a lone client at odds with the others is not one: digits tune seed 9, an
    honest client holding a class with two flippers), at most ``f`` of them, furthest
    from the majority first; none where the graph has no second side.

    Why: where a coalition pushes up most rows of a class, the class's median is its own
    and the honest holders of the class look flipped; the second pass cannot undo it, for
    it removes the clients the first pass scored lowest, which are then those honest
    holders. At Dirichlet 0.1, six flippers of twenty pushed up three of five rows of
    trousers and four of six of bags (fashion-mnist tune seed 4): honest holders scored
    -0.2 to -0.9 from round 2, flippers up to +0.6; recall 46.7%, an honest client out in
    90% of rounds. With the coalition found first (all six from round 2 in most rounds):
    recall 99.2%, no honest client out."""
    n, c, _ = weight.shape
    out = np.zeros(n, dtype=bool)
    top = np.abs(bias).max(axis=1, keepdims=True)
    up = (bias > floor * top) & (top > 0) & use[:, None]
    if f <= 0 or up.sum() == 0:
        return out
    phi = weight / np.where(up, bias, 1.0)[:, :, None]
    # what every class shares, projected out as in _label_margins, with one direction for
    # all: the median over classes of each class's median row
    meds = [np.median(phi[up[:, k], k], axis=0) for k in range(c) if up[:, k].any()]
    centre = np.median(np.stack(meds), axis=0)
    u = centre / max(float(np.linalg.norm(centre)), 1e-30)
    p = phi - np.einsum("nch,h->nc", phi, u)[:, :, None] * u
    p = np.where(up[:, :, None], p, 0.0)
    p = p / np.maximum(np.linalg.norm(p, axis=2, keepdims=True), 1e-30)
    wt = np.where(up, bias, 0.0)
    wt = wt / np.maximum(wt.sum(axis=1, keepdims=True), 1e-30)
    several = up.sum(axis=1) >= 2
    # only the rows pushed up, in client order: a client pushes up a few classes at
    # Dirichlet 0.1, so R rows, not n x C
    client, cls = np.nonzero(up)
    rows = p[client, cls]  # [R, H]
    weight_of = wt[client, cls]
    at = np.full((n, c), -1)
    at[client, cls] = np.arange(len(client))
    starts = np.flatnonzero(np.r_[True, client[1:] != client[:-1]])
    owners = client[starts]
    pair = np.zeros((n, n))
    block = max(1, 4_000_000 // len(client))
    for s in range(0, len(client), block):
        r = slice(s, s + block)
        g = rows[r] @ rows.T  # [B, R]: cosines of the block's rows with every row
        # each client's row of the row's own class (where it has one) ...
        col = at[:, cls[r]].T  # [B, n]
        same = np.take_along_axis(g, np.maximum(col, 0), axis=1)
        # ... against its closest row of another class
        other = np.full(col.shape, -np.inf)
        other[:, owners] = np.maximum.reduceat(
            np.where(cls[None, :] == cls[r, None], -np.inf, g), starts, axis=1
        )
        valid = (col >= 0) & several[None, :]
        with np.errstate(invalid="ignore"):
            margin = np.where(valid, same - other, 0.0) * weight_of[r, None]
        np.add.at(pair, client[r], margin)
    np.fill_diagonal(pair, 0.0)
    graph = (pair + pair.T) / 2
    vals, vecs = np.linalg.eigh(graph)
    if vals[-1] <= 0:
        return out
    v = vecs[:, -1]
    members = np.flatnonzero(use)
    if (v[members] < 0).sum() > (v[members] > 0).sum():
        v = -v
    side = members[v[members] < 0]
    majority = members[v[members] >= 0]
    # a coalition's member disagrees with the majority on balance and agrees with the rest
    # of the coalition: a lone client at odds with the others is not a coalition (digits
    # tune seed 9: an honest client holding a class with two flippers; the other flippers
    # already out of the consensus)
    against = graph[np.ix_(side, majority)].sum(axis=1) < 0
    within = graph[np.ix_(side, side)].sum(axis=1) > 0
    side = side[against & within]
    if len(side) < 2:
        return out
    side = side[np.argsort(v[side], kind="stable")][:f]
    out[side] = True
    return out


def label_consistency(
    weight: FloatArray,
    bias: FloatArray,
    f: int,
    *,
    floor: float = LABEL_FLOOR,
    exclude: BoolArray | None = None,
) -> F64:
    """Per client, whether the images it labels c look like those the others label c: [n],
    higher is more consistent, NaN where it cannot be told (a non-finite output layer, no
    class pushed up, fewer than two classes with a consensus).

    ``weight`` [n, C, H] and ``bias`` [n, C] are each client's update of the output layer
    (logits = W h + b). Under SGD with cross-entropy, the row of a class the client's data
    pushes up (its bias update b[c] > ``floor`` x max |b|) is, divided by b[c], a weighted
    mean of the hidden features h of the images it labels c: phi[c] = W[c] / b[c]. The
    consensus of class c is the coordinate-wise median of phi[c] over the other clients
    that push c up. What the classes share is removed by projecting out the direction of
    the median of the consensus over classes (not by subtracting it: a client holding
    mostly one class pushes that row up with the class's whole mean, one holding several
    with a contrast against its other classes that carries less of the shared part; on
    fashion-mnist, whose class means are alike, subtracting left honest rows pointing away
    from their own class: tune seeds 0-3, 20/6, alpha 0.1 and 0.5, no attack and label
    flipping, running means from round 3: honest ones down to -0.54 and 4.3% of honest
    (client, round) pairs below -0.15, 95% of flippers'; projecting: -0.35, 1.1% and 93%;
    digits, seeds 0-2: the honest minimum 0.07 -> 0.19, every flipper below). A row scores
    the cosine to its own class's consensus minus the largest to any other class's,
    times 1 minus the cosine between those two classes' consensus (at most 1, at least 0):
    where the nearest other class looks like the row's own (pullover and coat), the
    margin between them is noise, and honest fashion-mnist clients holding such classes
    hovered about -0.15 (tune seed 2, alpha 0.1, no attack: one out in 100% of rounds, 40%
    weighed); the client scores the b-weighted mean over its rows. Label flipping trains
    on images of one class labelled as another, so its rows point at another class's
    consensus, most often one unlike its own
    (tune seeds, digits, Dirichlet 0.1: flippers -0.2 to -0.9, honest clients mostly
    above 0, single rounds down to -0.4); an honest client with one or two classes pushes
    few rows, each at its own class. Two passes: the first leaves out of the consensus a
    coalition that disagrees with the majority as a group (:func:`_label_coalition`),
    the second the at most ``f`` clients scored lowest below 0 by the first, so that a
    coalition flipping the same classes does not set the consensus of the classes it
    claims. Where the median score of the clients that set the consensus is below 0, the
    scores are measured from it (late rounds on look-alike classes; see the code).
    ``exclude`` [n]: clients left out of every consensus (still scored), e.g. those the
    round's other scores flagged: a coalition of noisy copies (noisy IPM) pushes random
    classes up with random rows, and where only two or three honest clients hold a class
    (Dirichlet 0.1) it set that class's consensus and an honest client's score fell below
    the threshold (tune seed 2: one honest client excluded in 40% of rounds).

    A statistic of our own (cf. the output-layer analyses of label flipping in Tolpegin
    et al., "Data Poisoning Attacks Against Federated Learning Systems", ESORICS 2020)."""
    f = check_int("f", f)
    floor = check_float("floor", floor)
    w = np.asarray(weight, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    if w.ndim != 3 or b.shape != w.shape[:2]:
        raise ValueError(f"weight [n, C, H] and bias [n, C] needed, got {w.shape} and {b.shape}")
    n = w.shape[0]
    use: BoolArray = np.asarray(np.isfinite(w).all(axis=(1, 2)) & np.isfinite(b).all(axis=1))
    finite = use.copy()
    if exclude is not None:
        if np.shape(exclude) != (n,):
            raise ValueError(f"exclude must be {n} flags, got shape {np.shape(exclude)}")
        use &= ~np.asarray(exclude, dtype=bool)
    if not finite.all():
        w = np.where(finite[:, None, None], w, 0.0)
        b = np.where(finite[:, None], b, 0.0)
    first = _label_margins(w, b, use & ~_label_coalition(w, b, use, floor, f), floor)
    scored = use & np.isfinite(first)
    low = np.flatnonzero(scored)[np.argsort(first[scored], kind="stable")][:f]
    low = low[first[low] < 0]
    if len(low):
        use2 = use.copy()
        use2[low] = False
        out = _label_margins(w, b, use2, floor)
    else:
        out = first
    # the majority's margin is the zero where it is below 0: late in training on look-alike
    # classes, rows carry the client's confusions more than its classes' means, and the
    # median client scored below 0 (fashion-mnist, 20/6, no attack, alpha 0.5, tune seeds
    # 0-4: 58 of 100 rounds, none before round 7, down to -0.14); an honest client more
    # confused than most then had its window below the threshold (tune seed 2: out from
    # round 13, 45% of rounds). Where the median is above 0 (every digits round seen,
    # 800, and fashion-mnist at alpha 0.1 in 99 of 100) nothing moves.
    mid = use & np.isfinite(out)
    if mid.any():
        out = out - min(float(np.median(out[mid])), 0.0)
    out[~finite] = np.nan
    return out if n else np.zeros(0)


#: Reasons that are facts about the update, not scores: never dropped by :func:`limit_flags`.
HARD_REASONS = frozenset({"non_finite", "duplicate"})


#: Reasons that rest on a client's history across rounds (:meth:`Reputation.review`):
#: evidence from many rounds outranks one round's scores in :func:`limit_flags`.
HISTORY_REASONS = frozenset({"inconsistent", "label_consistency", "noise_like"})


def _evidence(scores: dict[str, float], reasons: Sequence[str]) -> tuple[bool, int, float]:
    """How strongly a flagged client stands out: evidence across rounds first, then its
    number of reasons, then its largest robust |z| (the order in which :func:`limit_flags`
    keeps flags)."""
    zs = [abs(v) for k, v in scores.items() if k.endswith("_z") and np.isfinite(v)]
    return bool(HISTORY_REASONS & set(reasons)), len(reasons), max(zs, default=0.0)


def limit_flags(verdict: Verdict) -> Verdict:
    """``verdict`` with at most ``verdict.f`` clients flagged on scores.

    The defence assumes at most f Byzantine clients per round, so flags beyond f are honest
    clients flagged by their scores; copies and non-finite updates (:data:`HARD_REASONS`)
    always stay flagged, and of the others those with the most reasons, then the largest
    robust z, fill what is left of f. Under attacks that send copies on strongly non-IID
    data (digits, Dirichlet 0.1) the f copies were flagged and, besides them, one honest
    client whose unusual data put it past a score threshold, round after round."""
    if verdict.status != OK or len(verdict.flagged) <= verdict.f:
        return verdict
    hard = [c for c in verdict.flagged if HARD_REASONS & set(verdict.reasons[c])]
    soft = [c for c in verdict.flagged if c not in set(hard)]
    room = max(0, verdict.f - len(hard))
    ranked = sorted(
        soft,
        key=lambda c: _evidence(verdict.scores.get(c, {}), verdict.reasons[c]),
        reverse=True,
    )
    released = set(ranked[room:])
    if not released:
        return verdict
    reasons = {k: v for k, v in verdict.reasons.items() if k not in released}
    kept = set(verdict.kept) | released
    order = [*verdict.kept, *verdict.flagged]
    return Verdict(
        verdict.status,
        tuple(c for c in order if c in kept),
        tuple(c for c in verdict.flagged if c not in released),
        reasons,
        verdict.scores,
        f"{verdict.message}; kept, beyond f={verdict.f} flags: {', '.join(sorted(released))}",
        verdict.n,
        verdict.f,
    )


def detect(
    updates: Any,
    f: int,
    *,
    ids: Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
    arrival: Sequence[float] | None = None,
) -> Verdict:
    """Score the round's updates [n, d]; ``ids`` name the rows (default "0".."n-1").

    The scores are those of :func:`detect_gram` on the rows' Gram matrix on the column grid
    (:func:`~qflare.robust._core.grid_gram`), so the rows read in column blocks of any size
    (:func:`qflare.robust.blocks.detect_blocks`) get the same verdict and scores, bit for
    bit."""
    x = as_batch(updates).x
    g = grid_gram(x)
    return detect_gram(
        g, finite_from_gram(g, x.dtype), f, ids=ids, thresholds=thresholds, arrival=arrival
    )


def detect_gram(
    g: F64,
    finite: BoolArray,
    f: int,
    *,
    ids: Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
    arrival: Sequence[float] | None = None,
) -> Verdict:
    """:func:`detect` given the rows' Gram matrix ``g`` [n, n] and which rows are finite
    (``finite`` [n], as :func:`~qflare.robust._core.finite_from_gram` counts them; the
    other rows' entries of ``g`` are not read): every score is a function of the Gram
    matrix. ``arrival`` [n]: the rows' order in the update stream (lower is earlier), which
    tells the original of a group of copies larger than ``f`` (:func:`duplicate_groups`)."""
    g = np.asarray(g, dtype=np.float64)
    finite = np.asarray(finite, dtype=bool)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or finite.shape != g.shape[:1]:
        raise ValueError(
            f"a Gram matrix [n, n] and n finite flags needed, got {g.shape} and {finite.shape}"
        )
    n = g.shape[0]
    f = check_int("f", f)
    th = thresholds or Thresholds()
    names = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(names) != n or len(set(names)) != n:
        raise ValueError(
            f"ids must be {n} distinct names, got {len(names)} ({len(set(names))} distinct)"
        )
    reasons: dict[str, list[str]] = {nm: [] for nm in names}
    for i in np.flatnonzero(~finite):
        reasons[names[i]].append("non_finite")
    idx = np.flatnonzero(finite)
    m = len(idx)
    need = max(3, 2 * f + 1)
    if m < need:
        flagged = tuple(names[i] for i in np.flatnonzero(~finite))
        return Verdict(
            INSUFFICIENT,
            tuple(names[i] for i in idx),
            flagged,
            {k: tuple(v) for k, v in reasons.items() if v},
            {},
            f"{m} finite updates, detection needs at least {need} for f={f}; "
            "only non-finite updates were flagged",
            n,
            f,
        )
    g_raw = g[np.ix_(idx, idx)] if m < n else g
    g = centre_gram(g_raw)
    d2 = sq_dists_from_gram(g)
    scores: dict[str, F64] = {}
    if arrival is not None and len(arrival) != n:
        raise ValueError(f"arrival must be {n} values, got {len(arrival)}")
    arr = None if arrival is None else np.asarray(arrival, dtype=np.float64)[idx]
    dup = duplicate_groups(d2, th.duplicate, f=f, arrival=arr)
    ref = ~dup
    scores["duplicate"] = dup.astype(float)
    # Krum against the reference rows only, with f reduced by the copies already found.
    f_left = max(0, f - int(dup.sum()))
    k = int(ref.sum()) - f_left - 1
    to_ref = d2[:, ref].copy()
    to_ref[np.flatnonzero(ref), np.arange(int(ref.sum()))] = np.inf  # not oneself
    krum = np.sqrt(np.sort(to_ref, axis=1)[:, :k].mean(axis=1)) if k > 0 else np.zeros(m)
    scores["krum"] = krum
    scores["krum_z"] = robust_z(
        krum, ref=ref, min_scale=_MIN_REL_SCALE * float(np.median(krum[ref]))
    )
    a = _geomed_coef(g, mask=ref)
    ga = g @ a
    dist = np.sqrt(np.maximum(np.diag(g) - 2 * ga + a @ ga, 0.0))
    scores["distance"] = dist
    scores["distance_z"] = robust_z(
        dist, ref=ref, min_scale=_MIN_REL_SCALE * float(np.median(dist[ref]))
    )
    # Raw (uncentred) geometry for norms and cosines: x_i . z with z = sum_j a_j x_j.
    norms = np.sqrt(np.maximum(np.diag(g_raw), 0.0))
    dots = g_raw @ a
    cnorm = float(np.sqrt(max(float(a @ dots), 0.0)))
    cos = dots / np.maximum(norms * cnorm, 1e-30)
    scores["norm"] = norms
    scores["norm_z"] = robust_z(
        norms, ref=ref, min_scale=_MIN_REL_SCALE * float(np.median(norms[ref]))
    )
    scores["cosine"] = cos
    scores["cosine_z"] = low_side_z(cos, ref, th.cosine_trim, _COS_MIN_SCALE)
    # A coalition of f' has f' - 1 fellows to be neighbours with; a lone attacker is the
    # per-client scores' job.
    if f_left >= 2:
        sim = g_raw / np.maximum(np.outer(norms, norms), 1e-30)
        nbhd = neighbourhood_mean(cos, sim, ref, f_left - 1)
        scores["neighbourhood"] = nbhd
        # At most a third of the reference dropped for the scale: the MAD of the upper part
        # of a distribution shrinks the more is cut, which turns the honest low tail into
        # outliers when f' is large against r (14 updates left after ingest refused six).
        drop = min(f_left, int(ref.sum()) // 3)
        scores["neighbourhood_z"] = upper_z(nbhd, ref, drop, _NBHD_MIN_SCALE)
    low_nbhd = (
        (scores["neighbourhood_z"] < -th.neighbourhood_z)
        if "neighbourhood_z" in scores
        else np.zeros(m, dtype=bool)
    )
    # The signal is about coalitions: one update alone below the threshold is an unusual
    # honest client next to ordinary-but-different ones (seen on the 14 honest updates of
    # the Inf attack, seed 2: one client in 2 of 20 rounds), not a group sharing a
    # direction.
    if low_nbhd.sum() < 2:
        low_nbhd[:] = False
    labels, sep = two_means(d2, g)
    minority = int(labels.sum() <= m / 2)
    small = labels == minority
    scores["cluster_minority"] = small.astype(float)
    cluster_hit = bool(0 < small.sum() <= f and sep >= th.separation)
    for r, i in enumerate(idx):
        why = reasons[names[i]]
        if dup[r]:
            why.append("duplicate")
        if scores["krum_z"][r] > th.z:
            why.append("krum")
        if scores["distance_z"][r] > th.z:
            why.append("distance")
        if scores["cosine_z"][r] < -th.cosine_z:
            why.append("cosine")
        if low_nbhd[r]:
            why.append("neighbourhood")
        if abs(scores["norm_z"][r]) > th.z:
            why.append("norm")
        if cluster_hit and small[r]:
            why.append("cluster")
    flagged = tuple(nm for nm in names if reasons[nm])
    kept = tuple(nm for nm in names if not reasons[nm])
    per_client = {names[i]: {k: float(v[r]) for k, v in scores.items()} for r, i in enumerate(idx)}
    return Verdict(
        OK,
        kept,
        flagged,
        {k: tuple(v) for k, v in reasons.items() if v},
        per_client,
        f"{int(dup.sum())} in duplicate groups; separation of two groups {sep:.2f}",
        n,
        f,
    )
