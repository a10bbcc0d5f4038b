"""The aggregator's pure core: client selection, the round state machine's decisions,
and the deterministic robust + DP aggregation of one round.

Nothing here does I/O; the shell (``service.py``) feeds it stored rows and arrays.

* Selection is Poisson sampling at rate ``q`` (each enrolled client independently), the
  sampling that the privacy amplification of DP-SGD/DP-FedAvg assumes (Abadi et al., "Deep
  Learning with Differential Privacy", CCS 2016; McMahan et al., "Learning Differentially
  Private Recurrent Language Models", ICLR 2018). It is seeded per (job, round) from the
  job's secret seed, so a restarted aggregator selects the same clients. Clients the
  revocation list names (the shell passes their ids to :func:`step`) are not selected, and a
  round open when one of its clients is revoked neither waits for it nor uses its update; the
  round's DP denominator ``q*N`` counts the ``N`` clients it sampled from
  (``Round.population``; docs/architecture.md, "Revocation").
* Sampling coins and noise come from :class:`qflare.privacy.NoiseSource`
  (:func:`qflare.privacy.poisson_sample`), seeded per (job, round, purpose).
* Aggregation is :func:`qflare.privacy.dp_fedavg` over the kept updates (deltas from the
  round's base model) as the rows of one float32 matrix in client-id order, with the job's
  robust rule (``qflare.robust``) as the combining step: clip each row to ``C``, combine,
  clip the result, scale by the number kept, add N(0, (zC)^2) and divide by the expected
  number of participants ``q*N`` (DP off: by the number kept); docs/architecture.md, "One
  round" step 7, and docs/privacy.md. With adaptive clipping (the job's ``adaptive_clip``)
  the round also yields the next round's clip norm, its count noise seeded per (job, round)
  too: a round's clip is ``Round.clip``, set when the round begins from what the previous
  round's aggregation gave (round 1: the job's ``clip``), and it is the clip the round's
  privacy request, announcement and aggregation use. The same inputs give the same model
  and the same next clip bit for bit.
* The same round block by block (:func:`aggregate_blocks`, :func:`aggregate_source`): the
  kept rows read from a block source (a memmap, a raw file) a few columns at a time, never
  n x d in memory, give the model of :func:`aggregate_rows` bit for bit whatever the block
  size, because both compute on one column grid (:data:`GRID`): the clip norms per grid
  chunk (:data:`qflare.privacy.mechanism.NORM_CHUNK`), the rule through
  :mod:`qflare.robust.blocks`, the noise drawn chunk after chunk from the same generator.
* The round itself is a pure state machine (:func:`step`, docs/architecture.md "One
  round"): a frozen :class:`Round` and one input (:data:`Input`: a grant, a denial, an
  accepted or refused update, a verdict, a tick, a restart) give the new :class:`Round` and
  the effects to perform (:data:`Effect`: announce, close, aggregate, publish, request,
  end, alert, reject). The aggregator service loads the round from its store, steps it,
  persists the new state with a compare-and-set, then performs the effects; the
  simulator's ``--direct`` mode drives the same machine in a loop, so the two cannot drift
  (cosmicpython's functional core and imperative shell; docs/architecture.md, "One round").
* A round's metrics (:func:`round_metrics`) are what its kept participants reported, each
  name's mean weighted by the reporters' sample counts (training metrics) or example
  counts (their evaluations of the round's base model).
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from qflare.messages.bodies import Coverage, Evaluation
from qflare.messages.errors import MALFORMED_UPDATE, Reason
from qflare.messages.jobs import JobSpec
from qflare.messages.tensors import Array, Layout, RoundRows, Rows, Tensors
from qflare.messages.values import MAX_METRICS
from qflare.privacy import AdaptiveClipping, NoiseSource, dp_fedavg, next_clip, poisson_sample
from qflare.privacy.errors import INVALID_PARAMETERS, PrivacyError
from qflare.privacy.mechanism import (
    NORM_CHUNK,
    Release,
    clip_factor,
    l2_norm,
    norm_of_sums,
    square_sums,
)
from qflare.privacy.policy import adaptive_of, charge_of, expected_participants
from qflare.robust import Aggregator, get_rule, has_blockwise_form
from qflare.robust import blocks as rb

# Distinct streams drawn from one job seed (SeedSequence spawn keys).
_SELECT = 1
_NOISE = 2
_RULE = 3
_CLIP = 4


class RoundState(enum.StrEnum):
    """Where a round is. ``REQUESTED``: privacy.request sent, waiting for the grant;
    ``OPEN``: collecting updates; ``CLOSED``: round.closed sent, waiting for the verdict;
    ``PUBLISHED``: the new model is stored and announced; ``DENIED``/``ABORTED``: the job ended
    in this round."""

    REQUESTED = "requested"
    OPEN = "open"
    CLOSED = "closed"
    PUBLISHED = "published"
    DENIED = "denied"
    ABORTED = "aborted"


class CloseDecision(enum.StrEnum):
    WAIT = "wait"
    CLOSE = "close"
    EXTEND = "extend"
    ABORT = "abort"


def _job_word(job: str) -> int:
    return int.from_bytes(hashlib.sha256(job.encode()).digest()[:8], "big")


def round_seed(seed: int, job: str, round_no: int, stream: int) -> int:
    """A 256-bit seed for one (job, round, purpose), derived from the job's secret seed."""
    ss = np.random.SeedSequence(entropy=seed, spawn_key=(_job_word(job), round_no, stream))
    return int.from_bytes(ss.generate_state(8, np.uint32).tobytes(), "little")


def round_rng(seed: int, job: str, round_no: int, stream: int) -> np.random.Generator:
    """A generator for one (job, round, purpose), derived from the job's secret seed."""
    return np.random.Generator(np.random.PCG64(round_seed(seed, job, round_no, stream)))


def round_noise(seed: int, job: str, round_no: int, stream: int) -> NoiseSource:
    """qflare.privacy's noise source for one (job, round, purpose)."""
    return NoiseSource(round_seed(seed, job, round_no, stream))


def select_participants(
    participants: Sequence[str],
    q: float,
    seed: int,
    job: str,
    round_no: int,
    revoked: Collection[str] = frozenset(),
) -> tuple[str, ...]:
    """Poisson sampling: each client not ``revoked`` in independently with probability
    ``q``. Every enrolled client draws its coin, revoked or not, so a revocation changes no
    one else's selection."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sample rate q must be in (0, 1], got {q}")
    ordered = sorted(participants)
    if q < 1.0:
        ordered = list(poisson_sample(ordered, q, round_noise(seed, job, round_no, _SELECT)))
    return tuple(c for c in ordered if c not in revoked)


def sampled_population(spec: JobSpec, revoked: Collection[str] = frozenset()) -> int:
    """How many of the job's enrolled clients a round samples from: those not revoked."""
    return sum(1 for c in spec.participants if c not in revoked)


def close_decision(
    *,
    received: int,
    selected: int,
    refused: int = 0,
    min_updates: int,
    now: float,
    deadline: float,
    extensions: int,
    max_extensions: int,
    on_short: str,
) -> CloseDecision:
    """Close when every selected client is in (at once when nobody was selected), or at the
    deadline with at least ``min_updates`` (or everyone selected, when fewer were selected); otherwise extend up to
    ``max_extensions`` times, then abort (or abort at once when ``on_short == "abort"``).

    ``refused`` counts selected clients with no update in the round whose update ingest
    refused: they answered, so once ``received + refused`` covers everyone selected the round
    closes before its deadline, provided it has its ``min_updates`` (otherwise it waits: a
    refused client may still send a valid update)."""
    enough = received >= min(min_updates, selected) and received > 0
    if received >= selected:
        # everyone is in; with nobody sampled the round closes at once and releases noise
        # only (DP-FedAvg: whether anyone was sampled must not change what is released)
        return CloseDecision.CLOSE
    if received + refused >= selected and enough:
        return CloseDecision.CLOSE
    if now < deadline:
        return CloseDecision.WAIT
    if enough:
        return CloseDecision.CLOSE
    if on_short == "extend" and extensions < max_extensions:
        return CloseDecision.EXTEND
    return CloseDecision.ABORT


def cap_removals(
    kept: Sequence[str], flagged: Sequence[tuple[str, float]], bound: int | None
) -> tuple[list[str], list[str]]:
    """Apply a job's ``dp_filter_bound``: of the ``(client, score)`` pairs the detector
    flagged, remove only the ``bound`` highest-scored (ties by client id) and keep the rest
    with ``kept``. Returns (kept, removed), each sorted. ``bound`` None removes every flagged
    client. This is what makes "at most k removed per round" (docs/privacy.md) true whatever
    the detector decides."""

    def suspicion(cs: tuple[str, float]) -> tuple[float, str]:
        # a NaN score counts as most suspicious, never silently least
        return (-(math.inf if math.isnan(cs[1]) else cs[1]), cs[0])

    order = [c for c, _s in sorted(flagged, key=suspicion)]
    removed = order if bound is None else order[:bound]
    back = order[len(removed) :]
    return sorted([*kept, *back]), sorted(removed)


@runtime_checkable
class SpanReader(Protocol):
    """A model read a range of its flat (layout-order) values at a time, e.g. a model file
    (:class:`qflare.runtime.modelfile.ModelFile`)."""

    @property
    def layout(self) -> Layout: ...

    def read(self, a: int, b: int, dtype: npt.DTypeLike = ...) -> npt.NDArray[Any]: ...


class SpanWriter(Protocol):
    """Where a new model's flat values go, a range at a time (cast to each tensor's dtype)."""

    def write_values(self, a: int, values: npt.ArrayLike) -> None: ...


class SpanStore(SpanWriter, Protocol):
    """A vector of values written and read back a range at a time."""

    def read(self, a: int, b: int, dtype: npt.DTypeLike = ...) -> npt.NDArray[Any]: ...


@dataclass(frozen=True)
class AggregationResult:
    model: dict[str, Array]
    kept: tuple[str, ...]
    update_norm: float  # L2 norm of the applied step (after noise), for metrics
    next_clip: float  # the clip norm of the next round (the same as this one's unless adaptive)


def aggregate_round(
    *,
    job: str,
    round_no: int,
    seed: int,
    base: Tensors,
    updates: Mapping[str, Tensors],
    kept: Sequence[str],
    rule: str,
    f: int,
    clip: float,
    noise_multiplier: float,
    expected_clients: float,
    server_lr: float = 1.0,
    adaptive: AdaptiveClipping | None = None,
) -> AggregationResult:
    """The new model after one round: ``base + lr * (robust(clipped kept) * n + noise) /
    denominator`` (:func:`qflare.privacy.dp_fedavg`; the denominator is
    ``expected_clients`` with DP on, the number kept with DP off). Deterministic for equal
    inputs (kept sorted, noise seeded per (job, round)).

    ``updates`` maps client id -> delta tensors; only ``kept`` clients enter. ``f`` is
    passed to the rule when it takes one (capped so that ``2f < n`` holds for the kept set).
    ``clip`` is this round's clip norm; with ``adaptive`` the result's ``next_clip`` is the
    next round's (its count noise seeded per (job, round) as well).
    """
    layout = Layout.of(base)
    chosen = tuple(sorted(set(kept)))
    missing = [c for c in chosen if c not in updates]
    if missing:
        raise ValueError(f"kept clients {missing} have no stored update")
    rows = RoundRows(max(1, len(chosen)), chosen, layout)
    for c in chosen:
        rows.add((c, b""), updates[c])
    clients, x = rows.matrix([(c, b"") for c in chosen])
    return aggregate_rows(
        job=job,
        round_no=round_no,
        seed=seed,
        base=base,
        clients=clients,
        rows=x,
        rule=rule,
        f=f,
        clip=clip,
        noise_multiplier=noise_multiplier,
        expected_clients=expected_clients,
        server_lr=server_lr,
        adaptive=adaptive,
    )


def aggregate_rows(
    *,
    job: str,
    round_no: int,
    seed: int,
    base: Tensors,
    clients: Sequence[str],
    rows: Rows,
    rule: str,
    f: int,
    clip: float,
    noise_multiplier: float,
    expected_clients: float,
    server_lr: float = 1.0,
    adaptive: AdaptiveClipping | None = None,
) -> AggregationResult:
    """:func:`aggregate_round` over the kept updates already flattened: ``rows`` holds one
    float32 row per client of ``clients`` (client-id order, the order
    :meth:`RoundRows.matrix <qflare.messages.tensors.RoundRows.matrix>` gives), in
    :class:`Layout` order of ``base``. The rows are clipped in place."""
    layout = Layout.of(base)
    chosen = tuple(clients)
    if list(chosen) != sorted(set(chosen)):
        raise ValueError(f"rows must be of distinct clients in client-id order, got {chosen}")
    if rows.shape != (len(chosen), layout.size) and not (len(chosen) == 0 and rows.size == 0):
        raise ValueError(
            f"{len(chosen)} rows of {layout.size} values needed, got shape {rows.shape}"
        )
    if expected_clients <= 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients}")
    x = rows if rows.shape[0] else np.empty((0, layout.size), np.float32)

    def combine(rows: npt.NDArray[np.floating[Any]]) -> npt.ArrayLike:
        agg = _round_rule(rule, f, rows.shape[0])
        rng = round_rng(seed, job, round_no, _RULE)
        if not has_blockwise_form(agg):
            # a plug-in rule with no block-wise form runs in memory, as it was written
            # (aggregate_blocks refuses it: BlockwiseUnsupported)
            return agg(rows, rng=rng)
        # on the grid, as aggregate_blocks runs it: the same bits whatever the block size
        return rb.aggregate_blocks(agg, rb.GridBlocks(rows, rows.shape[1]), GRID, rng=rng)

    dp = dp_fedavg(
        x,
        combine,
        clip=clip,
        noise_multiplier=noise_multiplier,
        expected_clients=expected_clients,
        noise=round_noise(seed, job, round_no, _NOISE),
        adaptive=adaptive,
        clip_noise=round_noise(seed, job, round_no, _CLIP) if adaptive is not None else None,
    )
    step = dp.step
    step *= server_lr
    base_flat = layout.flatten(base, dtype=np.float64)
    new = layout.unflatten(base_flat + step)
    return AggregationResult(new, chosen, l2_norm(step), dp.next_clip)


#: The column grid of a round's arithmetic: the rule (its Gram matrix and its combination),
#: the L2 norms (:data:`qflare.privacy.mechanism.NORM_CHUNK`) and the noise run chunk by
#: chunk on it, in memory or block by block, so the model does not depend on the block size.
GRID = NORM_CHUNK


def aggregate_blocks(
    *,
    job: str,
    round_no: int,
    seed: int,
    base: Tensors | SpanReader,
    clients: Sequence[str],
    rows: rb.BlockSource | Rows | None,
    block: int,
    rule: str,
    f: int,
    clip: float,
    noise_multiplier: float,
    expected_clients: float,
    server_lr: float = 1.0,
    adaptive: AdaptiveClipping | None = None,
    out: SpanWriter | None = None,
    scratch: SpanStore | None = None,
) -> AggregationResult:
    """:func:`aggregate_rows` over rows read ``block`` columns at a time (a
    :class:`~qflare.robust.blocks.BlockSource`, e.g. a memmap or a raw file, or an array):
    the same :class:`AggregationResult`, bit for bit, for every block size, with nothing of
    size n x d in memory (O(n * (block + GRID)) and the combined vector, d values of the
    rows' dtype, besides the new model). The rows are not modified.

    Three passes over the rows, each on the :data:`GRID` chunks (:class:`GridBlocks
    <qflare.robust.blocks.GridBlocks>`): the rows' chunk sums of squares give the norms
    and clip factors of :func:`~qflare.privacy.mechanism.clip_rows`; the rule's Gram matrix
    (when it reads geometry, :func:`qflare.robust.blocks.plan_blocks`); the rule's result
    over the clipped chunks (:func:`~qflare.robust.blocks.iter_aggregate`). Then, chunk by
    chunk, the result is clipped, released (:class:`~qflare.privacy.mechanism.Release`,
    the noise drawn from the round's source chunk after chunk: the same stream as one
    draw) and added to ``base``. Adaptive clipping's count noise is drawn as
    :func:`aggregate_rows` draws it.

    For a model too large to hold (docs/architecture.md, "Large models"): ``base`` may be
    a :class:`SpanReader` (a model file read range by range), ``out`` a
    :class:`SpanWriter` that takes the new model's values chunk by chunk instead of a dict
    (the result's ``model`` is then empty), and ``scratch`` a :class:`SpanStore` of d
    values that holds the combined vector instead of memory. The values are the same, bit
    for bit."""
    layout = base.layout if isinstance(base, SpanReader) else Layout.of(base)
    chosen = tuple(clients)
    if list(chosen) != sorted(set(chosen)):
        raise ValueError(f"rows must be of distinct clients in client-id order, got {chosen}")
    if isinstance(block, bool) or not isinstance(block, int | np.integer) or block < 1:
        raise ValueError(f"block size must be an int >= 1, got {block!r}")
    if expected_clients <= 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients}")
    n, d = len(chosen), layout.size
    src = _block_source(rows, n, d)
    release = Release.of(
        n,
        clip=clip,
        noise_multiplier=noise_multiplier,
        expected_clients=expected_clients,
        adaptive=adaptive,
    )
    grid = list(rb.spans(d, GRID))
    norms = np.zeros(0, dtype=np.float64)
    combined: npt.NDArray[np.floating[Any]] | None = None
    combined_factor: float | None = None
    if src is not None:
        read = rb.GridBlocks(src, int(block))
        norms, factors = _clip_factors(read, grid, clip)
        clipped = _Clipped(read, factors)
        combined = np.empty(d if scratch is None else 0, dtype=src.dtype)
        sums = np.empty(len(grid), dtype=np.float64)
        agg = _round_rule(rule, f, n)
        rng = round_rng(seed, job, round_no, _RULE)
        for k, (a, part) in enumerate(rb.iter_aggregate(agg, clipped, GRID, rng=rng)):
            if scratch is None:
                combined[a : a + len(part)] = part
            else:
                scratch.write_values(a, part)
            sums[k] = square_sums(part.reshape(1, -1))[0]
        combined_factor = clip_factor(norm_of_sums(sums), clip, np.float64)
    noise = round_noise(seed, job, round_no, _NOISE)
    model: dict[str, Array] = (
        {name: np.empty(shape, dtype=dtype) for name, shape, dtype in layout.entries()}
        if out is None
        else {}
    )
    step_sums = np.empty(len(grid), dtype=np.float64)
    for k, (a, b) in enumerate(grid):
        ours = None
        if combined is not None:
            held = combined[a:b] if scratch is None else scratch.read(a, b, combined.dtype)
            ours = held.astype(np.float64)
        if ours is not None and combined_factor is not None:
            ours *= combined_factor  # as clip_rows scales the float64 combined vector
        step = release.step(ours, b - a, noise)
        step *= server_lr
        step_sums[k] = square_sums(step.reshape(1, -1))[0]
        if isinstance(base, SpanReader):
            new = base.read(a, b, np.float64) + step
        else:
            new = _base_span(layout, base, a, b) + step
        if out is None:
            _write_span(layout, model, a, new)
        else:
            out.write_values(a, new)
    following = next_clip(
        clip,
        norms,
        adaptive=adaptive,
        expected_clients=expected_clients,
        noise_multiplier=noise_multiplier,
        noise=round_noise(seed, job, round_no, _CLIP),
    )
    return AggregationResult(model, chosen, norm_of_sums(step_sums), following)


def aggregate_source(
    spec: JobSpec,
    command: Aggregate,
    base: Tensors | SpanReader,
    clients: Sequence[str],
    rows: rb.BlockSource | Rows | None,
    block: int,
    *,
    out: SpanWriter | None = None,
    scratch: SpanStore | None = None,
) -> AggregationResult:
    """:func:`aggregate_matrix` over rows read ``block`` columns at a time
    (:func:`aggregate_blocks`): the same model, bit for bit (into ``out``, with the
    combined vector in ``scratch``, when given: see :func:`aggregate_blocks`)."""
    if tuple(clients) != tuple(sorted(set(command.kept))):
        raise ValueError(f"rows of {list(clients)}, the round keeps {list(command.kept)}")
    return aggregate_blocks(
        base=base,
        clients=clients,
        rows=rows,
        block=block,
        out=out,
        scratch=scratch,
        **_round_arithmetic(spec, command),
    )


def _block_source(rows: rb.BlockSource | Rows | None, n: int, d: int) -> rb.BlockSource | None:
    """The kept rows as a block source (None when nothing was kept), their shape checked."""
    shape = None if rows is None else tuple(rows.shape)
    if n == 0:
        if shape is not None and shape != (0, d) and math.prod(shape) != 0:
            raise ValueError(f"no rows kept, got rows of shape {shape}")
        return None
    if rows is None or shape != (n, d):
        raise ValueError(f"{n} rows of {d} values needed, got shape {shape}")
    src = rb.as_source(rows)
    if src.dtype not in (np.float32, np.float64):
        raise TypeError(f"rows must be float32 or float64, got {src.dtype}")
    return src


def _clip_factors(
    src: rb.BlockSource, grid: Sequence[tuple[int, int]], clip: float
) -> tuple[npt.NDArray[np.float64], list[float | None]]:
    """The rows' norms from their chunk sums of squares (what ``clip_rows`` computes row by
    row) and the factor clipping each to ``clip`` (None: inside)."""
    n = src.shape[0]
    sums = np.empty((n, len(grid)), dtype=np.float64)
    for k, (a, b) in enumerate(grid):
        sums[:, k] = square_sums(src.block(a, b))
    norms = np.array([norm_of_sums(sums[i]) for i in range(n)], dtype=np.float64)
    for i, norm in enumerate(norms):
        if not math.isfinite(norm):
            raise PrivacyError(INVALID_PARAMETERS, f"update {i} has non-finite values")
    return norms, [clip_factor(float(norm), clip, src.dtype) for norm in norms]


class _Clipped(rb.DerivedBlocks):
    """The rows of ``src`` each times its clip factor, block by block: the bits
    ``clip_rows`` leaves in place (a float32 row times the float32 factor)."""

    def __init__(self, src: rb.BlockSource, factors: Sequence[float | None]) -> None:
        super().__init__(src)
        self._scale = np.array([1.0 if c is None else c for c in factors], dtype=src.dtype)
        self._scaled = any(c is not None for c in factors)

    def block(self, start: int, stop: int) -> npt.NDArray[np.floating[Any]]:
        x = self._inner.block(start, stop)
        if not self._scaled:
            return x
        out: npt.NDArray[np.floating[Any]] = x * self._scale[:, None]
        return out


def _tensor_spans(layout: Layout, a: int, b: int) -> list[tuple[str, int, int, int]]:
    """(name, offset of the tensor, first, stop) of the layout's flat coordinates [a, b)
    that each tensor holds."""
    out = []
    offset = 0
    for name, shape, _dtype in layout.entries():
        size = math.prod(shape)
        lo, hi = max(a, offset), min(b, offset + size)
        if lo < hi:
            out.append((name, offset, lo, hi))
        offset += size
    return out


def _base_span(layout: Layout, base: Tensors, a: int, b: int) -> npt.NDArray[np.float64]:
    """Coordinates [a, b) of ``layout.flatten(base, dtype=np.float64)``."""
    out = np.empty(b - a, dtype=np.float64)
    for name, offset, lo, hi in _tensor_spans(layout, a, b):
        out[lo - a : hi - a] = np.asarray(base[name]).reshape(-1)[lo - offset : hi - offset]
    return out


def _write_span(layout: Layout, model: dict[str, Array], a: int, values: Any) -> None:
    """Write ``values`` at flat coordinates [a, a + len) of ``model`` (as ``unflatten``
    casts them)."""
    for name, offset, lo, hi in _tensor_spans(layout, a, a + len(values)):
        model[name].reshape(-1)[lo - offset : hi - offset] = values[lo - a : hi - a]


def _round_rule(rule: str, f: int, n: int) -> Aggregator:
    """The job's rule for ``n`` kept rows (``f`` capped so that 2f < n)."""
    f_eff = min(f, (n - 1) // 2)
    return get_rule(rule, f=f_eff) if _takes_f(rule) else get_rule(rule)


def _takes_f(rule: str) -> bool:
    try:
        get_rule(rule, f=0)
    except (TypeError, ValueError):
        return False
    return True


def aggregate(
    spec: JobSpec, command: Aggregate, base: Tensors, updates: Mapping[str, Tensors]
) -> AggregationResult:
    """Perform an :class:`Aggregate` effect of job ``spec``: :func:`aggregate_round` over the
    kept updates with the job's rule, noise, denominator (``max(q*N, 1)``,
    :func:`expected_participants`) and adaptive clipping (:func:`adaptive_of`), at the
    round's clip norm (``command.clip``; the job's ``clip`` when it names none), the one
    place where a job's settings become the round's arithmetic."""
    return aggregate_round(
        base=base, updates=updates, kept=command.kept, **_round_arithmetic(spec, command)
    )


def aggregate_matrix(
    spec: JobSpec, command: Aggregate, base: Tensors, clients: Sequence[str], rows: Rows
) -> AggregationResult:
    """:func:`aggregate` over the kept updates as rows (:func:`aggregate_rows`: one float32
    row per kept client, in client-id order, clipped in place): the same model, bit for
    bit, as :func:`aggregate` over the same updates."""
    if tuple(clients) != tuple(sorted(set(command.kept))):
        raise ValueError(f"rows of {list(clients)}, the round keeps {list(command.kept)}")
    return aggregate_rows(base=base, clients=clients, rows=rows, **_round_arithmetic(spec, command))


def _round_arithmetic(spec: JobSpec, command: Aggregate) -> dict[str, Any]:
    """The arguments of :func:`aggregate_round` a job's settings and the round give."""
    return {
        "job": spec.job_id,
        "round_no": command.round,
        "seed": spec.seed,
        "rule": spec.rule,
        "f": spec.f,
        "clip": spec.clip if command.clip is None else command.clip,
        "noise_multiplier": spec.noise_multiplier,
        "expected_clients": expected_participants(
            spec.sample_rate,
            len(spec.participants) if command.population is None else command.population,
        ),
        "server_lr": spec.server_lr,
        "adaptive": adaptive_of(spec),
    }


# -- a round's metrics --------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """What one kept update says besides its tensors: its sample count, its training
    metrics, and its evaluation of the round's base model (if the participant ran one)."""

    client: str
    num_samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    evaluation: Evaluation | None = None


def weighted_means(
    entries: Sequence[tuple[float, Mapping[str, float]]], limit: int = MAX_METRICS
) -> dict[str, float]:
    """Per name, the mean of the values weighted by the weight of each entry that reports
    the name (an entry without it is not a zero). At most ``limit`` names: those with the
    most weight behind them (ties by name), so a participant inventing names cannot grow
    the result. Sums run in the entries' order, exactly (``math.fsum``)."""
    weight: dict[str, list[float]] = {}
    total: dict[str, list[float]] = {}
    for w, metrics in entries:
        for name, value in metrics.items():
            weight.setdefault(name, []).append(w)
            total.setdefault(name, []).append(w * value)
    kept = sorted(weight, key=lambda name: (-math.fsum(weight[name]), name))[:limit]
    return {name: math.fsum(total[name]) / math.fsum(weight[name]) for name in sorted(kept)}


def round_metrics(reports: Sequence[Report], base_version: int) -> dict[str, Any]:
    """The round's weighted metrics from its kept updates (in client order), as stored and
    published: ``train`` (clients, num_samples, metrics) over the updates with training
    metrics, weighted by num_samples; ``evaluate`` (model_version = ``base_version``,
    clients, num_examples, loss, metrics) over the updates with an evaluation, weighted by
    num_examples. A part nobody reported is absent."""
    ordered = sorted(reports, key=lambda r: r.client)
    out: dict[str, Any] = {}
    train = [(float(r.num_samples), r.metrics) for r in ordered if r.metrics]
    if train:
        out["train"] = {
            "clients": len(train),
            "num_samples": int(sum(w for w, _m in train)),
            "metrics": weighted_means(train),
        }
    evals = [r.evaluation for r in ordered if r.evaluation is not None]
    if evals:
        weights = [float(e.num_examples) for e in evals]
        out["evaluate"] = {
            "model_version": base_version,
            "clients": len(evals),
            "num_examples": sum(e.num_examples for e in evals),
            "loss": math.fsum(w * e.loss for w, e in zip(weights, evals, strict=True))
            / math.fsum(weights),
            "metrics": weighted_means(
                [(w, e.metrics) for w, e in zip(weights, evals, strict=True)]
            ),
        }
    return out


# -- the round as a state machine ------------------------------------------------------------
#
#   REQUESTED --Granted--> OPEN --all in / all in or refused / deadline--> CLOSED
#       |                   |  \--deadline, too few--> OPEN (extended) | ABORTED
#       \--Denied--> DENIED  \                    CLOSED --Verdict--> PUBLISHED
#
# ``step`` is a pure function of (job spec, round, input, now); it never reads a clock or a
# store. Every input that was already applied is answered with no change and no effect (a
# redelivery), so the shell can acknowledge it; an input that must be refused yields one
# :class:`Reject` and no change.


@dataclass(frozen=True)
class Held:
    """The update a round holds for ``client``: the digest ingest accepted and where its
    bytes sit in the job's update stream."""

    client: str
    digest: bytes
    offset: int
    num_samples: int = 0


UpdateRef = tuple[str, bytes, int]  # (client, digest, stream offset)


@dataclass(frozen=True)
class Round:
    """One round of one job, as stored. ``held`` (sorted by client, first wins per client)
    and ``refused`` (client, reason; the first refusal kept) are what the round collected
    while OPEN; ``closed`` is the exact (client, digest, offset) set ``round.closed`` named;
    ``kept``/``removed`` are the verdict after ``dp_filter_bound``; ``updated`` is when the
    state last moved (a stale round is re-announced). ``clip`` is the round's clip norm
    (:func:`begin`; None: the job's ``clip``, see :func:`round_clip`)."""

    job: str
    round: int
    state: RoundState
    base_version: int
    participants: tuple[str, ...] = ()
    deadline: float | None = None
    extensions: int = 0
    epsilon: float | None = None
    updates_from: int = 0
    held: tuple[Held, ...] = ()
    refused: tuple[tuple[str, str], ...] = ()
    closed: tuple[UpdateRef, ...] | None = None
    kept: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    updated: float = 0.0
    #: how many enrolled clients the round's selection sampled from (those not revoked at
    #: its grant): the N of its DP denominator q*N (None: all, a round stored before)
    population: int | None = None
    clip: float | None = None

    def holding(self, client: str) -> Held | None:
        return next((h for h in self.held if h.client == client), None)


# -- inputs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Granted:
    """``privacy.granted``: the round may run, the job's epsilon is then ``epsilon``;
    ``updates_from`` is where the round's updates can start in the update stream."""

    epsilon: float
    updates_from: int = 0


@dataclass(frozen=True)
class Denied:
    """``privacy.denied``: the round would exceed the job's budget."""

    reason: str
    epsilon_spent: float = 0.0
    budget: float = 0.0


@dataclass(frozen=True)
class Accepted:
    """``update.accepted``: ingest checked ``client``'s update, the bytes at ``offset``."""

    client: str
    digest: bytes
    offset: int
    num_samples: int
    base_version: int


#: Refusals that are not the client's answer to the round: an update computed on another
#: model than the round's was trained before the client had the round's model (sent before
#: the round opened, which ingest holds until it opens, or on an old announcement). Counting
#: it would let a client's early message close the round before its real update, so the
#: round waits for such a client as for a silent one (until its deadline).
NOT_AN_ANSWER = frozenset({Reason.STALE_BASE})


@dataclass(frozen=True)
class Refused:
    """``update.rejected`` naming a client (its signature verified): the client answered,
    unless the reason is one of :data:`NOT_AN_ANSWER`."""

    client: str
    reason: str


@dataclass(frozen=True)
class Verdict:
    """``round.verdict``: the detector's kept clients and flagged (client, score) pairs."""

    kept: tuple[str, ...]
    flagged: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Tick:
    """The clock moved: an open round checks its deadline. With ``remind_after`` (seconds)
    it is also a re-announcement pass: an open round is announced again (events only), and
    a round whose state has not moved for ``remind_after`` re-sends what it waits for (a
    publish may have been lost)."""

    remind_after: float | None = None


@dataclass(frozen=True)
class Restart:
    """The shell (re)started: re-send whatever the round waits for."""


Input = Granted | Denied | Accepted | Refused | Verdict | Tick | Restart


# -- effects ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Note:
    """Something happened that the shell logs (a structured event), nothing to send."""

    event: str
    fields: Mapping[str, str | int | float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestPrivacy:
    """Send ``privacy.request`` for the round: the (q, z) to charge and what it covers."""

    q: float
    z: float
    clip: float
    coverage: Coverage


@dataclass(frozen=True)
class OpenUnaccounted:
    """DP off: nothing to account. The shell grants the round itself at once (step
    ``Granted(epsilon=inf)``); epsilon is unbounded and reported as such."""


@dataclass(frozen=True)
class Announce:
    """Send ``round.opened`` on events and, with ``broadcast``, into the job's broadcast
    stream (a participant that connects late reads it there)."""

    broadcast: bool
    base_version: int
    participants: tuple[str, ...]
    deadline: float
    min_updates: int
    updates_from: int
    clip: float


@dataclass(frozen=True)
class Close:
    """Send ``round.closed`` with exactly these (client, digest, offset), and the number of
    selected clients refused for a malformed update (``MALFORMED_UPDATE``) with none kept."""

    updates: tuple[UpdateRef, ...]
    malformed: int = 0


@dataclass(frozen=True)
class Aggregate:
    """Compute the round's model from ``base_version`` and the kept updates (``updates``:
    their refs) with :func:`aggregate` at clip norm ``clip`` (None: the job's), and store it
    with the PUBLISHED state and the next round's clip in one transaction (the shell's
    commit of this step)."""

    round: int
    base_version: int
    kept: tuple[str, ...]
    removed: tuple[str, ...]
    updates: tuple[UpdateRef, ...]
    population: int | None = field(default=None, kw_only=True)  # the round's N (q*N)
    clip: float | None = None


@dataclass(frozen=True)
class Publish:
    """Send ``model.published`` for model ``version`` (stored)."""

    version: int


@dataclass(frozen=True)
class NextRound:
    """Create round ``round`` (on model ``base_version``) and request it (:func:`begin`)."""

    round: int
    base_version: int


@dataclass(frozen=True)
class EndJob:
    """Announce the job's end (final model, ``job.ended``) and mark the job ended."""

    reason: str
    detail: str


@dataclass(frozen=True)
class Alert:
    """Raise an alert about the round."""

    kind: str
    severity: str
    reason: str
    detail: str
    client: str | None = None


@dataclass(frozen=True)
class Reject:
    """Refuse the input (the shell dead-letters the message with this reason)."""

    reason: Reason
    detail: str


Effect = (
    Note
    | RequestPrivacy
    | OpenUnaccounted
    | Announce
    | Close
    | Aggregate
    | Publish
    | NextRound
    | EndJob
    | Alert
    | Reject
)
Step = tuple[Round, tuple[Effect, ...]]


# -- the machine --------------------------------------------------------------------------------


def begin(
    spec: JobSpec, round_no: int, base_version: int, now: float, clip: float | None = None
) -> Step:
    """A new round of ``spec`` on model ``base_version``: REQUESTED, and its request.
    ``clip`` is the round's clip norm: the ``next_clip`` the previous round's aggregation
    gave (adaptive clipping), None for the job's ``clip`` (round 1, or a fixed clip)."""
    if clip is not None and not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"round {round_no} of {spec.job_id}: clip norm {clip!r} must be > 0")
    r = Round(
        spec.job_id,
        round_no,
        RoundState.REQUESTED,
        base_version,
        updated=now,
        clip=spec.clip if clip is None else float(clip),
    )
    return r, (_request(spec, r),)


def round_clip(spec: JobSpec, r: Round) -> float:
    """The clip norm in effect in round ``r`` of ``spec``."""
    return spec.clip if r.clip is None else r.clip


def unknown_round(spec: JobSpec, round_no: int, event: Input) -> tuple[Effect, ...]:
    """The effects of ``event`` for a round of ``spec`` that does not exist (never
    requested): an update or a verdict for it is refused, anything else is dropped."""
    if isinstance(event, Accepted):
        return (_stale(spec, round_no),)
    if isinstance(event, Verdict):
        return (Reject(Reason.STALE_ROUND, f"round {round_no} is not waiting for a verdict"),)
    return ()


def step(
    spec: JobSpec, r: Round, event: Input, now: float, revoked: Collection[str] = frozenset()
) -> Step:
    """The round ``r`` of job ``spec`` after ``event`` at time ``now``, and what to do.
    ``revoked``: the ids the revocation list names (the shell's current copy); they are not
    selected, and an open round neither waits for nor keeps an update of theirs."""
    match event:
        case Granted():
            return _granted(spec, r, event, now, revoked)
        case Denied():
            return _denied(r, event, now)
        case Accepted():
            return _accepted(spec, r, event, now, revoked)
        case Refused():
            return _refused(spec, r, event, now, revoked)
        case Verdict():
            return _verdict(spec, r, event, now)
        case Tick():
            return _tick(spec, r, event, now, revoked)
        case Restart():
            return r, _remind(spec, r, restart=True)


def _request(spec: JobSpec, r: Round) -> RequestPrivacy | OpenUnaccounted:
    if spec.noise_multiplier == 0:
        return OpenUnaccounted()
    # the charged (q, z) and coverage per docs/privacy.md (the noise added stays z * C, or
    # z_delta * C on the sum plus the count's with adaptive clipping), at the round's clip
    charge = charge_of(spec)
    return RequestPrivacy(
        q=charge.q, z=charge.z, clip=round_clip(spec, r), coverage=charge.coverage
    )


def _stale(spec: JobSpec, round_no: int) -> Reject:
    return Reject(Reason.STALE_ROUND, f"round {round_no} of {spec.job_id} is not open")


def _announce(spec: JobSpec, r: Round, *, broadcast: bool) -> Announce:
    assert r.deadline is not None
    return Announce(
        broadcast=broadcast,
        base_version=r.base_version,
        participants=r.participants,
        deadline=r.deadline,
        min_updates=max(1, min(spec.min_updates, len(r.participants))),
        updates_from=r.updates_from,
        clip=round_clip(spec, r),
    )


def _granted(spec: JobSpec, r: Round, g: Granted, now: float, revoked: Collection[str]) -> Step:
    if r.state != RoundState.REQUESTED:
        return r, ()  # a redelivered grant: the round moved on already
    participants = select_participants(
        spec.participants, spec.sample_rate, spec.seed, spec.job_id, r.round, revoked
    )
    population = sampled_population(spec, revoked)
    new = replace(
        r,
        state=RoundState.OPEN,
        participants=participants,
        deadline=now + spec.deadline_s,
        epsilon=g.epsilon,
        updates_from=g.updates_from,
        updated=now,
        population=population,
    )
    opened = Note(
        "round.opened",
        {"participants": len(participants), "population": population, "epsilon": g.epsilon},
    )
    return new, (opened, _announce(spec, new, broadcast=True))


def _denied(r: Round, d: Denied, now: float) -> Step:
    if r.state != RoundState.REQUESTED:
        return r, ()
    alert = Alert(
        kind="budget.exhausted",
        severity="warning",
        reason=d.reason,
        detail=f"epsilon spent {d.epsilon_spent:.4g} of {d.budget:.4g}; "
        f"round {r.round} not released",
    )
    end = EndJob("budget_exhausted", f"accountant denied round {r.round}: {d.reason}")
    return replace(r, state=RoundState.DENIED, updated=now), (alert, end)


def _accepted(spec: JobSpec, r: Round, a: Accepted, now: float, revoked: Collection[str]) -> Step:
    if r.state == RoundState.REQUESTED:
        return r, (_stale(spec, r.round),)
    held = r.holding(a.client)
    if r.state != RoundState.OPEN:
        if held is not None:
            return _again(r, held, a)
        return r, (
            Reject(
                Reason.ROUND_CLOSED, f"update of {a.client} for round {r.round} after it closed"
            ),
        )
    if a.client in revoked:
        # ingest accepted it before it read the new revocation list
        return r, (Reject(Reason.REVOKED, f"{a.client} is revoked"),)
    if a.client not in r.participants:
        return r, (
            Reject(Reason.NOT_PARTICIPANT, f"{a.client} is not selected for round {r.round}"),
        )
    if a.base_version != r.base_version:
        return r, (
            Reject(
                Reason.STALE_BASE,
                f"update on version {a.base_version}, round uses {r.base_version}",
            ),
        )
    if held is not None:
        return _again(r, held, a)
    entry = Held(a.client, a.digest, a.offset, a.num_samples)
    new = replace(r, held=tuple(sorted((*r.held, entry), key=lambda h: h.client)))
    note = Note("update.held", {"client": a.client, "offset": a.offset})
    return _then_settle(spec, new, (note,), now, revoked)


def _again(r: Round, held: Held, a: Accepted) -> Step:
    """A client the round holds an update of: the same digest again is the same update (a
    redelivered verdict, or ingest checking it twice after a restart), another digest a
    second submission."""
    if held.digest == a.digest:
        return r, ()
    return r, (Reject(Reason.DUPLICATE, f"{a.client} already has an update in round {r.round}"),)


def _refused(spec: JobSpec, r: Round, x: Refused, now: float, revoked: Collection[str]) -> Step:
    # Ingest reports every refusal; only a selected client of an open round counts (an
    # unverified sender is named "<id> (unverified)", no participant id), and only the first:
    # it does not ban, a later valid update of the client still enters while the round is open.
    if r.state != RoundState.OPEN or x.client not in r.participants:
        return r, ()
    if x.reason in NOT_AN_ANSWER:
        # logged, not counted: the round waits for the client as for a silent one
        return r, (
            Note("update.refused", {"client": x.client, "reason": x.reason, "answer": False}),
        )
    if any(c == x.client for c, _reason in r.refused):
        return r, ()
    new = replace(r, refused=tuple(sorted((*r.refused, (x.client, x.reason)))))
    note = Note("update.refused", {"client": x.client, "reason": x.reason})
    return _then_settle(spec, new, (note,), now, revoked)


def malformed_of(r: Round) -> int:
    """Selected clients of ``r`` refused for a malformed update (``MALFORMED_UPDATE``) that
    have no update held: ``round.closed.malformed``."""
    held = {h.client for h in r.held}
    return sum(1 for c, why in r.refused if c not in held and why in MALFORMED_UPDATE)


def _then_settle(
    spec: JobSpec, r: Round, before: tuple[Effect, ...], now: float, revoked: Collection[str]
) -> Step:
    new, effects = _settle(spec, r, now, revoked)
    return new, (*before, *effects)


def _settle(spec: JobSpec, r: Round, now: float, revoked: Collection[str]) -> Step:
    """An open round closes, extends its deadline, aborts, or waits (:func:`close_decision`).
    Its ``revoked`` clients are out of it: not waited for, their updates not closed over."""
    if r.state != RoundState.OPEN or r.deadline is None:
        return r, ()
    waiting = {c for c in r.participants if c not in revoked}
    held = [h for h in r.held if h.client in waiting]
    received = len(held)
    answered = {c for c, _reason in r.refused} - {h.client for h in held}
    decision = close_decision(
        received=received,
        selected=len(waiting),
        refused=len(answered & waiting),
        min_updates=spec.min_updates,
        now=now,
        deadline=r.deadline,
        extensions=r.extensions,
        max_extensions=spec.max_extensions,
        on_short=spec.on_short,
    )
    if decision == CloseDecision.WAIT:
        return r, ()
    if decision == CloseDecision.CLOSE:
        closed = tuple((h.client, h.digest, h.offset) for h in held)
        new = replace(r, state=RoundState.CLOSED, closed=closed, updated=now)
        fields = {"updates": len(closed)}
        if len(waiting) < len(r.participants):
            fields["revoked"] = len(r.participants) - len(waiting)
        malformed = malformed_of(r)
        if malformed:
            fields["malformed"] = malformed
        return new, (Note("round.closed", fields), Close(closed, malformed))
    if decision == CloseDecision.EXTEND:
        ext = r.extensions + 1
        new = replace(r, deadline=now + spec.deadline_s, extensions=ext, updated=now)
        alert = Alert(
            kind="round.extended",
            severity="info",
            reason="too_few_updates",
            detail=f"{received} of {len(waiting)} updates at the deadline; "
            f"extension {ext} of {spec.max_extensions}",
        )
        # announced again with the model: a participant that connected late gets its
        # chance in the extension; the SDK sends at most once per round
        return new, (alert, _announce(spec, new, broadcast=True))
    alert = Alert(
        kind="round.aborted",
        severity="critical",
        reason="too_few_updates",
        detail=f"{received} updates, {spec.min_updates} needed",
    )
    end = EndJob("too_few_updates", f"round {r.round} had {received} updates")
    return replace(r, state=RoundState.ABORTED, updated=now), (alert, end)


def _verdict(spec: JobSpec, r: Round, v: Verdict, now: float) -> Step:
    if r.state == RoundState.PUBLISHED:
        return r, ()  # a redelivered verdict
    if r.state != RoundState.CLOSED or r.closed is None:
        return r, (Reject(Reason.STALE_ROUND, f"round {r.round} is not waiting for a verdict"),)
    covered = sorted([*v.kept, *(c for c, _s in v.flagged)])
    closed = sorted(c for c, _d, _o in r.closed)
    if covered != closed:
        return r, (
            Reject(
                Reason.BAD_SCHEMA,
                f"verdict covers {covered}, round {r.round} closed with {closed}",
            ),
        )
    # dp_filter_bound k: the privacy charge (z/(2k+1)) holds only if at most k updates are
    # removed, whatever the detector flagged; the rest are kept
    kept, removed = cap_removals(v.kept, v.flagged, spec.dp_filter_bound)
    effects: list[Effect] = []
    bound = spec.dp_filter_bound
    if bound is not None and len(v.flagged) > bound:
        effects.append(
            Note(
                "verdict.capped",
                {"flagged": len(v.flagged), "removed": len(removed), "bound": bound},
            )
        )
    new = replace(
        r, state=RoundState.PUBLISHED, kept=tuple(kept), removed=tuple(removed), updated=now
    )
    refs = tuple(ref for ref in r.closed if ref[0] in set(kept))
    effects += [
        Aggregate(
            r.round,
            r.base_version,
            tuple(kept),
            tuple(removed),
            refs,
            round_clip(spec, r),
            population=r.population,
        ),
        Note(
            "model.published",
            {
                "version": r.round,
                "kept": len(kept),
                "flagged": len(removed),
                "epsilon": r.epsilon,
                "clip": round_clip(spec, r),
            },
        ),
        Publish(r.round),
        _after(spec, r),
    ]
    return new, tuple(effects)


def _after(spec: JobSpec, r: Round) -> NextRound | EndJob:
    """What follows a published round: the next one, or the job's end."""
    if r.round >= spec.rounds:
        return EndJob("completed", f"{spec.rounds} rounds done")
    return NextRound(r.round + 1, base_version=r.round)


def _tick(spec: JobSpec, r: Round, t: Tick, now: float, revoked: Collection[str]) -> Step:
    if r.state == RoundState.OPEN:
        new, effects = _settle(spec, r, now, revoked)
        if t.remind_after is not None and new.state == RoundState.OPEN:
            # so that an ingest replica or detector started mid-round learns the open
            # round (events only: model bytes stay off the broadcast)
            effects = (*effects, _announce(spec, new, broadcast=False))
        return new, effects
    if t.remind_after is None or now - r.updated < t.remind_after:
        return r, ()
    return r, _remind(spec, r, restart=False)


def _remind(spec: JobSpec, r: Round, *, restart: bool) -> tuple[Effect, ...]:
    """What the round waits for, sent again (every peer is idempotent on (job, round))."""
    match r.state:
        case RoundState.REQUESTED:
            return (_request(spec, r),)
        case RoundState.OPEN:
            return (_announce(spec, r, broadcast=True),) if restart else ()
        case RoundState.CLOSED:
            assert r.closed is not None
            return (Close(r.closed),)
        case RoundState.PUBLISHED:
            return (*((Publish(r.round),) if restart else ()), _after(spec, r))
        case RoundState.DENIED:
            return (EndJob("budget_exhausted", f"round {r.round} {r.state.value}"),)
        case RoundState.ABORTED:
            return (EndJob("too_few_updates", f"round {r.round} {r.state.value}"),)
