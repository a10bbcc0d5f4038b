"""Create the participants' queues before a run, or delete a run's topology after it.

    python examples/topology.py declare --broker amqp://guest:guest@127.0.0.1:5672/ --prefix P --pki pki --job digits
    python examples/topology.py delete  --broker amqp://guest:guest@127.0.0.1:5672/ --prefix P --pki pki

``declare`` creates the exchanges and, for every kit under ``<pki>/clients``, the queue
``client.<id>`` bound to ``<job>.#`` on ``qflare.broadcast``, exactly as the participant
itself declares it. It stands in for importing ``qflare broker-definitions``' file into
the broker: the aggregator broadcasts each round once, so a participant's queue must exist
before the round opens, or that participant misses the round.

``delete`` removes the services' queues, the clients' queues and the five exchanges under
``--prefix`` (refusing an empty one). Run it once the services and participants have
stopped, or a live consumer re-creates its queue. Ingest's ``ingest.rounds.<replica>``
queues are transient: the broker drops them with the replica.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from qflare.bus import Delivery, Outcome, connect_bus
from qflare.client import Participant

SERVICE_QUEUES = ("aggregator", "detector", "accountant", "alerting", "alerting.dead", "ingest")


def _kits(pki: Path) -> list[Path]:
    return sorted(d for d in (pki / "clients").iterdir() if d.is_dir())


async def declare(broker: str, prefix: str, pki: Path, job: str) -> int:
    async def refuse(delivery: Delivery) -> Outcome:  # nothing is published before the run
        return Outcome.RETRY

    bus = await connect_bus(broker, prefix=prefix)
    try:
        kits = _kits(pki)
        for kit in kits:
            # the participant's own queue spec, so its later declaration matches this one
            spec = Participant.from_kit(kit, None, lambda model, info: 1, jobs=[job]).queue_spec()
            sub = await bus.consume(spec, refuse, prefetch=1)
            await sub.cancel()
    finally:
        await bus.close()
    return len(kits)


async def delete(broker: str, prefix: str, pki: Path) -> int:
    queues = [*SERVICE_QUEUES, *(f"client.{kit.name}" for kit in _kits(pki))]
    bus = await connect_bus(broker, prefix=prefix)
    try:
        await bus.delete_all(queues)
    finally:
        await bus.close()
    return len(queues)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("declare", "delete"))
    p.add_argument(
        "--broker",
        default=os.environ.get("QFLARE_BROKER", "amqp://guest:guest@127.0.0.1:5672/"),
        help="amqp:// URL ($QFLARE_BROKER)",
    )
    p.add_argument(
        "--prefix",
        default=os.environ.get("QFLARE_PREFIX", ""),
        help="the federation's exchange/queue name prefix ($QFLARE_PREFIX)",
    )
    p.add_argument(
        "--pki", type=Path, required=True, help="`qflare provision` folder (for the client ids)"
    )
    p.add_argument("--job", default="digits", help="declare: the job the participants follow")
    args = p.parse_args(argv)
    if args.action == "declare":
        n = asyncio.run(declare(args.broker, args.prefix, args.pki, args.job))
        print(f"declared {n} participant queues under prefix {args.prefix!r}")
    else:
        if not args.prefix:
            p.error("delete needs a non-empty --prefix: it deletes a federation's exchanges")
        n = asyncio.run(delete(args.broker, args.prefix, args.pki))
        print(f"deleted {n} queues and the exchanges under prefix {args.prefix!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
