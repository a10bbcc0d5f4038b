"""The accountant's shell: ``privacy.request`` -> ``privacy.granted`` / ``privacy.denied``.

The decision is :class:`~qflare.services.accountant.core.AccountantCore`'s (PLD composition
via ``dp-accounting``, one ledger per job); this shell decodes the request, decides in a
worker thread (a PLD composition takes about a second), persists a fresh decision with
:class:`~qflare.services.accountant.store.LedgerStore` before applying it, and publishes the
answer. A redelivered or repeated request is answered from the ledger and charges nothing,
so a restart between the commit and the ack (or an aggregator re-sending its request) never
charges a round twice. Decisions are taken one at a time: each composes on the last.

The request's ``coverage`` (what the epsilon covers, docs/privacy.md) is echoed in the
answer, so whoever reads an epsilon off the bus reads whether it is a DP guarantee with it.

A job's budget (``epsilon_budget``, ``delta``) comes from its JobSpec (configuration file or
``submit_job``); a request for a job with no budget is refused (``WRONG_JOB`` alert).
"""

from __future__ import annotations

import asyncio

from qflare.bus import topology
from qflare.messages import (
    Envelope,
    MessageRejected,
    PrivacyDenied,
    PrivacyGranted,
    PrivacyRequest,
    Reason,
)
from qflare.privacy import BudgetPolicy, PrivacyError
from qflare.privacy.errors import UNKNOWN_JOB
from qflare.runtime import (
    Consumer,
    JobSpec,
    Service,
    ServiceContext,
    event,
    metrics,
    stateful_consumer,
)
from qflare.runtime.envelopes import emit
from qflare.services.accountant.core import AccountantCore, denied_fields, granted_fields
from qflare.services.accountant.store import LedgerStore


class Accountant(Service):
    name = "accountant"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.specs: dict[str, JobSpec] = {s.job_id: s for s in self.settings.jobs}
        self.store: LedgerStore | None = None
        self.core: AccountantCore | None = None
        self._lock = asyncio.Lock()

    def consumers(self) -> list[Consumer]:
        return [
            stateful_consumer(
                topology.ACCOUNTANT_QUEUE, {PrivacyRequest: self.on_request}, prefetch=8
            )
        ]

    def policy_for(self, job: str) -> BudgetPolicy | None:
        spec = self.specs.get(job)
        return None if spec is None else BudgetPolicy(epsilon=spec.epsilon_budget, delta=spec.delta)

    async def open(self) -> None:
        self.store = await LedgerStore.open(self.ctx.data_dir / "accountant.sqlite")
        jobs, decisions = await self.store.load()
        self.core = AccountantCore.restore(self.policy_for, jobs, decisions)
        for job, policy in self.core.jobs().items():
            ledger = self.core.ledger(job)
            spent = ledger.epsilon if ledger is not None else 0.0
            metrics.epsilon(self.name, job, spent, policy.epsilon)

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()

    async def submit_job(self, spec: JobSpec, model: object = None) -> None:
        self.specs.setdefault(spec.job_id, spec)

    async def on_request(self, env: Envelope[PrivacyRequest]) -> None:
        assert self.core is not None and self.store is not None
        body = env.body
        async with self._lock:
            try:
                decision = await asyncio.to_thread(
                    self.core.decide, env.job, env.round, body.q, body.z, body.clip
                )
            except PrivacyError as exc:
                reason = Reason.WRONG_JOB if exc.reason == UNKNOWN_JOB else Reason.BAD_SCHEMA
                raise MessageRejected(reason, f"{exc.reason}: {exc.detail}") from None
            if decision.fresh:
                await self.store.record(decision)
                self.core.apply(decision)
                metrics.privacy_decision(
                    self.name,
                    env.job,
                    granted=decision.granted,
                    spent=decision.epsilon_total,
                    budget=decision.budget_epsilon,
                )
                event(
                    self.log,
                    "privacy.decided",
                    job=env.job,
                    round=env.round,
                    granted=decision.granted,
                    epsilon=decision.epsilon_total,
                    requested=decision.epsilon_requested,
                    budget=decision.budget_epsilon,
                    coverage=body.coverage,
                )
        answer: PrivacyGranted | PrivacyDenied = (
            PrivacyGranted(**granted_fields(decision), coverage=body.coverage)
            if decision.granted
            else PrivacyDenied(**denied_fields(decision), coverage=body.coverage)
        )
        await emit(self, answer.KIND, answer, job=env.job, round=env.round)


def build(ctx: ServiceContext) -> Service:
    return Accountant(ctx)
