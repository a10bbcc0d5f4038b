"""How many hostile messages a second ingest refuses, alone, over RabbitMQ.

``--messages`` messages are written into a job's update stream first (from one connection,
without publisher confirms): random bytes, truncated envelopes and, one in twenty, a
well-formed update signed under a certificate of another CA. Five honest updates follow.
Then one ingest service starts in this process, hears ``round.opened`` (its reader starts
at the stream's first offset) and judges the lot. Printed: the time from the announcement
until the last honest update is accepted, the messages judged a second, and how many
rejections were reported one by one (a signed ``update.rejected`` and an alert each; the
rest are shed and counted, docs/architecture.md "Hostile traffic"). The aggregator and the
detector, which read the same stream, are not running: this is ingest's share of a flood.

    python benchmarks/ingest_flood.py [--messages 20000] [--broker amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from qflare.bus import connect_bus, topology
from qflare.crypto.testing import make_federation
from qflare.messages import RoundOpened, Update, encode
from qflare.messages.tensors import model_digest
from qflare.runtime import Settings, build_service

JOB = "flood"
SPEC = [{"name": "w", "dtype": "float32", "shape": [64, 10]}]


def _update(identity: Any, seal_to: list[Any]) -> bytes:
    body = Update(base_version=0, num_samples=10, tensors={"w": np.zeros((64, 10), np.float32)})
    return encode("update", body, identity, job=JOB, round=1, seal_to=seal_to)


async def run(broker: str, n: int) -> None:
    import aio_pika

    fed = make_federation(clients=5)
    other = make_federation(clients=1, services=())
    readers = [fed[r].cert for r in ("ingest", "aggregator", "detector")]
    rng = np.random.default_rng(0)
    sample = _update(fed["client-000"], readers)
    forged = _update(other["client-000"], readers)
    flood = []
    for i in range(n):
        if i % 20 == 0:
            flood.append(forged)
        elif i % 2:
            flood.append(rng.bytes(int(rng.integers(1, 200))))
        else:
            flood.append(sample[: int(rng.integers(1, 300))])
    honest = [_update(fed[c], readers) for c in fed.clients]

    prefix = f"bench-{uuid.uuid4().hex[:8]}-"
    bus = await connect_bus(broker, prefix=prefix)
    stream = topology.update_stream(JOB)
    await bus.declare_stream(stream)
    conn = await aio_pika.connect(broker)
    channel = await conn.channel(publisher_confirms=False)
    exchange = await channel.get_exchange(prefix + topology.CLIENT, ensure=False)
    start = time.perf_counter()
    for body in [*flood, *honest]:
        await exchange.publish(aio_pika.Message(body), routing_key=f"update.{JOB}")
    await channel.close()
    await conn.close()
    print(f"written: {n} hostile + {len(honest)} honest in {time.perf_counter() - start:.2f}s")

    with tempfile.TemporaryDirectory() as data:
        settings = Settings(
            data_dir=Path(data),
            services=MappingProxyType({"ingest": {"replica": "bench", "shed_report_s": 1.0}}),
        )
        service = await build_service(
            "ingest", settings, bus=bus, identity=fed["ingest"], trust=fed.trust()
        )
        await service.start()
        opened = RoundOpened(
            model_version=0,
            model_digest=model_digest({"w": np.zeros((64, 10), np.float32)}),
            participants=sorted(fed.clients),
            deadline=time.time() + 600,
            min_updates=1,
            clip_norm=1.0,
            tensor_spec=SPEC,
            rule="mean",
            model_offset=0,
            updates_from=0,
        )
        start = time.perf_counter()
        await bus.publish(
            topology.EVENTS,
            f"round.opened.{JOB}",
            encode("round.opened", opened, fed["aggregator"], job=JOB, round=1),
        )
        counts: dict[str, int] = getattr(service, "counts")  # noqa: B009  (ingest's own)
        while counts["accepted"] < len(honest):
            await asyncio.sleep(0.005)
        seconds = time.perf_counter() - start
        await service.stop()
    await bus.delete_all([stream.name, "ingest.rounds.bench"])
    await bus.close()
    print(
        f"ingest judged {n + len(honest)} messages in {seconds:.2f}s: {n / seconds:.0f} hostile "
        f"messages/s; reported one by one {counts['rejected']}, shed {counts['shed']}, "
        f"accepted {counts['accepted']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672/")
    args = ap.parse_args()
    asyncio.run(run(args.broker, args.messages))


if __name__ == "__main__":
    main()
