"""One federated round of N clients with P-parameter updates over RabbitMQ, against the time
the same bytes take through RabbitMQ alone.

The services run as separate ``qflare serve`` processes (as deployed). The clients' update
envelopes (signed, sealed to ingest) are built before the round, so client-side training
and encoding are not timed. Two figures, measured in the same run on the same broker:

* round latency: from the aggregator's ``round.opened`` until its ``model.published`` of
  the round, while the clients publish their updates (a few in flight each time);
* floor: the same envelopes published with publisher confirms to one durable quorum queue
  and consumed (manual acks) by a separate process: the transport alone.

The ratio latency / floor is what the round costs on top of moving its bytes once. A third
figure, the "path floor", moves the same bytes along QFLARE's route without its processing
(a relay process re-publishes each message to two queues drained by two processes), so
latency / path floor is what the crypto, storage, detection and aggregation add. Between
those the round also moves each update a second time (ingest re-publishes it to the
aggregator and detector queues), decrypts and verifies it, writes it to disk twice (fsync),
runs detection over all of them (O(n^2 d) Gram matrix) and aggregates; the per-stage
timestamps from the services' logs are printed so the cost can be attributed.

    python benchmarks/round.py [--clients 100] [--params 1000000] [--rule mean] [--no-detection]
                               [--ingest 2] [--url amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import argparse
import asyncio
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
from safetensors.numpy import save_file

from qflare.bus import Delivery, Outcome, QueueSpec, connect_bus, topology
from qflare.crypto import Certificate, provision
from qflare.messages import encode, open_envelope

JOB = "bench"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--rule", default="mean")
    p.add_argument("--detection", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ingest", type=int, default=2, help="ingest replicas")
    p.add_argument("--dp", action=argparse.BooleanOptionalAction, default=True,
                   help="DP-FedAvg noise under the accountant's grant (off: no accountant)")
    p.add_argument("--window", type=int, default=8, help="publishes in flight")
    p.add_argument("--url", default=os.environ.get("QFLARE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/"))
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, state)")
    p.add_argument("--floor-consumer", nargs=4, metavar=("PREFIX", "QUEUE", "COUNT", "KEY"), help=argparse.SUPPRESS)
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

    await bus.consume(QueueSpec("relay.in", bindings=((topology.EVENTS, "floor2.in"),)), handler, prefetch=8)
    print("ready", flush=True)
    await done.wait()
    await asyncio.sleep(0.2)
    await bus.close()


async def floor_consumer(url: str, prefix: str, queue: str, count: int, key: str = "floor.#") -> None:
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


async def measure_floor(args: argparse.Namespace, prefix: str, envelopes: list[bytes]) -> float:
    bus = await connect_bus(args.url, prefix=prefix)
    queue = "floor"
    child = subprocess.Popen(
        [sys.executable, __file__, "--url", args.url, "--floor-consumer", prefix, queue, str(len(envelopes)), "floor.#"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        t0 = time.time()
        await publish_all(bus, topology.EVENTS, "floor.x", envelopes, args.window)
        line = await asyncio.to_thread(child.stdout.readline)
        t1 = float(line.split()[1])
        child.wait(30)
        return t1 - t0
    finally:
        if child.poll() is None:
            child.kill()
        await bus.delete_all([queue])
        await bus.close()


async def measure_topology_floor(args: argparse.Namespace, prefix: str, envelopes: list[bytes]) -> float:
    """The same bytes along QFLARE's path without its processing: publish to one queue, a
    relay process re-publishes each message to two queues, two consumer processes drain
    them (the aggregator's and the detector's copies). Returns seconds until both are done."""
    bus = await connect_bus(args.url, prefix=prefix)
    n = str(len(envelopes))
    children = [
        subprocess.Popen([sys.executable, __file__, "--url", args.url, "--floor-consumer", prefix, q, n, "floor2.out"],
                         stdout=subprocess.PIPE, text=True)
        for q in ("out.a", "out.b")
    ]
    children.append(subprocess.Popen([sys.executable, __file__, "--url", args.url, "--relay", prefix, n],
                                     stdout=subprocess.PIPE, text=True))
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        t0 = time.time()
        await publish_all(bus, topology.EVENTS, "floor2.in", envelopes, args.window)
        ends = []
        for child in children[:2]:
            line = await asyncio.to_thread(child.stdout.readline)  # type: ignore[union-attr]
            ends.append(float(line.split()[1]))
        for child in children:
            child.wait(30)
        return max(ends) - t0
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
        await bus.delete_all(["relay.in", "out.a", "out.b"])
        await bus.close()


def service_times(root: Path) -> dict[str, float]:
    """First time each stage shows in the service logs (wall clock)."""
    marks: dict[str, float] = {}
    for log in sorted((root / "logs").glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            ev = rec.get("event", "")
            if ev in ("round.opened", "update.accepted", "update.stored", "round.closed", "round.verdict", "model.published"):
                ts = time.mktime(time.strptime(rec["ts"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
                ts += float("0." + rec["ts"][20:23])
                key = f"{ev} ({rec['service']})"
                marks.setdefault(f"first {key}", ts)
                marks[f"last {key}"] = max(marks.get(f"last {key}", 0.0), ts)
    return marks


async def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="qflare-bench-round-"))
    prefix = f"bench-{uuid.uuid4().hex[:8]}-"
    print(f"{args.clients} clients, {args.params:,} float32 parameters each "
          f"({args.params * 4 / 2**20:.1f} MiB per update), rule={args.rule}, "
          f"detection={'on' if args.detection else 'off'}, DP {'on' if args.dp else 'off'}, "
          f"{args.ingest} ingest replica(s)")
    fed = provision(work / "pki", clients=args.clients)
    rows = 1000 if args.params % 1000 == 0 else 1
    shape = (rows, args.params // rows)
    save_file({"w": np.zeros(shape, np.float32)}, str(work / "model0.safetensors"))
    ids = sorted(fed.clients)
    job = {
        "job_id": JOB, "rounds": 1, "participants": ids, "rule": args.rule,
        "f": min(10, (args.clients - 1) // 2) if args.detection else 0, "detection": args.detection,
        "noise_multiplier": 1.0 if args.dp else 0.0, "clip": 10.0, "epsilon_budget": 1e6, "min_updates": args.clients,
        "deadline_s": 600.0, "seed": 1, "initial_model": str(work / "model0.safetensors"),
    }
    (work / "qflare.toml").write_text(
        "[[jobs]]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in job.items()) + "\n")
    t = time.perf_counter()
    ingest_cert = Certificate.from_bytes((fed.clients[ids[0]] / "ingest.qc").read_bytes())
    rng = np.random.default_rng(0)
    envelopes = []
    for cid in ids:
        delta = (rng.standard_normal(shape) * 1e-3).astype(np.float32)
        envelopes.append(encode("update", {"base_version": 0, "num_samples": 10, "tensors": {"w": delta}},
                                fed.identity(cid), job=JOB, round=1, seal_to=ingest_cert))
    total = sum(len(e) for e in envelopes)
    print(f"built {len(envelopes)} envelopes, {total / 2**20:.0f} MiB, in {time.perf_counter() - t:.1f} s (not timed)")

    floor_before = await measure_floor(args, prefix + "f1-", envelopes)
    env = {**os.environ, "QFLARE_BROKER": args.url, "QFLARE_PREFIX": prefix, "QFLARE_DATA_DIR": str(work / "state"),
           "QFLARE_PKI_DIR": str(fed.root), "QFLARE_CONFIG": str(work / "qflare.toml")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    (work / "logs").mkdir()

    def start(name: str, key: str) -> None:
        e = dict(env)
        if name == "ingest":
            e["QFLARE_REPLICA"] = key
        with open(work / "logs" / f"{key}.log", "wb") as log:
            procs[key] = subprocess.Popen([sys.executable, "-m", "qflare", "serve", name], env=e,
                                          stdout=log, stderr=subprocess.STDOUT)

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
        await bus.consume(QueueSpec("bench.watch", bindings=((topology.EVENTS, f"round.opened.{JOB}"),
                                                           (topology.EVENTS, f"model.published.{JOB}"))), on_event)
        for name in ("alerting", "accountant", "detector") if args.dp else ("alerting", "detector"):
            start(name, name)
        for i in range(args.ingest):
            start("ingest", f"ingest-{i}")
        await asyncio.sleep(8)  # let the consumers declare their queues before the round opens
        start("aggregator", "aggregator")
        await asyncio.wait_for(opened.wait(), 120)
        t0 = time.time()
        await publish_all(bus, topology.CLIENT, f"update.{JOB}", envelopes, args.window)
        t_sent = time.time()
        await asyncio.wait_for(published.wait(), 900)
        latency = stamps["published"] - t0
        marks = service_times(work)
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        await bus.delete_all(["aggregator", "detector", "accountant", "alerting", "alerting.dead", "ingest",
                              *(f"ingest.rounds.ingest-{i}" for i in range(args.ingest))])
        await bus.close()
    floor_after = await measure_floor(args, prefix + "f2-", envelopes)
    floor = min(floor_before, floor_after)
    path_floor = await measure_topology_floor(args, prefix + "f3-", envelopes)
    print(f"\nclients published all updates in   {t_sent - t0:7.2f} s")
    for key in sorted(marks, key=marks.get):
        if key.startswith(("first update.accepted", "last update.accepted", "last update.stored",
                           "first round.closed", "first round.verdict", "first model.published")):
            print(f"  {key:<42} +{marks[key] - t0:7.2f} s")
    print(f"round latency (opened -> published)  {latency:7.2f} s")
    print(f"floor: same bytes, confirms, 1 queue {floor_before:7.2f} s before, {floor_after:.2f} s after the round")
    print(f"ratio latency / floor                {latency / floor:7.2f}x   (goal <= 1.5x)")
    print(f"path floor: relay + 2 queues, no crypto/disk/detection {path_floor:7.2f} s; "
          f"latency / path floor {latency / path_floor:.2f}x")
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
