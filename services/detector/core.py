"""The detector's pure core: one round's verdict from its updates and the job's reputation.

Detection itself is :func:`qflare.robust.detect` (Krum scores after Blanchard et al.,
NeurIPS 2017; distance/cosine to the geometric median; norm outliers; two-means
clustering after Auror, Shen et al., ACSAC 2016), followed by the evidence across rounds of
:meth:`qflare.robust.Reputation.review` (a consistently honest outlier let back in, a
client whose residual keeps changing direction flagged, at most f flagged; its history is
part of the reputation state the service persists). This module adds what a round needs
around it: the updates in client-id order (so the verdict does not depend on arrival
order), quarantine from :class:`qflare.robust.Reputation` (a client quarantined in earlier
rounds is dropped even when it behaves in this one), a score per flagged client, and the
"detection off" case, which keeps every update. A round too large for memory, kept in a
file, is judged in column blocks (:func:`decide_source`) with the verdict of the
in-memory round, bit for bit: both compute on one column grid (:func:`decide_rows` is
:func:`decide_source` over the rows in memory).

Where the job names its output layer (``JobSpec.output_layer``, resolved against the
model's layout by :meth:`OutputLayer.of`), each client's label consistency
(:func:`qflare.robust.detection.label_consistency`) is scored from those columns of its
row and goes to the review, whose running mean flags label flipping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qflare.messages.tensors import Layout, RoundRows, Rows, Tensors
from qflare.robust import Reputation, Verdict
from qflare.robust.blocks import (
    GRAM_GRID,
    ArrayBlocks,
    BlockSource,
    TapColumns,
    detect_view,
    grid_view,
)
from qflare.robust.detection import label_consistency


@dataclass(frozen=True)
class OutputLayer:
    """Where a model's output layer lies in its flat update (:class:`Layout` order): the
    weight [classes, hidden] from column ``weight_at``, the bias [classes] from ``bias_at``."""

    weight_at: int
    bias_at: int
    classes: int
    hidden: int

    @classmethod
    def of(cls, layout: Layout, names: tuple[str, str]) -> OutputLayer:
        """The output layer named (weight, bias) in ``layout``; ValueError naming the
        tensors the layout has when a name is missing or the shapes are not [C, H], [C]."""
        weight, bias = names
        offsets: dict[str, int] = {}
        at = 0
        for name, shape in zip(layout.names, layout.shapes, strict=True):
            offsets[name] = at
            at += int(np.prod(shape, dtype=np.int64))
        shapes = dict(zip(layout.names, layout.shapes, strict=True))
        for name in names:
            if name not in shapes:
                raise ValueError(
                    f"output_layer names {name!r}, which the model does not have; its tensors: "
                    f"{', '.join(layout.names)}"
                )
        ws, bs = shapes[weight], shapes[bias]
        if len(ws) != 2 or bs != ws[:1] or ws[0] < 2:
            raise ValueError(
                f"output_layer must name a weight [classes, hidden] and a bias [classes] with "
                f"at least 2 classes; {weight!r} has shape {list(ws)}, {bias!r} {list(bs)}"
            )
        return cls(offsets[weight], offsets[bias], int(ws[0]), int(ws[1]))

    @property
    def columns(self) -> npt.NDArray[np.intp]:
        """The weight's columns, then the bias's."""
        w = np.arange(self.weight_at, self.weight_at + self.classes * self.hidden)
        b = np.arange(self.bias_at, self.bias_at + self.classes)
        return np.concatenate([w, b]).astype(np.intp)

    def scores(
        self,
        clients: list[str],
        cols: npt.NDArray[np.floating],
        verdict: Verdict,
        suspects: frozenset[str] | set[str] = frozenset(),
    ) -> dict[str, float]:
        """Each client's label consistency from its row's :attr:`columns` (``cols``, [n,
        C * H + C]), the clients ``verdict`` (the round's other scores) flagged and the
        ``suspects`` (the quarantined, :meth:`Reputation.suspects`) left out of the
        consensus; the clients it cannot score are left out."""
        n, size = len(clients), self.classes * self.hidden
        weight = cols[:, :size].reshape(n, self.classes, self.hidden)
        flagged = set(verdict.flagged) | set(suspects)
        exclude = np.array([c in flagged for c in clients], dtype=bool)
        values = label_consistency(weight, cols[:, size:], verdict.f, exclude=exclude)
        return {c: float(v) for c, v in zip(clients, values, strict=True) if np.isfinite(v)}


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


def decide(
    round_no: int,
    updates: Mapping[str, Tensors],
    *,
    f: int,
    detection: bool,
    reputation: Reputation,
    malformed: int = 0,
    output_layer: tuple[str, str] | None = None,
    arrival: Mapping[str, float] | None = None,
) -> RoundVerdict:
    """The verdict over exactly ``updates`` (client -> delta tensors); updates
    ``reputation`` in place with this round's flags. ``malformed`` and ``arrival``: see
    :func:`decide_rows`; ``output_layer``: the job's (weight, bias) names (None: label
    consistency off)."""
    clients = sorted(updates)
    if not detection or not clients:
        return RoundVerdict(
            tuple(clients), (), (), "detection off" if not detection else "empty round"
        )
    rows = RoundRows(len(clients))
    for c in clients:
        rows.add((c, b""), updates[c])
    clients, x = rows.matrix([(c, b"") for c in clients])
    layout = rows.layout
    output = (
        None if output_layer is None or layout is None else OutputLayer.of(layout, output_layer)
    )
    return decide_rows(
        round_no,
        clients,
        x,
        f=f,
        reputation=reputation,
        malformed=malformed,
        output=output,
        arrival=arrival,
    )


def decide_rows(
    round_no: int,
    clients: list[str],
    x: Rows,
    *,
    f: int,
    reputation: Reputation,
    malformed: int = 0,
    output: OutputLayer | None = None,
    arrival: Mapping[str, float] | None = None,
) -> RoundVerdict:
    """The verdict with detection on over the updates ``x`` (one float32 row per client,
    in the order of ``clients``, sorted); updates ``reputation`` in place.

    ``arrival``: client -> where its update sits in the update stream (lower is earlier);
    of a group of copies larger than ``f`` it keeps the earliest, the original
    (:func:`~qflare.robust.detection.duplicate_groups`). None: every copy is flagged.

    ``malformed`` clients of the round were refused by ingest for their content
    (``round.closed.malformed``): with at most ``f`` Byzantine clients per round, at most
    ``f - malformed`` remain among ``x``, and detection assumes that many (its Krum
    neighbourhood and the at-most-f cap on flags). Without it, a round whose f attackers
    all sent non-finite updates had one honest outlier flagged in their place every round
    (the Inf attack at Dirichlet 0.1). ``output``: where the model's output layer lies in
    a row (None: label consistency off)."""
    if not clients:
        return RoundVerdict((), (), (), "empty round")
    # The rows as a block source read one grid chunk at a time: the same arithmetic, bit
    # for bit, as decide_source's over the same rows read in blocks of any size.
    return decide_source(
        round_no,
        clients,
        ArrayBlocks(x),
        f=f,
        reputation=reputation,
        malformed=malformed,
        block=GRAM_GRID,
        output=output,
        arrival=arrival,
    )


def decide_source(
    round_no: int,
    clients: list[str],
    src: BlockSource,
    *,
    f: int,
    reputation: Reputation,
    malformed: int = 0,
    block: int,
    output: OutputLayer | None = None,
    arrival: Mapping[str, float] | None = None,
) -> RoundVerdict:
    """:func:`decide_rows` over rows read in column blocks of ``block`` columns (a round
    kept in a file: :meth:`~qflare.runtime.spill.SpilledRows.source`), in one pass over
    them: the verdict of :func:`decide_rows`, bit for bit, whatever ``block``. Every
    detection score is a function of the rows' Gram matrix, accumulated on the column
    grid (:func:`~qflare.robust.blocks.grid_view`, whose chunks are assembled from the
    blocks; :func:`decide_rows` runs this on the rows in memory); the review reads only
    the reputation's sketch columns, gathered as the blocks pass, and which rows are
    finite, known from the Gram matrix's diagonal; the output layer's columns
    (``output``) are gathered in the same pass."""
    if not clients:
        return RoundVerdict((), (), (), "empty round")
    n, d = src.shape
    if n != len(clients):
        raise ValueError(f"{n} rows for {len(clients)} clients")
    f_left = max(0, f - malformed)
    sketch = reputation.sketch_columns(d)
    wanted = sketch if output is None else np.concatenate([sketch, output.columns])
    tap = TapColumns(src, wanted)
    view = grid_view(tap, block)
    if arrival is not None and set(arrival) != set(clients):
        raise ValueError(f"arrival names {sorted(arrival)}, the rows are of {clients}")
    order = None if arrival is None else [float(arrival[c]) for c in clients]
    detected = detect_view(view, f_left, ids=clients, arrival=order)  # one pass over the blocks
    got = tap.columns
    # the quarantined clients stay out of the label consensus too: a noisy coalition that
    # the round's own scores stop seeing (quarantined on its history from then on) would
    # otherwise set it again
    labels = (
        None
        if output is None
        else output.scores(
            clients, got[:, len(sketch) :], detected, reputation.suspects(round_no, clients)
        )
    )
    # a consistently honest outlier (non-IID data) is let back in by its own history
    verdict = reputation.review_sketch(
        round_no, clients, got[:, : len(sketch)], view.finite, detected, labels
    )
    return _outcome(round_no, clients, verdict, reputation)


def _outcome(
    round_no: int, clients: list[str], verdict: Verdict, reputation: Reputation
) -> RoundVerdict:
    """The round's verdict from the reviewed detection: quarantined clients dropped too,
    this round's flags observed by ``reputation``."""
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
