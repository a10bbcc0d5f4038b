"""One write, several readers: RabbitMQ streams against quorum queues, through QFLARE's bus.

Reproduces, with the real adapter (``qflare.bus.connect_bus``), the raw aio-pika comparison
that docs/architecture.md ("Cost of a round") quotes:
the same bodies (default 100 x 4 MiB) published with publisher confirms, a window of
publishes in flight, and every consumer in a process of its own, on the same broker in one
run. Each trial times from the first publish until the last consumer has handled the last
message (wall clock, ``time.time()`` in every process). Routes:

* ``quorum x1``   one quorum queue, one consumer: the floor, bytes moved once;
* ``stream x1``   one stream, one reader from ``"first"``;
* ``stream x3``   the same stream read by three reader processes;
* ``fan-out x3``  the broker copies each publish into three quorum queues, one consumer
  each (what three services that all need every message cost with queues).

Trials of the routes alternate, so drift on a shared machine hits all of them; the ratio
to the floor of the same repetition is the figure that matters. Every trial uses a prefix
of its own and deletes its queues, streams and exchanges.

``trial`` is also what ``benchmarks/round.py`` measures its floors with (its own bodies, a
probe around the timed part); each consumer process reports its CPU seconds and peak RSS.

    python benchmarks/streams.py [--url amqp://...] [--count 100] [--size-mib 4]
                                 [--window 16] [--prefetch 16] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from qflare.bus import Delivery, Outcome, QueueSpec, StreamSpec, connect_bus, topology
from qflare.bus.port import StreamOffset

KEY = "bench.stream"
BINDINGS = ((topology.EVENTS, "bench.#"),)
#: name: (kind, number of consumer processes); the first is the floor.
ROUTES: dict[str, tuple[str, int]] = {
    "quorum x1": ("queue", 1),
    "stream x1": ("stream", 1),
    "stream x3": ("stream", 3),
    "fan-out x3": ("queue", 3),
}
#: Measured with raw aio-pika (100 x 4 MB, 16 in flight; docs/architecture.md, "Cost of
#: a round"): time / floor.
RAW_AIO_PIKA = {"quorum x1": 1.0, "stream x1": 0.81, "stream x3": 1.36, "fan-out x3": 2.40}


class Countdown:
    """A handler that acks everything and says when it has seen ``count`` messages."""

    def __init__(self, count: int) -> None:
        self.left = count
        self.done = asyncio.Event()

    async def __call__(self, delivery: Delivery) -> Outcome:
        self.left -= 1
        if self.left == 0:
            self.done.set()
        return Outcome.ACK


def _offset(text: str) -> StreamOffset:
    """``--offset`` as the bus takes it: a number, or one of the bus's words."""
    return int(text) if text.isdigit() else cast(StreamOffset, text)


@dataclass(frozen=True)
class Reader:
    """What one consumer process reads: ``count`` messages from the queue or stream
    (``kind``) ``name`` under ``prefix``, by each of its ``readers`` (a stream is read by
    each reader from ``offset``; ``readers`` > 1 only for streams)."""

    kind: str
    prefix: str
    name: str
    count: int
    prefetch: int
    offset: StreamOffset = "first"
    readers: int = 1

    def argv(self) -> list[str]:
        """The command-line words :func:`parse` reads this back from."""
        words = [self.kind, self.prefix, self.name, str(self.count), str(self.prefetch)]
        return ["--consumer", *words, "--offset", str(self.offset), "--readers", str(self.readers)]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Reader:
        kind, prefix, name, count, prefetch = args.consumer
        offset = _offset(args.offset)
        return cls(kind, prefix, name, int(count), int(prefetch), offset, args.readers)


async def consumer(url: str, reader: Reader) -> None:
    """A consumer process: prints ``ready`` once attached, then ``done <time> <cpu-s>
    <peak-rss-bytes>`` after each of its readers handled its messages."""
    bus = await connect_bus(url, prefix=reader.prefix)
    handlers = [Countdown(reader.count) for _ in range(reader.readers)]
    try:
        if reader.kind == "queue":
            spec = QueueSpec(reader.name, bindings=BINDINGS)
            await bus.consume(spec, handlers[0], prefetch=reader.prefetch)
        else:
            for handler in handlers:
                await bus.read_stream(
                    reader.name, handler, offset=reader.offset, prefetch=reader.prefetch
                )
        print("ready", flush=True)
        await asyncio.gather(*(h.done.wait() for h in handlers))
        end = time.time()
        use = resource.getrusage(resource.RUSAGE_SELF)
        print(
            f"done {end:.6f} {use.ru_utime + use.ru_stime:.3f} {use.ru_maxrss * 1024}", flush=True
        )
    finally:
        await bus.close(timeout=1.0)


def start_consumer(url: str, reader: Reader) -> subprocess.Popen[str]:
    """This script again, as a consumer process (``--consumer``)."""
    argv = [sys.executable, __file__, "--url", url, *reader.argv()]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


@dataclass(frozen=True)
class Ended:
    """A consumer process's ``done`` line: when, its CPU seconds, its peak RSS in bytes."""

    at: float
    cpu_s: float
    peak_rss: int

    @classmethod
    def parse(cls, line: str, what: str) -> Ended:
        parts = line.split()
        if len(parts) != 4 or parts[0] != "done":
            raise RuntimeError(f"{what} ended without its done line: {line!r}")
        return cls(float(parts[1]), float(parts[2]), int(parts[3]))


async def wait_ready(children: Sequence[subprocess.Popen[str]], what: str) -> None:
    for child in children:
        assert child.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), timeout=60)
        if line.strip() != "ready":
            raise RuntimeError(f"consumer for {what} did not start: {line!r}")


async def wait_done(
    children: Sequence[subprocess.Popen[str]], what: str, timeout: float = 300
) -> list[Ended]:
    ends = []
    for child in children:
        assert child.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), timeout=timeout)
        ends.append(Ended.parse(line, what))
    return ends


class Probe(Protocol):
    """What a caller measures around the timed part of a trial (``benchmarks/round.py``:
    CPU seconds and disk writes of the broker and of each process)."""

    def start(self, pids: Sequence[int]) -> None:
        """Just before the first publish; ``pids`` are the consumer processes."""

    def stop(self) -> None:
        """Once the last consumer reported done (the consumers are still alive)."""


@dataclass(frozen=True)
class Trial:
    seconds: float
    consumers: list[Ended]


async def trial(
    url: str,
    route: str,
    bodies: Sequence[bytes],
    *,
    window: int = 16,
    prefetch: int = 16,
    probe: Probe | None = None,
) -> Trial:
    """Publish ``bodies`` along ``route`` (one of ``ROUTES``) with ``window`` publishes in
    flight and time it from the first publish until the last consumer process handled the
    last one. Uses a prefix of its own and deletes what it declared."""
    kind, readers = ROUTES[route]
    prefix = f"bench-streams-{uuid.uuid4().hex[:8]}-"
    bus = await connect_bus(url, prefix=prefix)
    if kind == "stream":
        # retention well above what one trial writes, so nothing is dropped mid-trial
        await bus.declare_stream(StreamSpec("log", bindings=BINDINGS, max_bytes=2**32))
        names = ["log"] * readers
    else:
        names = [f"q{i}" for i in range(readers)]
    children = [
        start_consumer(url, Reader(kind, prefix, name, len(bodies), prefetch)) for name in names
    ]
    try:
        await wait_ready(children, route)
        sem = asyncio.Semaphore(window)

        async def publish(i: int, body: bytes) -> None:
            async with sem:
                await bus.publish(topology.EVENTS, KEY, body, {"i": i})

        if probe is not None:
            probe.start([c.pid for c in children])
        t0 = time.time()
        await asyncio.gather(*(publish(i, body) for i, body in enumerate(bodies)))
        ends = await wait_done(children, route)
        if probe is not None:
            probe.stop()
        for child in children:
            child.wait(30)
        return Trial(max(e.at for e in ends) - t0, ends)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
        await bus.delete_all(names)
        await bus.close()


async def main(args: argparse.Namespace) -> int:
    body = os.urandom(args.size_mib * 2**20)
    mib = args.count * args.size_mib
    print(
        f"{args.count} x {args.size_mib} MiB, publisher confirms, {args.window} in flight, "
        f"prefetch {args.prefetch}, each consumer its own process; {args.reps} alternating reps"
    )
    times: dict[str, list[float]] = {route: [] for route in ROUTES}
    floor = next(iter(ROUTES))
    for rep in range(args.reps):
        for route in ROUTES:
            run = await trial(
                args.url, route, [body] * args.count, window=args.window, prefetch=args.prefetch
            )
            elapsed = run.seconds
            times[route].append(elapsed)
            print(f"  rep {rep + 1} {route:<11} {elapsed:6.2f} s", flush=True)
    print(
        f"{'route':<11} | {'median s':>8} | {'MiB/s':>7} | {'x floor':>7} | "
        f"{'per rep x floor':<22} | raw aio-pika"
    )
    for route, runs in times.items():
        ratios = [t / f for t, f in zip(runs, times[floor], strict=True)]
        median = statistics.median(runs)
        print(
            f"{route:<11} | {median:8.2f} | {mib / median:7.0f} | "
            f"{statistics.median(ratios):6.2f}x | "
            f"{' '.join(f'{r:.2f}' for r in ratios):<22} | {RAW_AIO_PIKA[route]:.2f}x"
        )
    return 0


def add_payload_args(parser: argparse.ArgumentParser) -> None:
    """The broker and the bulk payload a transport benchmark moves (also stream_protocol.py's)."""
    parser.add_argument(
        "--url", default=os.environ.get("QFLARE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--size-mib", type=int, default=4)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--prefetch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_payload_args(parser)
    parser.add_argument(
        "--consumer",
        nargs=5,
        metavar=("KIND", "PREFIX", "NAME", "COUNT", "PREFETCH"),
        help=argparse.SUPPRESS,  # how the benchmark starts its consumer processes
    )
    parser.add_argument("--offset", default="first", help=argparse.SUPPRESS)
    parser.add_argument("--readers", type=int, default=1, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    if arguments.consumer:
        asyncio.run(consumer(arguments.url, Reader.from_args(arguments)))
        sys.exit(0)
    sys.exit(asyncio.run(main(arguments)))
