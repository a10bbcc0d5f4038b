"""The detector's pure core: one round's verdict from its updates and the job's reputation.

Detection itself is :func:`qflare.robust.detect` (Krum scores after Blanchard et al.,
NeurIPS 2017; distance/cosine to the geometric median; norm outliers; two-means
clustering after Auror, Shen et al., ACSAC 2016). This module adds what a round needs
around it: the updates in client-id order (so the verdict does not depend on arrival
order), quarantine from :class:`qflare.robust.Reputation` (a client quarantined in earlier
rounds is dropped even when it behaves in this one), a score per flagged client, and the
"detection off" case, which keeps every update.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qflare.messages.tensors import Layout, Tensors
from qflare.robust import Reputation, detect

Rows = npt.NDArray[np.float32]


@dataclass(frozen=True)
class FlaggedClient:
    client: str
    score: float
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class RoundVerdict:
    kept: tuple[str, ...]
    flagged: tuple[FlaggedClient, ...]
    newly_quarantined: tuple[str, ...]
    note: str


Ref = tuple[str, bytes]  # (client, digest of its update)


class RoundRows:
    """One round's updates as the rows of one float32 matrix, each update written straight
    into its row as it arrives (:class:`qflare.messages.tensors.Layout`: tensors in
    sorted-name order, the same coordinates as the aggregator's rows). A verdict then needs
    no stacking after the round closes - no second copy of the round, and no allocation of
    n x d at the moment latency counts (a fresh 400 MB array costs up to a second of page
    faults on these machines). Rows are in arrival order; :meth:`matrix` puts them in
    client-id order in place, so the verdict does not depend on arrival order.

    ``capacity`` rows are reserved (address space only: a row's memory is touched when it
    is written); more rows double it. Safe to call from worker threads."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._x: Rows | None = None
        self._layout: Layout | None = None
        self._rows: dict[Ref, int] = {}
        self._lock = threading.Lock()

    def __contains__(self, ref: object) -> bool:
        return ref in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, ref: Ref, tensors: Tensors) -> None:
        """Write ``tensors`` as the next row (a ref already held is ignored). Raises
        ValueError when their names, shapes or dtypes differ from the round's first
        update."""
        with self._lock:
            if ref in self._rows:
                return
            if self._layout is None or self._x is None:
                self._layout = Layout.of(tensors)
                self._x = np.empty((self._capacity, self._layout.size), np.float32)
            else:
                self._layout.check(tensors, f"update of {ref[0]}")
            i = len(self._rows)
            if i == self._x.shape[0]:
                grown = np.empty((2 * i, self._x.shape[1]), np.float32)
                grown[:i] = self._x
                self._x = grown
            self._layout.flatten(tensors, out=self._x[i])
            self._rows[ref] = i

    def matrix(self, refs: list[Ref]) -> tuple[list[str], Rows]:
        """The rows of ``refs`` (one per client, all held) in client-id order, and those
        clients. When ``refs`` are exactly the rows held, they are reordered in place and
        the result is a view; otherwise it is a copy of the rows asked for."""
        order = sorted(refs)
        clients = [c for c, _d in order]
        with self._lock:
            if not order:
                return clients, np.empty((0, 0), np.float32)
            assert self._x is not None
            idx = [self._rows[r] for r in order]
            n = len(self._rows)
            if len(idx) != n:
                return clients, self._x[idx]
            _gather_rows(self._x, idx)
            self._rows = {r: i for i, r in enumerate(order)}
            return clients, self._x[:n]


def _gather_rows(x: Rows, idx: list[int]) -> None:
    """``x[i] = x[idx[i]]`` for every i of the permutation ``idx``, in place, following its
    cycles with one spare row."""
    done = [False] * len(idx)
    spare = np.empty(x.shape[1], x.dtype)
    for start in range(len(idx)):
        if done[start] or idx[start] == start:
            done[start] = True
            continue
        spare[:] = x[start]
        j = start
        while True:
            done[j] = True
            k = idx[j]
            if k == start:
                x[j] = spare
                break
            x[j] = x[k]
            j = k


def decide(
    round_no: int,
    updates: Mapping[str, Tensors],
    *,
    f: int,
    detection: bool,
    reputation: Reputation,
) -> RoundVerdict:
    """The verdict over exactly ``updates`` (client -> delta tensors); updates
    ``reputation`` in place with this round's flags."""
    clients = sorted(updates)
    if not detection or not clients:
        return RoundVerdict(
            tuple(clients), (), (), "detection off" if not detection else "empty round"
        )
    rows = RoundRows(len(clients))
    for c in clients:
        rows.add((c, b""), updates[c])
    clients, x = rows.matrix([(c, b"") for c in clients])
    return decide_rows(round_no, clients, x, f=f, reputation=reputation)


def decide_rows(
    round_no: int,
    clients: list[str],
    x: Rows,
    *,
    f: int,
    reputation: Reputation,
) -> RoundVerdict:
    """The verdict with detection on over the updates ``x`` (one float32 row per client,
    in the order of ``clients``, sorted); updates ``reputation`` in place."""
    if not clients:
        return RoundVerdict((), (), (), "empty round")
    verdict = detect(x, f, ids=clients)
    reasons: dict[str, list[str]] = {c: list(verdict.reasons.get(c, ())) for c in clients}
    for c in clients:
        if reputation.is_quarantined(c, round_no):
            reasons[c].append("quarantined")
    flagged_ids = [c for c in clients if reasons[c]]
    newly = reputation.observe(round_no, [c for c in clients if c in verdict.flagged])
    flagged = tuple(
        FlaggedClient(c, _score(verdict.scores.get(c, {})), tuple(reasons[c])) for c in flagged_ids
    )
    kept = tuple(c for c in clients if not reasons[c])
    return RoundVerdict(kept, flagged, tuple(newly), f"{verdict.status}: {verdict.message}")


def _score(scores: Mapping[str, float]) -> float:
    """The largest robust z-score that fired (0 when the client was not scored, e.g. a
    non-finite or quarantined update)."""
    zs = [abs(v) for k, v in scores.items() if k.endswith("_z") and np.isfinite(v)]
    return float(max(zs)) if zs else 0.0
