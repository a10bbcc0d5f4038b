"""Errors of the privacy core, each carrying a stable reason code.

The codes are strings so that they travel unchanged in ``privacy.denied`` bodies and in
the accountant's ledger; callers match on ``error.reason``, never on the message text.
"""

from __future__ import annotations

from qflare.errors import QflareError

INVALID_PARAMETERS = "INVALID_PARAMETERS"
"""A request's q, z, clip, round or job is outside its allowed range."""
CONFLICTING_REQUEST = "CONFLICTING_REQUEST"
"""A (job, round) already in the ledger was requested again with other parameters."""
BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"
"""Granting the round would take the job's epsilon past its budget (a denial, not an error)."""
UNKNOWN_JOB = "UNKNOWN_JOB"
"""A request names a job for which no budget was configured."""

REASONS = (INVALID_PARAMETERS, CONFLICTING_REQUEST, BUDGET_EXHAUSTED, UNKNOWN_JOB)


class PrivacyError(QflareError, ValueError):
    """Bad input to the privacy core; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
