"""Publish+consume throughput of QFLARE's RabbitMQ bus adapter against raw aio-pika.

Both sides use the same settings: one robust connection, a durable quorum queue, persistent
messages, publisher confirms, manual acks, the same prefetch, and the same number of
publishes in flight. Each trial times from the first publish until the consumer has acked
the last message; trials alternate raw/ours so drift on a shared machine hits both. The
figure that matters is the ratio raw time / our time (1.0 = the adapter adds nothing).
Wall-clock rates swing widely when other work shares the CPUs, so the client's own CPU time
per message (publisher and consumer share this process) is printed too: it is the steadier
measure of what the adapter adds.

It also reports the worst event-loop stall seen while our adapter moved each size (a
ticker task measures how late it wakes up), since big bodies are marshalled on the loop.

    python benchmarks/bus.py [--url amqp://...] [--trials 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid

import aio_pika

from qflare.bus import Delivery, Outcome, QueueSpec, connect_bus, topology
from qflare.bus.rabbitmq import queue_arguments

SIZES = ((1024, 2000, 32), (1024 * 1024, 64, 4), (8 * 1024 * 1024, 16, 2))  # size, count, window


class LoopStall:
    """Largest delay between when a 1 ms ticker should wake and when it does."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, time.perf_counter() - t0 - 0.001)

    def __enter__(self) -> LoopStall:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def _publish_window(publish, count: int, window: int) -> None:
    sem = asyncio.Semaphore(window)

    async def one(i: int) -> None:
        async with sem:
            await publish(i)

    await asyncio.gather(*(one(i) for i in range(count)))


async def trial_raw(
    url: str, body: bytes, count: int, window: int, prefetch: int
) -> tuple[float, float, float]:
    prefix = f"bench-raw-{uuid.uuid4().hex[:8]}-"
    connection = await aio_pika.connect_robust(url)
    try:
        pub = await connection.channel(publisher_confirms=True)
        exchange = await pub.declare_exchange(
            prefix + topology.EVENTS, aio_pika.ExchangeType.TOPIC, durable=True
        )
        sub = await connection.channel(publisher_confirms=False)
        await sub.set_qos(prefetch_count=prefetch)
        spec = QueueSpec("q", bindings=((topology.EVENTS, "#"),))
        queue = await sub.declare_queue(
            prefix + "q", durable=True, arguments=queue_arguments(spec, prefix)
        )
        await queue.bind(exchange, "#")
        done = asyncio.Event()
        got = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal got
            await message.ack()
            got += 1
            if got == count:
                done.set()

        tag = await queue.consume(on_message, no_ack=False)

        async def publish(i: int) -> None:
            message = aio_pika.Message(
                body, headers={"i": i}, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            await exchange.publish(message, "bench.k", mandatory=True)

        with LoopStall() as stall:
            t0, c0 = time.perf_counter(), time.process_time()
            await _publish_window(publish, count, window)
            await done.wait()
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
        await exchange.delete()
        return elapsed, cpu, stall.worst
    finally:
        await connection.close()


async def trial_ours(
    url: str, body: bytes, count: int, window: int, prefetch: int
) -> tuple[float, float, float]:
    bus = await connect_bus(url, prefix=f"bench-bus-{uuid.uuid4().hex[:8]}-")
    try:
        done = asyncio.Event()
        got = 0

        async def handler(delivery: Delivery) -> Outcome:
            nonlocal got
            got += 1
            if got == count:
                done.set()
            return Outcome.ACK

        await bus.consume(
            QueueSpec("q", bindings=((topology.EVENTS, "#"),)), handler, prefetch=prefetch
        )

        async def publish(i: int) -> None:
            await bus.publish(topology.EVENTS, "bench.k", body, {"i": i})

        with LoopStall() as stall:
            t0, c0 = time.perf_counter(), time.process_time()
            await _publish_window(publish, count, window)
            await done.wait()
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        await bus.delete_all()
        return elapsed, cpu, stall.worst
    finally:
        await bus.close()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", default=os.environ.get("QFLARE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a quarter of the messages")
    args = parser.parse_args()
    prefetch = 16
    print(
        f"quorum queue, persistent, confirms, manual ack, prefetch {prefetch}; "
        f"median of {args.trials} alternating trials; one process publishes and consumes"
    )
    print(
        f"{'size':>6} {'msgs':>5} {'window':>6} | {'raw aio-pika':>18} | {'qflare bus':>18} | "
        f"{'ratio':>5} | client CPU per msg raw / ours (ratio) | worst loop stall raw / ours"
    )
    for size, count, window in SIZES:
        if args.quick:
            count = max(4, count // 4)
        body = os.urandom(size)
        raw, ours, raw_cpu, ours_cpu, raw_stalls, stalls = [], [], [], [], [], []
        for _ in range(args.trials):
            elapsed, cpu, stall = await trial_raw(args.url, body, count, window, prefetch)
            raw.append(elapsed)
            raw_cpu.append(cpu)
            raw_stalls.append(stall)
            elapsed, cpu, stall = await trial_ours(args.url, body, count, window, prefetch)
            ours.append(elapsed)
            ours_cpu.append(cpu)
            stalls.append(stall)
        t_raw, t_ours = statistics.median(raw), statistics.median(ours)
        cpu_raw = statistics.median(raw_cpu) / count * 1e6
        cpu_ours = statistics.median(ours_cpu) / count * 1e6

        def rate(t: float, size: int = size, count: int = count) -> str:
            if size < 1024 * 1024:
                return f"{count / t:8.0f} msg/s"
            return f"{count * size / t / 2**20:8.1f} MiB/s"

        label = f"{size // 1024} KB" if size < 2**20 else f"{size // 2**20} MB"
        print(
            f"{label:>6} {count:>5} {window:>6} | {rate(t_raw):>18} | {rate(t_ours):>18} | "
            f"{t_raw / t_ours:5.2f} | {cpu_raw:8.0f} / {cpu_ours:8.0f} us ({cpu_raw / cpu_ours:4.2f}) | "
            f"{max(raw_stalls) * 1000:.1f} ms / {max(stalls) * 1000:.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
