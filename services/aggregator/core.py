"""The aggregator's pure core: client selection, the round state machine's decisions,
and the deterministic robust + DP aggregation of one round.

Nothing here does I/O; the shell (``service.py``) feeds it stored rows and arrays.

* Selection is Poisson sampling at rate ``q`` (each enrolled client independently), the
  sampling that the privacy amplification of DP-SGD/DP-FedAvg assumes (Abadi et al., "Deep
  Learning with Differential Privacy", CCS 2016; McMahan et al., "Learning Differentially
  Private Recurrent Language Models", ICLR 2018). It is seeded per (job, round) from the
  job's secret seed, so a restarted aggregator selects the same clients.
* Sampling coins and noise come from :class:`qflare.privacy.NoiseSource`
  (:func:`qflare.privacy.poisson_sample`), seeded per (job, round, purpose).
* Aggregation is :func:`qflare.privacy.dp_fedavg` over the kept updates (deltas from the
  round's base model) as the rows of one float32 matrix in client-id order, with the job's
  robust rule (``qflare.robust``) as the combining step: clip each row to ``C``, combine,
  clip the result, scale by the number kept, add N(0, (zC)^2) and divide by the expected
  number of participants ``q*N`` (DP off: by the number kept); docs/architecture.md, "One
  round" step 7, and docs/privacy.md. With adaptive clipping the round also yields the
  next round's clip norm. The same inputs give the same model bit for bit.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from qflare.messages.tensors import Array, Layout, Tensors
from qflare.privacy import AdaptiveClipping, NoiseSource, dp_fedavg, poisson_sample
from qflare.robust import get_rule

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
    participants: Sequence[str], q: float, seed: int, job: str, round_no: int
) -> tuple[str, ...]:
    """Poisson sampling: each client in independently with probability ``q``."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sample rate q must be in (0, 1], got {q}")
    ordered = sorted(participants)
    if q == 1.0:
        return tuple(ordered)
    return tuple(poisson_sample(ordered, q, round_noise(seed, job, round_no, _SELECT)))


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


def expected_participants(sample_rate: float, population: int) -> float:
    """DP-FedAvg's fixed denominator ``q*N`` for a job of ``population`` enrolled clients,
    at least 1 (a fraction of a client would scale the step up)."""
    return max(sample_rate * population, 1.0)


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
    if expected_clients <= 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients}")
    x = np.empty((len(chosen), layout.size), dtype=np.float32)
    for i, c in enumerate(chosen):
        layout.check(updates[c], f"update of {c}")
        layout.flatten(updates[c], out=x[i])

    def combine(rows: npt.NDArray[np.floating[Any]]) -> npt.ArrayLike:
        f_eff = min(f, (rows.shape[0] - 1) // 2)
        agg = get_rule(rule, f=f_eff) if _takes_f(rule) else get_rule(rule)
        return agg(rows, rng=round_rng(seed, job, round_no, _RULE))

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
    return AggregationResult(new, chosen, float(np.linalg.norm(step)), dp.next_clip)


def _takes_f(rule: str) -> bool:
    try:
        get_rule(rule, f=0)
    except (TypeError, ValueError):
        return False
    return True
