"""Topic matching of the in-memory broker, checked against RabbitMQ as the oracle."""

from __future__ import annotations

import itertools

import pytest

from qflare.bus import Delivery, Outcome, QueueSpec, topology
from qflare.bus.topology import topic_matches

PATTERNS = [
    "#",
    "*",
    "a",
    "a.*",
    "a.#",
    "*.b",
    "#.b",
    "a.#.b",
    "a.*.b",
    "*.*",
    "#.#",
    "a.#.#.c",
    "#.a.#",
]
KEYS = ["a", "b", "a.b", "a.c", "a.b.b", "a.x.y.b", "x.a.y", "a.b.c", "c.b", "a.a"]


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("#", "a.b.c", True),
        ("a.#", "a", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("a.#.b", "a.b", True),
        ("a.#.b", "a.x.y.b", True),
        ("a.#.b", "a.b.c", False),
        ("*.*", "a", False),
        ("#.a.#", "x.a.y", True),
        ("update.*", "update.j1", True),
    ],
)
def test_topic_matches_amqp_rules(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


@pytest.mark.rabbitmq
async def test_memory_routing_agrees_with_rabbitmq(rabbit_bus, wait_for) -> None:
    seen: list[tuple[str, str]] = []
    ended: set[str] = set()

    def recorder(pattern: str):
        async def handle(delivery: Delivery) -> Outcome:
            if delivery.body == b"end":
                ended.add(pattern)
            else:
                seen.append((pattern, delivery.routing_key))
            return Outcome.ACK

        return handle

    for i, pattern in enumerate(PATTERNS):
        await rabbit_bus.consume(
            QueueSpec(f"p{i}", bindings=((topology.EVENTS, pattern),)), recorder(pattern)
        )
    for key in KEYS:
        await rabbit_bus.publish(topology.EVENTS, key, b"")
    # Queues are FIFO with one consumer each: once a queue's end marker arrived, every
    # earlier message routed to it has arrived too.
    for pattern in PATTERNS:
        marker = next(k for k in KEYS if topic_matches(pattern, k))
        await rabbit_bus.publish(topology.EVENTS, marker, b"end")
    await wait_for(lambda: ended == set(PATTERNS), timeout=10)
    expected = [(p, k) for p, k in itertools.product(PATTERNS, KEYS) if topic_matches(p, k)]
    assert sorted(seen) == sorted(expected)
