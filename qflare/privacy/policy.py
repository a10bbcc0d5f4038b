"""What a job's rounds are charged, and what the resulting epsilon covers.

What that epsilon covers depends on what runs before the noisy sum (docs/privacy.md,
"Byzantine filtering before the noisy sum"); :func:`privacy_charge` decides, from the
spec alone, the (q, z) the aggregator asks the accountant to charge and the ``coverage`` the
request, the grant and every report carry:

* ``clipped_sum``: rule ``mean`` and no removal by detection (detection off, or
  ``dp_filter_bound = 0``): the clipped-sum Gaussian mechanism of DP-FedAvg, charged at
  (q, z). The epsilon is a guarantee under the page's assumptions.
* ``filter_bounded``: rule ``mean``, detection on, at most ``k = dp_filter_bound`` updates
  removed per round. One client moves the kept sum by at most (2k + 1) C, so the round is
  charged at ``filtered_noise_multiplier(z, k) = z / (2k + 1)``. The detector's reputation
  quarantines clients from earlier rounds' updates, so a client that is *not* sampled in a
  round can still change which others are removed in it: amplification by sampling does not
  hold, and the round is charged at q = 1. The noise added stays z * C.
* ``noise_only``: any other filtering (detection with no bound, or a rule other than
  ``mean``): charged at (q, z), but the epsilon is only that of the noise added, not a DP
  guarantee for the pipeline that ran.

Adaptive clipping (``adaptive_clip``, :func:`adaptive_clipping`; Andrew, Thakkar, McMahan and
Ramaswamy 2021) changes none of this: each round also releases a noised count of the kept
updates whose norm was at most the round's clip, and the update sum's noise multiplier is
raised to ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` so that the two releases together
are one Gaussian mechanism with multiplier ``z`` (their Theorem 1). A removal by a bounded
filter moves the count by at most (2k + 1)/2 as it moves the sum by (2k + 1) C, so
``filter_bounded`` stays ``z/(2k+1)`` at q = 1. The accountant is charged the same (q, z)
with or without it; the clip norm a request names is the one in effect in its round.
"""

from __future__ import annotations

from dataclasses import dataclass

from qflare.messages.bodies import Coverage
from qflare.messages.jobs import JobSettings, JobSpec
from qflare.privacy.accounting import filtered_noise_multiplier
from qflare.privacy.errors import INVALID_PARAMETERS, PrivacyError
from qflare.privacy.mechanism import AdaptiveClipping, default_count_noise_std


@dataclass(frozen=True)
class PrivacyCharge:
    """The sampling rate and noise multiplier a round is charged at, and what the resulting
    epsilon covers (module docstring; docs/privacy.md)."""

    coverage: Coverage
    q: float
    z: float


def privacy_charge(
    *,
    rule: str,
    detection: bool,
    sample_rate: float,
    noise_multiplier: float,
    dp_filter_bound: int | None = None,
) -> PrivacyCharge:
    """The charge for one round with noise ``noise_multiplier * C`` actually added.

    Only the exact rule ``mean`` keeps the clipped-sum argument: any other rule (Krum,
    medians, NNM pre-mixing, ...) chooses or mixes updates from all of them. ``detection``
    removes updates, unless ``dp_filter_bound`` is 0.
    """
    if noise_multiplier <= 0:
        raise ValueError("DP is off (noise_multiplier 0): nothing is charged")
    removes = detection and dp_filter_bound != 0
    if rule.strip() != "mean":
        return PrivacyCharge("noise_only", sample_rate, noise_multiplier)
    if not removes:
        return PrivacyCharge("clipped_sum", sample_rate, noise_multiplier)
    if dp_filter_bound is None:
        return PrivacyCharge("noise_only", sample_rate, noise_multiplier)
    # q = 1: the detector's reputation carries earlier rounds' updates into this round's
    # removals, so a client's presence matters even in rounds it is not sampled for.
    return PrivacyCharge(
        "filter_bounded", 1.0, filtered_noise_multiplier(noise_multiplier, dp_filter_bound)
    )


def charge_of(spec: JobSpec) -> PrivacyCharge:
    """What the accountant is asked to charge for each round of the job ``spec``."""
    return privacy_charge(
        rule=spec.rule,
        detection=spec.detection,
        sample_rate=spec.sample_rate,
        noise_multiplier=spec.noise_multiplier,
        dp_filter_bound=spec.dp_filter_bound,
    )


def expected_participants(sample_rate: float, population: int) -> float:
    """DP-FedAvg's fixed denominator ``q*N`` for a job of ``population`` enrolled clients,
    at least 1 (a fraction of a client would scale the step up)."""
    return max(sample_rate * population, 1.0)


def adaptive_clipping(settings: JobSettings, population: int) -> AdaptiveClipping | None:
    """The adaptive clipping of a job of ``population`` enrolled clients with ``settings``
    (None: its clip norm is fixed). The count's noise ``sigma_b`` is ``clip_count_noise_std``,
    or Andrew et al.'s ``m / 20`` for ``m`` = :func:`expected_participants`. With DP on, the
    update sum's multiplier ``z_delta`` must exist (``2 sigma_b > z``): otherwise
    ``PrivacyError(INVALID_PARAMETERS)`` whose detail names the key to change."""
    if not settings.adaptive_clip:
        return None
    given = settings.clip_count_noise_std
    expected = expected_participants(settings.sample_rate, population)
    sigma_b = default_count_noise_std(expected) if given is None else given
    adaptive = AdaptiveClipping(
        count_noise_std=sigma_b,
        target_quantile=settings.clip_target_quantile,
        learning_rate=settings.clip_learning_rate,
    )
    z = settings.noise_multiplier
    try:
        adaptive.sum_noise_multiplier(z)  # z_delta, undefined unless 2 sigma_b > z
    except PrivacyError:
        default = "" if given is not None else f" (the default: {expected:g} expected clients / 20)"
        raise PrivacyError(
            INVALID_PARAMETERS,
            f"clip_count_noise_std = {sigma_b:g}{default} is too small for noise_multiplier = "
            f"{z:g}: adaptive clipping needs 2 * clip_count_noise_std > noise_multiplier, so "
            f"that the update sum's noise multiplier (z^-2 - (2 sigma_b)^-2)^-1/2 exists; set "
            f"clip_count_noise_std above {z / 2:g} or sample more clients per round",
        ) from None
    return adaptive


def adaptive_of(spec: JobSpec) -> AdaptiveClipping | None:
    """The adaptive clipping of the job ``spec`` (:func:`adaptive_clipping`)."""
    return adaptive_clipping(spec, len(spec.participants))


def sum_noise_multiplier(spec: JobSpec) -> float:
    """The multiplier of the noise the aggregator adds to the update sum of each round of
    ``spec``: ``noise_multiplier`` (0 with DP off), or ``z_delta`` with adaptive clipping."""
    adaptive = adaptive_of(spec)
    if adaptive is None:
        return spec.noise_multiplier
    return adaptive.sum_noise_multiplier(spec.noise_multiplier)
