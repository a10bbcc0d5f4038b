"""Transport port (docs/architecture.md, "The data plane"): ``connect_bus`` picks the adapter from the URL.

``memory://[name]`` (or no URL) gives the embedded broker, ``amqp://``/``amqps://`` RabbitMQ:
one node, or the nodes of a cluster as URLs separated by commas (:func:`broker_addresses`),
failed over in turn.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from qflare.bus import topology
from qflare.bus.port import (
    DEFAULT_MAX_MESSAGE_SIZE,
    AccessRefused,
    Bus,
    BusClosed,
    BusError,
    BusUnavailable,
    Delivery,
    Handler,
    InvalidHeaders,
    MessageTooLarge,
    Outcome,
    PublishFailed,
    QueueSpec,
    StreamNotFound,
    StreamOffset,
    StreamReader,
    StreamSpec,
    Subscription,
    TopologyError,
    broker_addresses,
    with_login,
)


async def connect_bus(
    url: str | None = None,
    prefix: str = "",
    *,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    **options: Any,
) -> Bus:
    """Connect and declare QFLARE's exchanges (idempotent).

    ``options`` go to the RabbitMQ adapter (``connect_timeout``, ``publish_timeout``,
    ``reconnect_interval``, ``connection_name``, ``declare``, ``replicas``: the replica
    count of each quorum queue and stream on a cluster, None for the broker's default); the
    in-memory adapter takes none. ``declare="passive"`` only checks that the exchanges (and the durable queues it
    consumes) exist, for a broker user without configure permission on them, such as a
    participant's or a service role's user from ``qflare broker-definitions`` (transient
    queues and job streams are declared all the same: no definitions file holds them);
    ``declare="full"`` (default) creates them.
    """
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be str, got {type(prefix).__name__}")
    if not isinstance(max_message_size, int) or max_message_size < 1:
        raise ValueError(f"max_message_size must be a positive int, got {max_message_size!r}")
    scheme = urlsplit(url).scheme if url else "memory"
    if scheme == "memory":
        if options:
            raise TypeError(f"the in-memory bus takes no options, got {sorted(options)}")
        from qflare.bus.memory import MemoryBus

        name = urlsplit(url).netloc if url else ""
        return MemoryBus(name, prefix=prefix, max_message_size=max_message_size)
    if scheme in ("amqp", "amqps") and url:
        from qflare.bus.rabbitmq import RabbitBus

        return await RabbitBus.connect(
            url, prefix=prefix, max_message_size=max_message_size, **options
        )
    raise ValueError(f"unsupported bus URL scheme {scheme!r}; use memory:// or amqp://")


__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "AccessRefused",
    "Bus",
    "BusClosed",
    "BusError",
    "BusUnavailable",
    "Delivery",
    "Handler",
    "InvalidHeaders",
    "MessageTooLarge",
    "Outcome",
    "PublishFailed",
    "QueueSpec",
    "StreamNotFound",
    "StreamOffset",
    "StreamReader",
    "StreamSpec",
    "Subscription",
    "TopologyError",
    "broker_addresses",
    "connect_bus",
    "topology",
    "with_login",
]
