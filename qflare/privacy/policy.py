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
"""

from __future__ import annotations

from dataclasses import dataclass

from qflare.messages.bodies import Coverage
from qflare.messages.jobs import JobSpec
from qflare.privacy.accounting import filtered_noise_multiplier


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
