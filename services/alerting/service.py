"""Alerting's shell: every ``alert.raised`` and every dead letter becomes a stored alert,
and the ones the policy lets through are republished on ``qflare.alerts`` as
``<severity>.<kind>.<job>``, signed by alerting.

Two queues (competing consumers: replicas share the work, each with its own dedup state):

* ``alerting`` - ``alert.raised.*`` (the alerts) and ``round.verdict.*`` (a verdict that
  keeps a client ends its flag streak, :meth:`AlertDesk.note_kept`);
* ``alerting.dead`` - everything dead-lettered to ``qflare.dead``, with the death reason
  (``rejected``: bad input already refused; ``delivery_limit``: a poison message).

Idempotence: the delivered message's id (envelope nonce, or a hash of a dead letter) is
stored with the alert in one transaction before the ack, so a redelivered message is not
counted twice; if the publish failed after the commit, the redelivery publishes it.
"""

from __future__ import annotations

import asyncio
import hashlib

from qflare.bus import Delivery, QueueSpec, topology
from qflare.messages import AlertRaised, Envelope, RoundVerdict, Severity
from qflare.runtime import metrics
from qflare.runtime.envelopes import emit
from qflare.runtime.logging import event
from qflare.runtime.service import Consumer, Service, ServiceContext, event_bindings
from qflare.services.alerting.core import (
    Action,
    Alert,
    AlertDesk,
    AlertPolicy,
    dead_letter_alert,
)
from qflare.services.alerting.store import AlertStore

ALERTS_IN = QueueSpec(
    topology.ALERTING_QUEUE,
    bindings=event_bindings((AlertRaised, RoundVerdict)),
    delivery_limit=5,
)
DEAD_IN = topology.dead_letters(topology.ALERTING_DEAD_QUEUE, "#")
QUEUES: tuple[QueueSpec, ...] = (ALERTS_IN, DEAD_IN)


class AlertingService(Service):
    name = "alerting"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        # [services.alerting] is checked with AlertPolicy's own fields and defaults
        self.desk = AlertDesk(AlertPolicy(**ctx.settings.services.alerting.model_dump()))
        self.store: AlertStore | None = None
        # One SQLite connection and a check-then-record per message: handlers run
        # concurrently (prefetch), so each message's store work is serialised.
        self._lock = asyncio.Lock()
        # alerts sent whose "published" mark failed to commit (the store refused it): a
        # retry commits the mark without sending them again
        self._sent: set[int] = set()

    def consumers(self) -> list[Consumer]:
        return [
            Consumer(
                ALERTS_IN,
                routes={AlertRaised: self.on_alert, RoundVerdict: self.on_verdict},
                prefetch=32,
            ),
            Consumer(DEAD_IN, handler=self.on_dead, prefetch=32),
        ]

    async def open(self) -> None:
        self.store = await AlertStore.open(self.ctx.data_dir)
        for job, client, length, last_round in await self.store.streaks():
            self.desk.restore_streak(job, client, length, last_round)

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()
            self.store = None

    async def on_verdict(self, env: Envelope[RoundVerdict]) -> None:
        verdict = env.body
        async with self._lock:
            self.desk.note_kept(env.job, verdict.kept, env.round)
            assert self.store is not None
            await self.store.reset_streaks(env.job, list(verdict.kept))

    async def on_alert(self, env: Envelope[AlertRaised]) -> None:
        body = env.body
        alert = Alert(
            job=env.job,
            kind=body.alert_kind,
            severity=Severity.parse(body.severity),
            reason=body.reason,
            detail=body.detail,
            client=body.client,
            round=env.round,
            source=env.sender,
            ts=env.ts / 1000.0,
        )
        await self._handle(f"{env.sender}:{env.nonce.hex()}", alert)

    async def on_dead(self, delivery: Delivery) -> None:
        metrics.dead_letter(self.name, delivery.death_reason)
        alert = dead_letter_alert(
            delivery.routing_key,
            delivery.death_reason,
            delivery.death_queue,
            exchange=delivery.exchange,
            ts=self.ctx.clock(),
        )
        h = hashlib.sha256(delivery.body)
        h.update(f"|{delivery.routing_key}|{delivery.death_reason}|{delivery.death_queue}".encode())
        await self._handle("dead:" + h.hexdigest(), alert)

    async def _handle(self, message_id: str, alert: Alert) -> None:
        async with self._lock:
            await self._handle_locked(message_id, alert)

    async def _handle_locked(self, message_id: str, alert: Alert) -> None:
        assert self.store is not None
        seen = await self.store.seen(message_id)
        if seen is not None:
            if seen.needs_publish and not seen.published:
                await self._publish(seen.alert_id, await self.store.alert(seen.alert_id))
            return
        now = self.ctx.clock()
        decision = self.desk.decide(alert, now)
        try:
            alert_id = await self.store.record(message_id, decision, now)
        except BaseException:
            self.desk.retract(decision, now)  # not stored: the retry decides afresh
            raise
        metrics.alert(self.name, decision.alert.severity.label, decision.action.value)
        if decision.publish:
            await self._publish(alert_id, decision.alert)
        elif decision.action is Action.RATE_LIMITED:
            event(self.log, "alert.rate_limited", job=alert.job, kind=alert.kind)

    async def _publish(self, alert_id: int, alert: Alert) -> None:
        assert self.store is not None
        body = AlertRaised(
            severity=alert.severity.label,  # type: ignore[arg-type]
            alert_kind=alert.kind,
            client=alert.client,
            reason=alert.reason,
            detail=alert.detail[:4096],
        )
        if alert_id not in self._sent:
            await emit(
                self,
                "alert.raised",
                body,
                job=alert.job,
                round=max(0, alert.round or 0),
                exchange=topology.ALERTS,
                routing_key=alert.routing_key(),
            )
            self._sent.add(alert_id)
        # a full disk refuses the mark: the retry marks it again, without a second copy
        # (after a restart the alert goes out once more: at least once)
        await self.store.mark_published(alert_id)
        self._sent.discard(alert_id)
        event(
            self.log,
            "alert.published",
            routing_key=alert.routing_key(),
            client=alert.client,
            reason=alert.reason,
        )


def build(ctx: ServiceContext) -> Service:
    return AlertingService(ctx)
