"""A 200 MB body crosses RabbitMQ as signed chunks and is reassembled in bounded memory.

The consumer runs in its own process so that its memory is measured alone: tracemalloc
(numpy and bytes allocations are traced) from just before the first delivery until the
reassembled envelope is opened and its tensors hashed; the peak above that baseline must
stay under 1.5x the body size. ``prefetch=1`` keeps at most one chunk in the client.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from qflare.bus import Bus, topology
from qflare.crypto import Federation, provision
from qflare.messages import Update, encode, split

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

BODY_MB = 200
CHUNK = 8 * 1024 * 1024
JOB = "job-big"

CONSUMER = rf"""
import asyncio, hashlib, json, sys, tracemalloc

def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])

def reset_hwm():
    # Linux >= 4.0: writing 5 resets the peak RSS (VmHWM) to the current RSS.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
from qflare.bus import QueueSpec, Outcome, connect_bus, topology
from qflare.crypto import load_trust
from qflare.messages import Limits, Reassembler, open_envelope

async def main(url, prefix, trust_dir, queue):
    trust = load_trust(trust_dir)
    bus = await connect_bus(url, prefix=prefix)
    done = asyncio.get_running_loop().create_future()
    reassembler = Reassembler(trust)
    stats = {{"chunks": 0}}

    async def handler(delivery):
        if stats["chunks"] == 0:
            tracemalloc.start()
            stats["base"] = tracemalloc.get_traced_memory()[0]
            stats["hwm_reset"] = reset_hwm()
            stats["rss0_kb"] = status_kb("VmRSS")
        stats["chunks"] += 1
        whole = reassembler.feed(delivery.body)
        if whole is not None:
            env = open_envelope(whole, trust, max_bytes=Limits().max_body_bytes,
                                expect_kind="update", expect_job="{JOB}")
            digest = hashlib.sha256()
            for name in sorted(env.body.tensors):
                digest.update(env.body.tensors[name].data)
            stats["peak"] = tracemalloc.get_traced_memory()[1]
            stats["rss1_kb"] = status_kb("VmHWM")
            stats["digest"] = digest.hexdigest()
            stats["envelope_bytes"] = len(whole)
            done.set_result(None)
        return Outcome.ACK

    await bus.consume(QueueSpec(queue, bindings=((topology.CLIENT, "update.#"),),
                                single_active=True), handler, prefetch=1)
    print("READY", flush=True)
    await asyncio.wait_for(done, 120)
    await bus.close()
    print(json.dumps(stats), flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_200mb_body_over_rabbitmq_in_chunks(
    rabbit_bus: Bus, amqp_url: str, bus_prefix: str, tmp_path: Path
) -> None:
    fed: Federation = provision(tmp_path / "fed", clients=1)
    client = fed.identity("client-000")
    rng = np.random.default_rng(3)
    n = BODY_MB * 1024 * 1024 // 4
    tensors = {
        "a": rng.standard_normal(n // 2, dtype=np.float32),
        "b": rng.standard_normal((n // 2 // 1024, 1024), dtype=np.float32),
    }
    body_bytes = sum(t.nbytes for t in tensors.values())
    expected = hashlib.sha256()
    for name in sorted(tensors):
        expected.update(tensors[name].data)

    queue = "big-ingest"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CONSUMER,
        amqp_url,
        bus_prefix,
        str(fed.root / "ca"),
        queue,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.strip() == b"READY", (line, await proc.stderr.read())
        data = encode(
            "update",
            Update(base_version=0, num_samples=1, tensors=tensors),
            client,
            job=JOB,
            round=1,
        )
        del tensors
        sent = 0
        for part in split(data, client, job=JOB, round=1, chunk_size=CHUNK):
            assert await rabbit_bus.publish(topology.CLIENT, f"update.{JOB}", part)
            sent += 1
        del data
        out, err = await asyncio.wait_for(proc.communicate(), 180)
        assert proc.returncode == 0, err.decode()[-3000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await rabbit_bus.delete_all([queue])
    stats = json.loads(out.decode().strip().splitlines()[-1])
    extra = stats["peak"] - stats["base"]
    rss_extra = (stats["rss1_kb"] - stats["rss0_kb"]) * 1024 if stats["hwm_reset"] else None
    rss = (
        "n/a"
        if rss_extra is None
        else f"{rss_extra / 2**20:.0f} MiB = {rss_extra / body_bytes:.2f}x"
    )
    print(
        f"\nbody {body_bytes / 2**20:.0f} MiB in {sent - 1} chunks + manifest; consumer "
        f"peak extra (tracemalloc) {extra / 2**20:.0f} MiB = {extra / body_bytes:.2f}x; "
        f"peak RSS growth {rss}"
    )
    assert stats["digest"] == expected.hexdigest(), "tensors differ after the trip"
    assert stats["chunks"] == sent
    assert extra < 1.5 * body_bytes
    if rss_extra is not None:
        assert rss_extra < 1.5 * body_bytes
