"""The 500 MB job (issue 12): a model of 125M float32 parameters, six participants each in
its own process, the services as ``qflare serve`` processes, rule ``trimmed_mean`` with
detection and DP on, over RabbitMQ; printed against a stream floor for the same bytes
measured in the same run, with the peak memory of every process.

The model has four tensors, one of them 160 MB (more than one RabbitMQ message holds). It
reaches the participants in parts from the job's model stream; each update goes back in
parts on the update stream (the SDK, ``qflare.messages.parts``); the detector and the
aggregator keep the round's matrix (6 x 125M values, 3 GB) in a file past their
``rows_in_memory_mb`` and compute on column blocks; the aggregator reads its base model
from its file and writes the new one into a file, block by block
(``qflare.runtime.modelfile``). A participant computes a data-free update (a small step
shared by all plus noise of its own, so that no two updates are copies).

Printed, per round: its **latency**, from the aggregator's ``round.opened`` to its
``model.published`` (received on ``qflare.events`` by this process); it includes the
participants reading the model, computing and sending their updates. The **stream floor**:
the round's bytes through RabbitMQ alone in the same run, ``benchmarks/streams.py``'s
``trial``: the updates' bytes (``--clients`` x the model, in 8 MiB messages) written once
into one stream and read by three consumer processes (ingest, detector, aggregator), plus
the model's bytes written once and read by ``--clients`` consumer processes (the
participants). Then the ratio. And the peak resident memory (``VmHWM``) of every service
and participant process, against the issue's bounds: under 1 GB for a service, under 2.5x
the model for a participant.

    python benchmarks/large_model.py [--url amqp://...] [--rounds 1] [--json out.json]

``--rounds 2 --no-floor`` is the end-to-end test's run (tests/e2e/test_large_model.py).
It moves about 4 GB through the broker per round: minutes on a 2-core machine. Everything it
declares carries a prefix of its own and is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from workdir import work_folder

HERE = Path(__file__).resolve().parent
JOB = "large"
MIB = 2**20
#: the model: 125M float32 values (500 MB); "embed.weight" alone is 160 MB
SHAPES = {
    "embed.weight": (40_000, 1_000),
    "block1.weight": (5_000, 6_000),
    "block2.weight": (5_000, 6_000),
    "head.weight": (25_000, 1_000),
}
SERVICE_LIMIT = 1_000_000_000  # bytes: "every service process under 1 GB"
PARTICIPANT_FACTOR = 2.5  # "every participant under 2.5x the model's size"
FLOOR_MESSAGE = 8 * MIB


# -- the participant (a process of its own) --------------------------------------------------
def peak_rss(pid: int | str = "self") -> int:
    """``VmHWM`` of process ``pid`` in bytes (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


async def participant_main(args: argparse.Namespace) -> int:
    from qflare.client import Kit, LocalUpdate, Participant, RoundInfo
    from qflare.messages.tensors import model_digest

    sent: list[int] = []

    class Large(Participant):
        """``0.01 + noise`` per value, built one tensor at a time."""

        def compute_update(
            self, global_tensors: Mapping[str, np.ndarray], info: RoundInfo
        ) -> LocalUpdate:
            rng = np.random.default_rng([zlib.crc32(self.id.encode()), info.round])
            delta: dict[str, np.ndarray] = {}
            for name in sorted(global_tensors):
                step = rng.standard_normal(np.shape(global_tensors[name]), dtype=np.float32)
                step *= np.float32(1e-3)
                step += np.float32(1e-2)
                delta[name] = step
            sent.append(info.round)
            return LocalUpdate(delta, 100)

    p = Large(Kit.load(args.kit), None, None, broker=args.url, prefix=args.prefix, jobs=[JOB])
    reason = await p.run(JOB, timeout=args.timeout)
    latest = p.latest_model(JOB)
    Path(args.out).write_text(
        json.dumps(
            {
                "client": p.id,
                "end": reason,
                "rounds_sent": sent,
                "final_version": None if latest is None else latest[0],
                "final_digest": None if latest is None else model_digest(latest[1]).hex(),
                "vmhwm_bytes": peak_rss(),
            }
        )
    )
    return 0


# -- the job ---------------------------------------------------------------------------------
def write_model(path: Path, scale: float = 1.0, seed: int = 0) -> int:
    """The round-0 model (each tensor's rows times ``scale``), written a block at a time;
    its size in bytes."""
    from qflare.messages.tensors import Layout
    from qflare.runtime.modelfile import ModelFile

    names = tuple(sorted(SHAPES))
    shapes = tuple((max(1, round(SHAPES[n][0] * scale)), SHAPES[n][1]) for n in names)
    layout = Layout(names, shapes, tuple("float32" for _ in names))
    rng = np.random.default_rng(seed)
    with ModelFile.create(path, layout) as f:
        step = 8_000_000
        for a in range(0, layout.size, step):
            b = min(a + step, layout.size)
            f.write_values(a, rng.standard_normal(b - a, dtype=np.float32) * np.float32(0.01))
        f.commit()
        return f.nbytes


def job_table(ids: Sequence[str], model: Path, rounds: int) -> dict[str, Any]:
    return {
        "job_id": JOB,
        "rounds": rounds,
        "participants": list(ids),
        "rule": "trimmed_mean",
        "f": 1,
        "detection": True,
        "sample_rate": 1.0,
        "noise_multiplier": 0.5,
        "clip": 200.0,
        "delta": 1e-5,
        "epsilon_budget": 1000.0,
        "min_updates": len(ids),
        "deadline_s": 1200.0,
        "seed": 20261206,
        "initial_model": str(model),
    }


async def run_job(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Provision, start the services and the participants, follow the rounds on
    ``qflare.events``; returns the figures."""
    from qflare.bus import Delivery, Outcome, QueueSpec, connect_bus, topology
    from qflare.crypto import provision
    from qflare.messages import open_envelope

    fed = provision(work / "pki", clients=args.clients)
    ids = sorted(fed.clients)
    model = work / "model0.safetensors"
    figures: dict[str, Any] = {"model_bytes": write_model(model, args.scale), "rounds": {}}
    config = work / "qflare.toml"
    config.write_text(
        "[[jobs]]\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in job_table(ids, model, args.rounds).items())
    )
    prefix = f"bench-large-{uuid.uuid4().hex[:8]}-"
    env = {
        **os.environ,
        "QFLARE_BROKER": args.url,
        "QFLARE_PREFIX": prefix,
        "QFLARE_DATA_DIR": str(work / "state"),
        "QFLARE_PKI_DIR": str(fed.root),
        "QFLARE_CONFIG": str(config),
        "QFLARE_LOG_FORMAT": "json",
        "QFLARE_LOG_LEVEL": "INFO",
    }
    logs = work / "logs"
    logs.mkdir()
    services: dict[str, subprocess.Popen[bytes]] = {}
    clients: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(key: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(logs / f"{key}.log", "wb") as log:
            return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    bus = await connect_bus(args.url, prefix=prefix)
    trust = fed.trust()
    seen: dict[tuple[str, int], float] = {}

    async def on_event(d: Delivery) -> Outcome:
        e = open_envelope(d.body, trust)
        seen.setdefault((e.kind, e.round), time.time())
        return Outcome.ACK

    watch = QueueSpec(
        "bench.watch",
        bindings=tuple(
            (topology.EVENTS, f"{kind}.{JOB}") for kind in ("round.opened", "model.published")
        ),
        transient=True,
    )
    started = time.monotonic()
    try:
        await bus.consume(watch, on_event)
        for name in ("alerting", "accountant", "detector", "ingest"):
            services[name] = spawn(name, [sys.executable, "-m", "qflare", "serve", name])
        for name in list(services):
            await _ready(services[name], logs / f"{name}.log", name)
        for cid in ids:
            clients[cid] = spawn(
                cid,
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    *("--url", args.url, "participant"),
                    *("--kit", str(fed.clients[cid]), "--prefix", prefix),
                    *("--out", str(work / f"{cid}.json")),
                ],
            )
        services["aggregator"] = spawn(
            "aggregator", [sys.executable, "-m", "qflare", "serve", "aggregator"]
        )
        await _ready(services["aggregator"], logs / "aggregator.log", "aggregator", 300)
        deadline = time.monotonic() + args.timeout
        while any(p.poll() is None for p in clients.values()):
            dead = [k for k, p in services.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"services exited: {dead}; logs in {logs}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the job did not end within {args.timeout:.0f} s; logs in {logs}"
                )
            await asyncio.sleep(1.0)
        figures["seconds"] = time.monotonic() - started
        figures["services"] = {k: peak_rss(p.pid) for k, p in services.items()}
    finally:
        for p in clients.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for p in services.values():
            if p.poll() is None:
                p.terminate()
        for p in services.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        names = [
            *topology.SERVICE_QUEUES,
            *(f"client.{c}" for c in ids),
            *(s.name for s in topology.job_streams(JOB)),
        ]
        try:
            await bus.delete_all(names)
        finally:
            await bus.close()
    for r in range(1, args.rounds + 1):
        opened, published = seen.get(("round.opened", r)), seen.get(("model.published", r))
        if opened is not None and published is not None:
            figures["rounds"][r] = published - opened
    figures["participants"] = {}
    for cid, proc in clients.items():
        out = work / f"{cid}.json"
        if proc.returncode != 0 or not out.exists():
            tail = (logs / f"{cid}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{cid} exited {proc.returncode}:\n{tail}")
        figures["participants"][cid] = json.loads(out.read_text())
    return figures


async def _ready(proc: subprocess.Popen[bytes], log: Path, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if '"serve.ready"' in text:
            return
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited ({proc.returncode}) before it was ready:\n{text[-3000:]}"
            )
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{name} not ready after {timeout:.0f} s; see {log}")


class _Repeated(Sequence[bytes]):
    """``count`` messages of the same bytes (the floor's payload, without holding GBs)."""

    def __init__(self, body: bytes, count: int) -> None:
        self.body, self.count = body, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self.body] * len(range(*i.indices(self.count)))
        if not -self.count <= i < self.count:
            raise IndexError(i)
        return self.body


async def floor(args: argparse.Namespace, model_bytes: int) -> dict[str, float]:
    """The round's bytes through RabbitMQ alone (``benchmarks/streams.py``'s trial)."""
    sys.path.insert(0, str(HERE))
    from streams import ROUTES, trial

    body = os.urandom(FLOOR_MESSAGE)
    per_model = -(-model_bytes // FLOOR_MESSAGE)
    ROUTES.setdefault(f"stream x{args.clients}", ("stream", args.clients))
    updates = await trial(args.url, "stream x3", _Repeated(body, per_model * args.clients))
    model = await trial(args.url, f"stream x{args.clients}", _Repeated(body, per_model))
    return {
        "updates_s": updates.seconds,
        "model_s": model.seconds,
        "seconds": updates.seconds + model.seconds,
    }


def report(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    model = figures["model_bytes"]
    print(f"model: {model / MIB:.0f} MiB ({model / 4:,.0f} float32) in {len(SHAPES)} tensors")
    fl = figures.get("floor")
    for r, seconds in sorted(figures["rounds"].items()):
        line = f"round {r}: {seconds:.1f} s from round.opened to model.published"
        if fl:
            line += f" = {seconds / fl['seconds']:.2f}x the stream floor"
        print(line)
    if fl:
        print(
            f"stream floor: {fl['seconds']:.1f} s ({args.clients} x the model written once into "
            f"one stream, read by 3 consumer processes: {fl['updates_s']:.1f} s; the model "
            f"written once, read by {args.clients}: {fl['model_s']:.1f} s)"
        )
    print(f"whole job: {figures['seconds']:.1f} s")
    for key, peak in sorted(figures["services"].items()):
        verdict = "ok" if peak < SERVICE_LIMIT else "OVER"
        print(f"  {key:<11} VmHWM {peak / MIB:7.0f} MiB  (< 1 GB: {verdict})")
    for cid, r in sorted(figures["participants"].items()):
        peak = r["vmhwm_bytes"]
        verdict = "ok" if peak < PARTICIPANT_FACTOR * model else "OVER"
        print(
            f"  {cid:<11} VmHWM {peak / MIB:7.0f} MiB  = {peak / model:.2f}x the model "
            f"(< {PARTICIPANT_FACTOR}x: {verdict}); ended {r['end']}, rounds {r['rounds_sent']}"
        )


async def run(args: argparse.Namespace) -> int:
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {args.clients} participants, {args.rounds} "
        f"round(s), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    with work_folder("qflare-bench-large-", keep=args.keep) as work:
        figures = await run_job(args, work)
        if args.floor:
            figures["floor"] = await floor(args, figures["model_bytes"])
        report(args, figures)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    sub = p.add_subparsers(dest="mode")
    part = sub.add_parser("participant", help="(internal) one participant process")
    part.add_argument("--kit", required=True)
    part.add_argument("--prefix", default="")
    part.add_argument("--out", required=True)
    part.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument(
        "--scale", type=float, default=1.0, help="model size as a fraction of 500 MB (trials)"
    )
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--timeout", type=float, default=3000.0, help="for the whole job (s)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, state)")
    return p.parse_args(argv)


def main() -> int:
    args = parse(sys.argv[1:])
    if args.mode == "participant":
        return asyncio.run(participant_main(args))
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
