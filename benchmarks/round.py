"""One federated round of N clients with P-parameter updates over RabbitMQ, against the time
the same bytes take through RabbitMQ alone.

The services run as separate ``qflare serve`` processes (as deployed). The clients' update
envelopes (signed, sealed to ingest) are built before the round, so client-side training
and encoding are not timed. Measured in the same run on the same broker:

* round latency: from the aggregator's ``round.opened`` until its ``model.published`` of
  the round, while the clients publish their updates (a few in flight each time);
* floor: the same envelopes published with publisher confirms to one durable quorum queue
  and consumed (manual acks) by a separate process: the transport alone, bytes moved once.

The ratio latency / floor is the issue's figure (goal 1.5x). Three more floors move the
same bytes without any of QFLARE's processing (no crypto, no disk, no detection), to show
what a route costs by itself on this machine:

* fan-out floor: each publish routed by the broker to two queues, each drained by its own
  process: the least any design costs in which two services (a checking ingest and a
  storing aggregator) both receive every update;
* two-hop floor: publish to one queue, a relay process re-publishes each message
  (confirmed, before its ack) to a second queue drained by another process: the least a
  separate ingest that forwards the accepted update costs;
* path floor: the relay re-publishes to two queues (the aggregator's and the detector's
  copies): QFLARE's route.

For each it prints the CPU seconds of the broker and of every process, and the bytes they
wrote to storage (``/proc/<pid>/stat`` and ``io``; the broker's when it runs on this
machine), and the services' per-stage timestamps from their logs, so the cost can be
attributed.

    python benchmarks/round.py [--clients 100] [--params 1000000] [--rule mean] [--no-detection]
                               [--ingest 2] [--url amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from safetensors.numpy import save_file

from qflare.bus import Delivery, Outcome, QueueSpec, connect_bus, topology
from qflare.crypto import Certificate, provision
from qflare.messages import encode, open_envelope
from qflare.runtime.sqlite import fsync_write

JOB = "bench"
_TICK = os.sysconf("SC_CLK_TCK")


def proc_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, bytes written to storage) of a live process so far; zeros once it is
    gone. ``write_bytes`` counts what the process dirtied for the disk (fsynced or not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0, 0
    try:
        io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        written = int(io["write_bytes"])
    except (OSError, KeyError, ValueError):
        written = 0
    return cpu, written


def broker_pids(url: str) -> list[int]:
    """The local RabbitMQ's Erlang VM, when the broker runs on this machine."""
    if not any(h in url for h in ("@127.0.0.1", "@localhost")):
        return []
    out = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class Usage:
    """CPU seconds and storage writes of groups of processes between two snapshots."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.start = {g: [proc_usage(p) for p in pids] for g, pids in groups.items()}

    def stop(self) -> dict[str, tuple[float, int]]:
        out = {}
        for g, pids in self.groups.items():
            now = [proc_usage(p) for p in pids]
            out[g] = (
                sum(max(0.0, b[0] - a[0]) for a, b in zip(self.start[g], now, strict=True)),
                sum(max(0, b[1] - a[1]) for a, b in zip(self.start[g], now, strict=True)),
            )
        return out


def show_usage(label: str, wall: float, usage: dict[str, tuple[float, int]]) -> str:
    cpu = sum(c for c, _ in usage.values())
    disk = sum(w for _, w in usage.values())
    parts = ", ".join(f"{g} {c:.2f}" for g, (c, _) in usage.items())
    writes = ", ".join(f"{g} {w / 2**20:.0f}" for g, (_, w) in usage.items())
    return (
        f"{label:<34} {wall:6.2f} s wall  {cpu:6.2f} cpu-s ({parts})  "
        f"{disk / 2**20:6.0f} MiB to disk ({writes})"
    )


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--rule", default="mean")
    p.add_argument("--detection", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ingest", type=int, default=2, help="ingest replicas")
    p.add_argument(
        "--dp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="DP-FedAvg noise under the accountant's grant (off: no accountant)",
    )
    p.add_argument("--window", type=int, default=8, help="publishes in flight")
    p.add_argument(
        "--url", default=os.environ.get("QFLARE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
    )
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, state)")
    p.add_argument(
        "--floor-consumer",
        nargs=4,
        metavar=("PREFIX", "QUEUE", "COUNT", "KEY"),
        help=argparse.SUPPRESS,
    )
    p.add_argument("--relay", nargs=2, metavar=("PREFIX", "COUNT"), help=argparse.SUPPRESS)
    return p.parse_args()


async def relay(url: str, prefix: str, count: int) -> None:
    """Child process: what ingest does on the wire, without the crypto: consume each message
    from ``relay.in`` and publish it again (confirmed) before acking."""
    bus = await connect_bus(url, prefix=prefix)
    done = asyncio.Event()
    seen = 0

    async def handler(d: Delivery) -> Outcome:
        nonlocal seen
        await bus.publish(topology.EVENTS, "floor2.out", d.body)
        seen += 1
        if seen >= count:
            done.set()
        return Outcome.ACK

    await bus.consume(
        QueueSpec("relay.in", bindings=((topology.EVENTS, "floor2.in"),)), handler, prefetch=8
    )
    print("ready", flush=True)
    await done.wait()
    await asyncio.sleep(0.2)
    await bus.close()


async def floor_consumer(
    url: str, prefix: str, queue: str, count: int, key: str = "floor.#"
) -> None:
    """Child process: consume ``count`` messages, print the wall time of the last ack."""
    bus = await connect_bus(url, prefix=prefix)
    done = asyncio.Event()
    seen = 0

    async def handler(_d: Delivery) -> Outcome:
        nonlocal seen
        seen += 1
        if seen >= count:
            done.set()
        return Outcome.ACK

    await bus.consume(QueueSpec(queue, bindings=((topology.EVENTS, key),)), handler, prefetch=8)
    print("ready", flush=True)
    await done.wait()
    print(f"done {time.time():.6f}", flush=True)
    await asyncio.sleep(0.2)
    await bus.close()


async def publish_all(bus, exchange: str, key: str, envelopes: list[bytes], window: int) -> None:
    sem = asyncio.Semaphore(window)

    async def one(data: bytes) -> None:
        async with sem:
            await bus.publish(exchange, key, data)

    await asyncio.gather(*(one(e) for e in envelopes))


async def measure_floor(
    args: argparse.Namespace, prefix: str, envelopes: list[bytes]
) -> tuple[float, dict[str, tuple[float, int]]]:
    bus = await connect_bus(args.url, prefix=prefix)
    queue = "floor"
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--url",
            args.url,
            "--floor-consumer",
            prefix,
            queue,
            str(len(envelopes)),
            "floor.#",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        usage = Usage({"broker": broker_pids(args.url), "bench": [os.getpid(), child.pid]})
        t0 = time.time()
        await publish_all(bus, topology.EVENTS, "floor.x", envelopes, args.window)
        line = await asyncio.to_thread(child.stdout.readline)
        t1 = float(line.split()[1])
        used = usage.stop()
        child.wait(30)
        return t1 - t0, used
    finally:
        if child.poll() is None:
            child.kill()
        await bus.delete_all([queue])
        await bus.close()


async def measure_topology_floor(
    args: argparse.Namespace,
    prefix: str,
    envelopes: list[bytes],
    outs: tuple[str, ...],
    relayed: bool = True,
) -> tuple[float, dict[str, tuple[float, int]]]:
    """The same bytes along a route without QFLARE's processing: publish to one queue, a
    relay process re-publishes each message (confirmed, before its ack) to ``outs``, one
    consumer process drains each. With one out queue it is the least any design with a
    separate ingest that forwards the update needs (client -> ingest -> aggregator); with
    two it is QFLARE's route (the aggregator's and the detector's copies). Without the relay
    the broker itself copies each publish to ``outs`` (fan-out): the least any design needs
    in which two services (a checking ingest and a storing aggregator) both receive the
    update. Returns seconds until all are drained."""
    bus = await connect_bus(args.url, prefix=prefix)
    n = str(len(envelopes))
    children = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--url",
                args.url,
                "--floor-consumer",
                prefix,
                q,
                n,
                "floor2.out",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for q in outs
    ]
    if relayed:
        children.append(
            subprocess.Popen(
                [sys.executable, __file__, "--url", args.url, "--relay", prefix, n],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        usage = Usage(
            {"broker": broker_pids(args.url), "bench": [os.getpid(), *(c.pid for c in children)]}
        )
        t0 = time.time()
        await publish_all(
            bus, topology.EVENTS, "floor2.in" if relayed else "floor2.out", envelopes, args.window
        )
        ends = []
        for child in children[: len(outs)]:
            line = await asyncio.to_thread(child.stdout.readline)  # type: ignore[union-attr]
            ends.append(float(line.split()[1]))
        used = usage.stop()
        for child in children:
            child.wait(30)
        return max(ends) - t0, used
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
        await bus.delete_all(["relay.in", *outs])
        await bus.close()


def least_processing(envelopes: list[bytes], params: int, work: Path) -> dict[str, float]:
    """CPU seconds of the least work the issue asks of a round, each done once in this
    process: unseal (AES-256-GCM), check the signed digest (SHA-256), detection's pairwise
    distances (the Gram matrix of the n x d updates), a mean, and one durable copy (write +
    fsync). No design that checks, detects and stores can do less; two cores share it with
    the broker."""
    aead = AESGCM(AESGCM.generate_key(256))
    nonce = os.urandom(12)
    sealed = [aead.encrypt(nonce, e, b"") for e in envelopes]
    x = np.random.default_rng(0).standard_normal((len(envelopes), params), dtype=np.float32)
    folder = work / "least"
    folder.mkdir()
    out: dict[str, float] = {}

    def timed(name: str, fn) -> None:  # type: ignore[no-untyped-def]
        c = time.process_time()
        fn()
        out[name] = time.process_time() - c

    timed("unseal", lambda: [aead.decrypt(nonce, c, b"") for c in sealed])
    timed("digest", lambda: [hashlib.sha256(e).digest() for e in envelopes])
    timed("gram", lambda: x @ x.T)
    timed("mean", lambda: x.mean(axis=0))
    timed("fsync copy", lambda: [fsync_write(folder / f"u{i}", e) for i, e in enumerate(envelopes)])
    shutil.rmtree(folder, ignore_errors=True)
    return out


def service_times(root: Path) -> dict[str, float]:
    """First time each stage shows in the service logs (wall clock)."""
    marks: dict[str, float] = {}
    for log in sorted((root / "logs").glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            ev = rec.get("event", "")
            if ev in (
                "round.opened",
                "update.accepted",
                "update.stored",
                "round.closed",
                "round.verdict",
                "model.published",
            ):
                ts = time.mktime(time.strptime(rec["ts"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
                ts += float("0." + rec["ts"][20:23])
                key = f"{ev} ({rec['service']})"
                marks.setdefault(f"first {key}", ts)
                marks[f"last {key}"] = max(marks.get(f"last {key}", 0.0), ts)
    return marks


async def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="qflare-bench-round-"))
    prefix = f"bench-{uuid.uuid4().hex[:8]}-"
    print(
        f"{args.clients} clients, {args.params:,} float32 parameters each "
        f"({args.params * 4 / 2**20:.1f} MiB per update), rule={args.rule}, "
        f"detection={'on' if args.detection else 'off'}, DP {'on' if args.dp else 'off'}, "
        f"{args.ingest} ingest replica(s)"
    )
    fed = provision(work / "pki", clients=args.clients)
    rows = 1000 if args.params % 1000 == 0 else 1
    shape = (rows, args.params // rows)
    save_file({"w": np.zeros(shape, np.float32)}, str(work / "model0.safetensors"))
    ids = sorted(fed.clients)
    job = {
        "job_id": JOB,
        "rounds": 1,
        "participants": ids,
        "rule": args.rule,
        "f": min(10, (args.clients - 1) // 2) if args.detection else 0,
        "detection": args.detection,
        "noise_multiplier": 1.0 if args.dp else 0.0,
        "clip": 10.0,
        "epsilon_budget": 1e6,
        "min_updates": args.clients,
        "deadline_s": 600.0,
        "seed": 1,
        "initial_model": str(work / "model0.safetensors"),
    }
    (work / "qflare.toml").write_text(
        "[[jobs]]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in job.items()) + "\n"
    )
    t = time.perf_counter()
    ingest_cert = Certificate.from_bytes((fed.clients[ids[0]] / "ingest.qc").read_bytes())
    rng = np.random.default_rng(0)
    envelopes = []
    for cid in ids:
        delta = (rng.standard_normal(shape) * 1e-3).astype(np.float32)
        envelopes.append(
            encode(
                "update",
                {"base_version": 0, "num_samples": 10, "tensors": {"w": delta}},
                fed.identity(cid),
                job=JOB,
                round=1,
                seal_to=ingest_cert,
            )
        )
    total = sum(len(e) for e in envelopes)
    print(
        f"built {len(envelopes)} envelopes, {total / 2**20:.0f} MiB, in {time.perf_counter() - t:.1f} s (not timed)"
    )

    floor_before_run = await measure_floor(args, prefix + "f1-", envelopes)
    env = {
        **os.environ,
        "QFLARE_BROKER": args.url,
        "QFLARE_PREFIX": prefix,
        "QFLARE_DATA_DIR": str(work / "state"),
        "QFLARE_PKI_DIR": str(fed.root),
        "QFLARE_CONFIG": str(work / "qflare.toml"),
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    (work / "logs").mkdir()

    def start(name: str, key: str) -> None:
        e = dict(env)
        if name == "ingest":
            e["QFLARE_REPLICA"] = key
        with open(work / "logs" / f"{key}.log", "wb") as log:
            procs[key] = subprocess.Popen(
                [sys.executable, "-m", "qflare", "serve", name],
                env=e,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    bus = await connect_bus(args.url, prefix=prefix)
    trust = fed.trust()
    opened = asyncio.Event()
    published = asyncio.Event()
    stamps: dict[str, float] = {}

    async def on_event(d: Delivery) -> Outcome:
        e = open_envelope(d.body, trust)
        if e.kind == "round.opened" and "opened" not in stamps:
            stamps["opened"] = time.time()
            opened.set()
        elif e.kind == "model.published" and e.body.version == 1:
            stamps["published"] = time.time()
            published.set()
        return Outcome.ACK

    latency = float("nan")
    try:
        await bus.consume(
            QueueSpec(
                "bench.watch",
                bindings=(
                    (topology.EVENTS, f"round.opened.{JOB}"),
                    (topology.EVENTS, f"model.published.{JOB}"),
                ),
            ),
            on_event,
        )
        for name in ("alerting", "accountant", "detector") if args.dp else ("alerting", "detector"):
            start(name, name)
        for i in range(args.ingest):
            start("ingest", f"ingest-{i}")
        await asyncio.sleep(8)  # let the consumers declare their queues before the round opens
        start("aggregator", "aggregator")
        await asyncio.wait_for(opened.wait(), 120)
        usage = Usage(
            {
                "broker": broker_pids(args.url),
                **{k: [p.pid] for k, p in procs.items()},
                "bench": [os.getpid()],
            }
        )
        t0 = time.time()
        await publish_all(bus, topology.CLIENT, f"update.{JOB}", envelopes, args.window)
        t_sent = time.time()
        await asyncio.wait_for(published.wait(), 900)
        latency = stamps["published"] - t0
        round_usage = usage.stop()
        marks = service_times(work)
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        await bus.delete_all(
            [
                "aggregator",
                "detector",
                "accountant",
                "alerting",
                "alerting.dead",
                "ingest",
                *(f"ingest.rounds.ingest-{i}" for i in range(args.ingest)),
            ]
        )
        await bus.close()
    floor_after, after_usage = await measure_floor(args, prefix + "f2-", envelopes)
    floor_before, before_usage = floor_before_run
    floor, floor_usage = min(
        (floor_before, before_usage), (floor_after, after_usage), key=lambda r: r[0]
    )
    fan2, fan2_usage = await measure_topology_floor(
        args, prefix + "f5-", envelopes, ("out.a", "out.b"), relayed=False
    )
    hop2, hop2_usage = await measure_topology_floor(args, prefix + "f3-", envelopes, ("out.a",))
    path_floor, path_usage = await measure_topology_floor(
        args, prefix + "f4-", envelopes, ("out.a", "out.b")
    )
    print(f"\nclients published all updates in   {t_sent - t0:7.2f} s")
    for key in sorted(marks, key=marks.get):
        if key.startswith(
            (
                "first update.accepted",
                "last update.accepted",
                "last update.stored",
                "first round.closed",
                "first round.verdict",
                "first model.published",
            )
        ):
            print(f"  {key:<42} +{marks[key] - t0:7.2f} s")
    print(f"round latency (opened -> published)  {latency:7.2f} s")
    print(
        f"floor: same bytes, confirms, 1 queue {floor_before:7.2f} s before, {floor_after:.2f} s after the round"
    )
    print(f"ratio latency / floor                {latency / floor:7.2f}x   (goal <= 1.5x)")
    print(
        f"fan-out floor: 1 publish, 2 queues   {fan2:7.2f} s = {fan2 / floor:.2f}x the floor "
        "(the least two services that both receive each update cost, no crypto/disk)"
    )
    print(
        f"two-hop floor: relay + 1 queue       {hop2:7.2f} s = {hop2 / floor:.2f}x the floor "
        "(the least a separate ingest costs: client -> ingest -> aggregator, no crypto/disk)"
    )
    print(
        f"path floor: relay + 2 queues         {path_floor:7.2f} s = {path_floor / floor:.2f}x the floor "
        f"(QFLARE's route); latency / path floor {latency / path_floor:.2f}x"
    )
    print(
        "\nwhere the machine's time went (CPU seconds per process group, bytes written to storage):"
    )
    print(show_usage("floor (1 queue)", floor, floor_usage))
    print(show_usage("fan-out floor", fan2, fan2_usage))
    print(show_usage("two-hop floor", hop2, hop2_usage))
    print(show_usage("path floor", path_floor, path_usage))
    print(show_usage("round", latency, round_usage))
    least = least_processing(envelopes, args.params, work)
    least_cpu = sum(least.values())
    fan_cpu = sum(c for c, _ in fan2_usage.values())
    bound = max(fan2, (fan_cpu + least_cpu) / (os.cpu_count() or 1))
    print(
        f"least processing a round needs, once, in one process: {least_cpu:.2f} cpu-s ("
        + ", ".join(f"{k} {v:.2f}" for k, v in least.items())
        + ")"
    )
    print(
        f"so any design with two services receiving each update needs here about "
        f"max(fan-out wall, (fan-out cpu + least processing) / {os.cpu_count()} CPUs) = {bound:.2f} s "
        f"= {bound / floor:.2f}x the floor"
    )
    print(
        f"this machine has {os.cpu_count()} CPUs: the round used {sum(c for c, _ in round_usage.values()) / latency:.2f} "
        f"of them on average, the floor {sum(c for c, _ in floor_usage.values()) / floor:.2f}"
    )
    if args.keep:
        print(f"work folder: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    args = parse()
    if args.floor_consumer:
        prefix, queue, count, key = args.floor_consumer
        asyncio.run(floor_consumer(args.url, prefix, queue, int(count), key))
        return
    if args.relay:
        prefix, count = args.relay
        asyncio.run(relay(args.url, prefix, int(count)))
        return
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
