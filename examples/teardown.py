"""Delete a run's broker topology after it: the services' queues, the jobs' streams and the
five exchanges under the run's prefix.

    python examples/teardown.py --broker amqp://guest:guest@127.0.0.1:5672/ --prefix P --job digits

The aggregator deletes a job's streams itself when the job ends (the update stream at once,
the model and broadcast streams ``stream_linger_s`` later, so late participants can still read
the final model); a run stopped before that leaves them, and this removes them. Run it once
the services and participants have stopped, or a live consumer re-creates its queue.
Ingest's ``ingest.rounds.<replica>`` and the consoles' queues are transient: the broker drops
them with their connection. Refuses an empty ``--prefix``: it would delete the exchanges
every unprefixed federation on the broker shares.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from qflare.bus import connect_bus, topology
from qflare.cli import add_federation_flags


async def teardown(broker: str, prefix: str, jobs: list[str]) -> int:
    names = [*topology.SERVICE_QUEUES, *(s.name for job in jobs for s in topology.job_streams(job))]
    bus = await connect_bus(broker, prefix=prefix)
    try:
        await bus.delete_all(names)
    finally:
        await bus.close()
    return len(names)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_federation_flags(p, broker_help="amqp:// URL")
    p.add_argument("--job", action="append", help="a job whose streams to delete (default: digits)")
    args = p.parse_args(argv)
    if not args.prefix:
        p.error("needs a non-empty --prefix: it deletes a federation's exchanges")
    n = asyncio.run(teardown(args.broker, args.prefix, args.job or ["digits"]))
    print(f"deleted {n} queues and streams and the exchanges under prefix {args.prefix!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
