"""QFLARE's exchanges and the dead-letter queue helper (DESIGN §1, §5).

All exchanges are durable topic exchanges; adapters prefix every name with the bus prefix.
Routing keys are dotted words; alerts use ``<severity>.<kind>.<job>``.
"""

from __future__ import annotations

from qflare.bus.port import QueueSpec

CLIENT = "qflare.client"
EVENTS = "qflare.events"
BROADCAST = "qflare.broadcast"
ALERTS = "qflare.alerts"
DEAD = "qflare.dead"

#: Every exchange a bus declares at connect, dead-letter exchange included.
EXCHANGES: tuple[str, ...] = (CLIENT, EVENTS, BROADCAST, ALERTS, DEAD)

#: Reasons a message reaches ``qflare.dead`` (the ``x-death`` reasons RabbitMQ uses).
DEATH_REJECTED = "rejected"
DEATH_DELIVERY_LIMIT = "delivery_limit"


def dead_letters(name: str = "dead-letters", pattern: str = "#") -> QueueSpec:
    """The queue that drains ``qflare.dead``. Dead-lettered messages keep their original
    routing key, so ``pattern`` can select e.g. ``"update.#"``. It does not dead-letter
    itself: a message its consumer rejects is dropped, which stops loops."""
    return QueueSpec(name=name, bindings=((DEAD, pattern),), dead_letter=False)


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more words."""
    return _match(tuple(pattern.split(".")), tuple(routing_key.split(".")))


def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    # Dynamic programming over (pattern position, word position); patterns are short.
    reachable = {0}
    for token in pattern:
        nxt: set[int] = set()
        for i in reachable:
            if token == "#":
                nxt.update(range(i, len(words) + 1))
            elif i < len(words) and (token == "*" or token == words[i]):
                nxt.add(i + 1)
        if not nxt:
            return False
        reachable = nxt
    return len(words) in reachable
