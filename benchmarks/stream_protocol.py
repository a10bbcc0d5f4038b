"""One write, three readers: RabbitMQ's stream protocol (``rabbitmq_stream``, port 5552,
the ``rstream`` client) against AMQP 0.9.1 (aio-pika), measured in one run on one broker.

The question (the round's CPU budget): would the services read update streams more cheaply
over the stream protocol than over AMQP? Each variant moves the same bodies (default 100 x
4 MiB, each ``sha256(rest) + rest``), a window of confirmed publishes in flight, and times
from the first publish until the last reader process has its last message:

* ``quorum x1``       one quorum queue, one consumer (``streams.trial``): the quorum floor;
* ``amqp>amqp x3``    published over AMQP into one stream, read by three AMQP reader
  processes from ``"first"`` (``streams.trial``'s ``stream x3``): the stream floor;
* ``amqp>rstream x3`` the same AMQP publish, read by three ``rstream`` Consumer processes
  from the first offset; each body decoded from its AMQP 1.0 form (``amqp_decoder``, as a
  service that needs the headers would);
* ``rstream>rstream x3`` published with ``rstream``'s Producer (raw bytes, ``send_wait``
  under the same window), read raw by three ``rstream`` processes;
* the two ``rstream`` readers again with ``*``: ``rstream.connection.Connection._read``
  replaced by ``StreamReader.readexactly``. rstream 1.1.1 reads the socket 256 bytes per
  ``await`` (``CHUNK_SIZE``), about 16,000 awaits per 4 MiB; the starred rows say what a
  client without that costs.

Per trial: the CPU seconds (``/proc/<pid>/stat``) of the broker's Erlang VM, of this
process (the publisher) and of each reader. Variants alternate, so drift on a shared
machine hits all of them. Before the timed repetitions each rstream variant runs once with
every reader checking every body against its sha256 (hashing is not timed); the timed ones
check counts and sizes only. Every trial declares one stream or queue under a prefix of its
own (over AMQP, through the bus) and deletes it.

Needs ``rabbitmq-plugins enable rabbitmq_stream`` (no broker restart; the plugin listens on
every interface at 5552 unless ``stream.listeners.tcp.1`` says otherwise) and
``pip install -e ".[stream-protocol]"`` (rstream 1.1.1).

    python benchmarks/stream_protocol.py [--url amqp://...] [--stream-port 5552]
                                         [--count 100] [--size-mib 4] [--window 16]
                                         [--prefetch 16] [--credit 10] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from round import Meter, broker_pid
from streams import BINDINGS, KEY, add_payload_args, trial

from qflare.bus import StreamSpec, connect_bus, topology

#: name: (writer, reader, fixed read); ``amqp`` readers and the quorum floor are streams.py's.
VARIANTS: dict[str, tuple[str, str, bool]] = {
    "quorum x1": ("amqp", "quorum", False),
    "amqp>amqp x3": ("amqp", "amqp", False),
    "amqp>rstream x3": ("amqp", "rstream", False),
    "amqp>rstream* x3": ("amqp", "rstream", True),
    "rstream>rstream x3": ("rstream", "rstream", False),
    "rstream>rstream* x3": ("rstream", "rstream", True),
}
READERS = 3
#: what the latency ratios are taken against, repetition by repetition
STREAM_FLOOR = "amqp>amqp x3"
DIGEST = 32


def make_bodies(count: int, size: int) -> list[bytes]:
    """``count`` distinct bodies of ``size`` bytes that carry their own sha256 up front."""
    bodies = []
    for _ in range(count):
        rest = os.urandom(size - DIGEST)
        bodies.append(hashlib.sha256(rest).digest() + rest)
    return bodies


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom the stream protocol connects, taken from the AMQP URL."""

    host: str
    port: int
    username: str
    password: str
    vhost: str

    @classmethod
    def from_url(cls, url: str, port: int) -> Endpoint:
        parts = urlsplit(url)
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        return cls(
            parts.hostname or "127.0.0.1",
            port,
            unquote(parts.username or "guest"),
            unquote(parts.password or "guest"),
            vhost,
        )

    def kwargs(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "password": self.password,
            "vhost": self.vhost,
        }


def use_readexactly() -> None:
    """Replace rstream's 256-bytes-per-await socket read by one ``readexactly`` per frame
    part (the length, then the frame)."""
    from rstream import connection

    async def _read(self: connection.Connection, n: int) -> bytes:
        assert self._reader is not None
        try:
            return await self._reader.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise connection.ConnectionClosed from exc

    connection.Connection._read = _read  # type: ignore[method-assign,assignment]


@dataclass
class Tally:
    """What one rstream reader saw: messages, chunks (Deliver frames), checked bodies."""

    count: int
    size: int
    verify: bool
    seen: int = 0
    chunks: int = 0
    verified: int = 0
    bad: list[str] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self, offset: int, body: bytes) -> None:
        self.seen += 1
        if len(body) != self.size:
            self.bad.append(f"offset {offset}: {len(body)} bytes, expected {self.size}")
        elif self.verify:
            view = memoryview(body)
            if hashlib.sha256(view[DIGEST:]).digest() == body[:DIGEST]:
                self.verified += 1
            else:
                self.bad.append(f"offset {offset}: sha256 differs")
        if self.seen == self.count:
            self.done.set()


async def rstream_reader(
    endpoint: Endpoint, stream: str, tally: Tally, *, decode: str, credit: int
) -> None:
    """A reader process: prints ``ready`` once subscribed, then ``info ...`` and ``done
    <time> <cpu-s> <peak-rss-bytes>`` (streams.py's line) once it has all messages."""
    from rstream import Consumer, ConsumerOffsetSpecification, OffsetType, amqp_decoder

    deliver = Consumer._on_deliver

    async def counting(self: Consumer, frame: Any, *args: Any, **kwargs: Any) -> None:
        tally.chunks += 1
        await deliver(self, frame, *args, **kwargs)

    Consumer._on_deliver = counting  # type: ignore[method-assign]

    def body_of(message: Any) -> bytes:
        if decode == "amqp":
            return bytes(amqp_decoder(message).body)
        return bytes(message)

    async def on_message(message: Any, context: Any) -> None:
        tally.take(context.offset, body_of(message))

    consumer = Consumer(**endpoint.kwargs())
    await consumer.start()
    try:
        await consumer.subscribe(
            stream,
            on_message,
            offset_specification=ConsumerOffsetSpecification(OffsetType.FIRST, None),
            initial_credit=credit,
        )
        print("ready", flush=True)
        await tally.done.wait()
        end = time.time()
        use = resource.getrusage(resource.RUSAGE_SELF)
        print(f"info {tally.chunks} {tally.verified} {';'.join(tally.bad) or '-'}", flush=True)
        print(
            f"done {end:.6f} {use.ru_utime + use.ru_stime:.3f} {use.ru_maxrss * 1024}", flush=True
        )
    finally:
        await consumer.close()


@dataclass(frozen=True)
class Run:
    """One trial: seconds, CPU seconds per process (``broker``, ``publisher``, ``reader i``),
    and per rstream reader its chunks and verified bodies."""

    seconds: float
    cpu: dict[str, float]
    chunks: list[int] = field(default_factory=list)
    verified: list[int] = field(default_factory=list)


async def _read_lines(child: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """The reader's ``info`` and ``done`` lines."""
    assert child.stdout is not None
    info = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), timeout=timeout)
    done = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), timeout=timeout)
    return info, done


async def rstream_trial(
    url: str,
    endpoint: Endpoint,
    variant: str,
    bodies: Sequence[bytes],
    *,
    window: int,
    credit: int,
    verify: bool,
) -> Run:
    """Declare a stream over AMQP, start three rstream reader processes on it, publish
    ``bodies`` (over AMQP or with rstream's Producer, ``window`` in flight, confirmed) and
    time it until the last reader has the last body."""
    writer, _, fixed = VARIANTS[variant]
    prefix = f"bench-rstream-{uuid.uuid4().hex[:8]}-"
    bus = await connect_bus(url, prefix=prefix)
    await bus.declare_stream(StreamSpec("log", bindings=BINDINGS, max_bytes=2**32))
    stream = bus.name("log")
    argv = [sys.executable, __file__, "--url", url, "--stream-port", str(endpoint.port)]
    argv += ["--rstream-reader", stream, str(len(bodies)), str(len(bodies[0]))]
    argv += ["--decode", "amqp" if writer == "amqp" else "raw", "--credit", str(credit)]
    argv += ["--fixed-read"] * fixed + ["--verify"] * verify
    children = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(READERS)]
    producer: Any = None
    try:
        for child in children:
            assert child.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), timeout=60)
            if line.strip() != "ready":
                raise RuntimeError(f"rstream reader for {variant} did not start: {line!r}")
        sem = asyncio.Semaphore(window)
        publish: Callable[[int, bytes], Any]
        if writer == "amqp":

            async def publish(i: int, body: bytes) -> None:
                async with sem:
                    await bus.publish(topology.EVENTS, KEY, body, {"i": i})

        else:
            from rstream import Producer

            producer = Producer(**endpoint.kwargs())
            await producer.start()
            # the publisher's connection and declaration, as a service would hold them
            await producer._get_or_create_publisher(stream)

            async def publish(i: int, body: bytes) -> None:
                async with sem:
                    await producer.send_wait(stream, body, timeout=60)

        meter = Meter({"broker": broker_pid(url), "publisher": os.getpid()})
        meter.start([c.pid for c in children])
        t0 = time.time()
        await asyncio.gather(*(publish(i, body) for i, body in enumerate(bodies)))
        lines = [await _read_lines(child, 300) for child in children]
        meter.stop()
        chunks, verified, ends = [], [], []
        for info, done in lines:
            word, n_chunks, n_verified, bad = info.strip().split(maxsplit=3)
            if word != "info" or bad != "-":
                raise RuntimeError(f"{variant}: a reader reports {info.strip()!r}")
            chunks.append(int(n_chunks))
            verified.append(int(n_verified))
            ends.append(float(done.split()[1]))
        for child in children:
            child.wait(30)
        cpu = {name: use.cpu_s for name, use in meter.used.items()}
        return Run(max(ends) - t0, cpu, chunks, verified)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
        if producer is not None:
            await producer.close()
        await bus.delete_all(["log"])
        await bus.close()


async def amqp_trial(url: str, variant: str, bodies: Sequence[bytes], args: Any) -> Run:
    """streams.py's own trial, with the broker and this process metered too."""
    meter = Meter({"broker": broker_pid(url), "publisher": os.getpid()})
    route = "quorum x1" if VARIANTS[variant][1] == "quorum" else "stream x3"
    run = await trial(url, route, bodies, window=args.window, prefetch=args.prefetch, probe=meter)
    return Run(run.seconds, {name: use.cpu_s for name, use in meter.used.items()})


async def one(
    url: str,
    endpoint: Endpoint,
    variant: str,
    bodies: Sequence[bytes],
    args: Any,
    *,
    verify: bool = False,
) -> Run:
    if VARIANTS[variant][1] == "rstream":
        return await rstream_trial(
            url, endpoint, variant, bodies, window=args.window, credit=args.credit, verify=verify
        )
    return await amqp_trial(url, variant, bodies, args)


def _readers(run: Run) -> list[float]:
    return [cpu for name, cpu in sorted(run.cpu.items()) if name.startswith("reader")]


def report(runs: dict[str, list[Run]]) -> None:
    print(
        f"\n{'variant':<20} | {'latency s med/worst':>19} | {'broker CPU-s':>12} | "
        f"{'publisher':>9} | {'each reader CPU-s med/worst':>27} | {'all CPU-s':>9} | "
        f"x stream floor | chunks/reader"
    )
    floor = [r.seconds for r in runs[STREAM_FLOOR]]
    for variant, trials in runs.items():
        secs = [r.seconds for r in trials]
        broker = [r.cpu.get("broker", 0.0) for r in trials]
        pub = [r.cpu.get("publisher", 0.0) for r in trials]
        readers = [c for r in trials for c in _readers(r)]
        total = [
            r.cpu.get("broker", 0.0) + r.cpu.get("publisher", 0.0) + sum(_readers(r))
            for r in trials
        ]
        chunks = sorted({c for r in trials for c in r.chunks})
        print(
            f"{variant:<20} | {statistics.median(secs):8.2f} / {max(secs):8.2f} | "
            f"{statistics.median(broker):5.2f}/{max(broker):5.2f} | "
            f"{statistics.median(pub):9.2f} | "
            f"{statistics.median(readers):12.2f} / {max(readers):12.2f} | "
            f"{statistics.median(total):9.2f} | "
            f"{statistics.median(t / f for t, f in zip(secs, floor, strict=True)):13.2f}x | "
            f"{chunks or '-'}"
        )


async def main(args: argparse.Namespace) -> int:
    endpoint = Endpoint.from_url(args.url, args.stream_port)
    size = args.size_mib * 2**20
    bodies = make_bodies(args.count, size)
    print(
        f"{args.count} x {args.size_mib} MiB, confirms, {args.window} in flight, AMQP prefetch "
        f"{args.prefetch}, rstream initial credit {args.credit} chunks, {READERS} readers "
        f"each its own process; {args.reps} alternating reps; load {os.getloadavg()[0]:.2f}"
    )
    for variant, (_, reader, _) in VARIANTS.items():
        if reader == "rstream":
            run = await one(args.url, endpoint, variant, bodies, args, verify=True)
            print(
                f"  check {variant:<20} sha256 verified per reader: {run.verified} of "
                f"{args.count}; chunks per reader {run.chunks}",
                flush=True,
            )
            if any(v != args.count for v in run.verified):
                return 1
    runs: dict[str, list[Run]] = {variant: [] for variant in VARIANTS}
    for rep in range(args.reps):
        for variant in VARIANTS:
            run = await one(args.url, endpoint, variant, bodies, args)
            runs[variant].append(run)
            cpu = " ".join(f"{k} {v:.2f}" for k, v in run.cpu.items() if k != "others")
            print(f"  rep {rep + 1} {variant:<20} {run.seconds:6.2f} s  {cpu}", flush=True)
    report(runs)
    print(f"load at the end {os.getloadavg()[0]:.2f}")
    return 0


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_payload_args(parser)
    parser.add_argument("--stream-port", type=int, default=5552)
    parser.add_argument("--credit", type=int, default=10)
    parser.add_argument(
        "--rstream-reader",
        nargs=3,
        metavar=("STREAM", "COUNT", "SIZE"),
        help=argparse.SUPPRESS,  # how the benchmark starts its reader processes
    )
    parser.add_argument("--decode", choices=("amqp", "raw"), help=argparse.SUPPRESS)
    parser.add_argument("--fixed-read", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--verify", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    if arguments.rstream_reader:
        if arguments.fixed_read:
            use_readexactly()
        name, count, body_size = arguments.rstream_reader
        asyncio.run(
            rstream_reader(
                Endpoint.from_url(arguments.url, arguments.stream_port),
                name,
                Tally(int(count), int(body_size), arguments.verify),
                decode=arguments.decode,
                credit=arguments.credit,
            )
        )
        sys.exit(0)
    sys.exit(asyncio.run(main(arguments)))
