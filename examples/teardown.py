"""Delete one federation's exchanges and queues from RabbitMQ (after a run on a shared broker).

    python examples/teardown.py --broker amqp://guest:guest@127.0.0.1:5672/ --prefix example-123- --pki pki

Deletes the services' queues, the ``client.<id>`` queue of every kit under ``<pki>/clients``
and the five exchanges, all under ``--prefix``. Run it only once the services and
participants have stopped (their queues would be re-created by a live consumer). Ingest's
``ingest.rounds.<replica>`` queues are transient: the broker drops them with the replica.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from qflare.bus import connect_bus

SERVICE_QUEUES = ("aggregator", "detector", "accountant", "alerting", "alerting.dead", "ingest")


async def teardown(broker: str, prefix: str, clients: list[str]) -> list[str]:
    queues = [*SERVICE_QUEUES, *(f"client.{c}" for c in clients)]
    bus = await connect_bus(broker, prefix=prefix)
    try:
        await bus.delete_all(queues)
    finally:
        await bus.close()
    return queues


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672/")
    p.add_argument("--prefix", required=True, help="the federation's prefix (refuses the empty one)")
    p.add_argument("--pki", type=Path, required=True, help="`qflare provision` folder (for the client ids)")
    args = p.parse_args(argv)
    if not args.prefix:
        p.error("--prefix must not be empty: this deletes a federation's exchanges")
    clients = sorted(d.name for d in (args.pki / "clients").iterdir() if d.is_dir())
    queues = asyncio.run(teardown(args.broker, args.prefix, clients))
    print(f"deleted {len(queues)} queues and the exchanges under prefix {args.prefix!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
