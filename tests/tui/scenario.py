"""A fixed, deterministic job under attack as console events (times are fixed)."""

from __future__ import annotations

from qflare.tui import events as ev

T0 = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC
JOB = "mnist-1"
CLIENTS = tuple(f"client-{i:03d}" for i in range(8))
BYZANTINE = ("client-005", "client-006")


def job_events(rounds: int = 3, job: str = JOB, t0: float = T0) -> list[ev.FeedEvent]:
    """``rounds`` complete rounds plus an open one with half its updates in."""
    out: list[ev.FeedEvent] = [ev.JobDeclared(job, 0, t0, epsilon_budget=4.0, rounds=10)]
    eps = 0.0
    for r in range(1, rounds + 2):
        t = t0 + 10 * (r - 1)
        eps += 0.35
        out.append(
            ev.PrivacyGranted(
                job, r, t, epsilon_round=0.35, epsilon_total=round(eps, 3), delta=1e-5
            )
        )
        out.append(
            ev.RoundOpened(
                job,
                r,
                t + 0.1,
                participants=CLIENTS,
                deadline=t + 30.0,
                min_updates=5,
                rule="nnm+multikrum(f=2)",
                model_version=r - 1,
            )
        )
        last = r == rounds + 1
        senders = CLIENTS[:4] if last else CLIENTS
        for i, c in enumerate(senders):
            out.append(ev.UpdateAccepted(job, r, t + 1 + 0.1 * i, client=c))
        if last:
            break
        out.append(ev.RoundClosed(job, r, t + 3, clients=CLIENTS))
        out.append(
            ev.RoundVerdict(
                job,
                r,
                t + 3.2,
                kept=tuple(c for c in CLIENTS if c not in BYZANTINE),
                flagged=tuple(
                    ev.FlaggedClient(c, 4.5 + i, ("krum", "norm")) for i, c in enumerate(BYZANTINE)
                ),
            )
        )
        for c in BYZANTINE:
            out.append(
                ev.AlertRaised(
                    job,
                    r,
                    t + 3.3,
                    severity=ev.Severity.CRITICAL if r >= 3 else ev.Severity.WARNING,
                    kind="client.flagged",
                    reason="FLAGGED",
                    client=c,
                    detail=f"krum score above threshold in round {r}",
                    source="alerting",
                    key=f"alerting:{r}:{c}",
                )
            )
        out.append(ev.ModelPublished(job, r, t + 4.0, version=r, epsilon=round(eps, 3)))
        out.append(
            ev.MetricsEvaluated(
                job, r, t + 4.5, model_version=r, accuracy=0.5 + 0.1 * r, loss=1.0 / r
            )
        )
    out.append(
        ev.UpdateRejected(
            job,
            rounds + 1,
            t0 + 10 * rounds + 2,
            client="client-007",
            reason="REVOKED",
            detail="certificate revoked",
        )
    )
    out.append(
        ev.AlertRaised(
            job,
            rounds + 1,
            t0 + 10 * rounds + 2.1,
            severity=ev.Severity.INFO,
            kind="update.rejected",
            reason="REVOKED",
            client="client-007",
            detail="certificate serial 7 is revoked",
            source="alerting",
            key="alerting:rev",
        )
    )
    return out


NOW = T0 + 10 * 3 + 5  # 5 s into the open round 4 (deadline 25 s away)
