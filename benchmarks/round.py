"""One federated round on the stream route (docs/architecture.md, "The data plane"), against
the time the same bytes take through RabbitMQ alone, measured in one run on one broker.

The services run as separate ``qflare serve`` processes (as ``qflare up`` starts them:
alerting, accountant, detector, the ingest replicas with ``QFLARE_INGEST_SHARE`` = ``i/N``,
then the aggregator, each once it logged ``serve.ready``). The clients' updates (signed,
sealed once for ingest, the aggregator and the detector) are built before the round, so
client-side training and encoding are not timed; this process publishes them, a window in
flight, into the job's update stream as the SDK does (``update.<job>`` on
``qflare.client``). The job has two rounds: round 1 runs in freshly started processes (the
issue's figure, as before the rewrite), round 2 in warm ones. Printed:

* **round latency**: from the first client publish until this process receives the
  aggregator's ``model.published`` of the round;
* against the **quorum floor** (the same envelopes published with confirms into one quorum
  queue, drained by one consumer process: bytes moved once; goal latency <= 2.0x) and the
  **stream floor** (the same envelopes written once into one stream, read by three consumer
  processes: the route's transport alone; goal <= 1.5x). Both come from
  ``benchmarks/streams.py`` (``trial``), each run before and after the rounds; the faster
  run counts;
* the **bytes the broker wrote**: ``write_bytes`` of the broker's Erlang VM from
  ``/proc/<pid>/io`` (what it dirtied for the disk, whatever the queue type; on a shared
  broker it includes other tenants' writes) over each phase, and the growth of the stream's
  segment files (this run's stream only). The model phase runs from round 1's
  ``model.published`` until every participant has read the new model: round 2's grant and
  ``round.opened`` make the aggregator append version 1 once into ``models.<job>``, and
  ``--clients`` stream readers in this process (the participants, as the SDK fetches a
  model: a reader at the offset ``round.opened`` names, one message, cancelled) read it.
  Goal: at most 1.1x the model's size;
* per process: CPU seconds (``/proc/<pid>/stat``) and peak RSS (``VmHWM``) of the broker,
  each service, the floors' consumers and this process, and what the rest of the machine
  used meanwhile (``/proc/stat``: on a shared machine, other people's work); a CPU
  timeline of each round (each process's share of a CPU per half second) and the services'
  stage stamps from their logs (ingest's verdicts, the close, the detector's verdict and any
  re-read, the model), to attribute the time.

The broker figures need RabbitMQ on this machine (root, or the broker's user, to read its
``/proc`` and its stream files). Everything the run declares carries a prefix of its own and
is deleted at the end; the services are stopped with SIGTERM.

    python benchmarks/round.py [--clients 100] [--params 1000000] [--ingest 2]
                               [--rule mean] [--no-detection] [--no-dp] [--window 16]
                               [--no-declare-streams] [--keep]
                               [--url amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from safetensors.numpy import save_file
from streams import Countdown, trial
from workdir import work_folder

from qflare.bus import Delivery, Outcome, QueueSpec, connect_bus, topology
from qflare.crypto import Certificate, provision
from qflare.crypto.provision import READER_CERT_FILES, Federation
from qflare.errors import QflareError
from qflare.messages import encode, open_envelope
from qflare.runtime.preflight import wait_for_broker

JOB = "bench"
QUORUM_GOAL = 2.0
STREAM_GOAL = 1.5
MODEL_GOAL = 1.1
#: Where a Debian RabbitMQ keeps its streams: <node>/stream/<vhost>_<queue>_<stamp>/.
STREAM_DIRS = "/var/lib/rabbitmq/mnesia/*/stream"
_TICK = os.sysconf("SC_CLK_TCK")
MIB = 2**20


# -- processes: CPU, disk writes, memory ----------------------------------------------------
@dataclass(frozen=True)
class Use:
    """CPU seconds and bytes written to storage over a phase; peak RSS at its end."""

    cpu_s: float = 0.0
    written: int = 0
    peak_rss: int = 0


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def _written(pid: int) -> int:
    """``write_bytes``: what the process dirtied for the disk (fsynced or not)."""
    try:
        io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        return int(io["write_bytes"])
    except (OSError, KeyError, ValueError):
        return 0


def _peak_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def broker_pid(url: str) -> int | None:
    """The Erlang VM of the RabbitMQ that listens on ``url``'s port, when it runs on this
    machine (other brokers may run here too)."""
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    port = parts.port or 5672
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(f"socket:[{f[9]}]")
    out = subprocess.run(["pgrep", "-x", "beam.smp"], capture_output=True, text=True).stdout
    for pid in (int(p) for p in out.split()):
        try:
            if any(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir()):
                return pid
        except OSError:
            continue
    return None


def _machine_busy() -> float:
    """CPU seconds this machine's CPUs spent busy (not idle, not waiting for I/O) so far."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICK


class Meter:
    """CPU seconds, storage writes and peak RSS of named processes between ``start`` and
    ``stop``, and as ``others`` what the rest of the machine used meanwhile (on a shared
    machine: other people's work); also the probe ``streams.trial`` takes (its consumer
    processes join as ``reader 1..n``)."""

    def __init__(self, named: dict[str, int | None]) -> None:
        self.pids = {name: pid for name, pid in named.items() if pid is not None}
        self._start: dict[str, tuple[float, int]] = {}
        self._busy = 0.0
        self.used: dict[str, Use] = {}

    def start(self, pids: Sequence[int] = ()) -> None:
        for i, pid in enumerate(pids, 1):
            self.pids[f"reader {i}"] = pid
        self._start = {n: (_cpu(p), _written(p)) for n, p in self.pids.items()}
        self._busy = _machine_busy()

    def written_at_start(self, name: str) -> int:
        return self._start[name][1] if name in self._start else 0

    def stop(self) -> None:
        busy = _machine_busy() - self._busy
        self.used = {
            n: Use(
                max(0.0, _cpu(p) - self._start[n][0]),
                max(0, _written(p) - self._start[n][1]),
                _peak_rss(p),
            )
            for n, p in self.pids.items()
        }
        self.used["others"] = Use(max(0.0, busy - sum(u.cpu_s for u in self.used.values())))


class Timeline:
    """Each process's CPU seconds every ``step`` seconds while the round runs."""

    def __init__(self, pids: dict[str, int], step: float = 0.5) -> None:
        self.pids = pids
        self.step = step
        self.rows: list[tuple[float, dict[str, float]]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self, t0: float) -> None:
        self._task = asyncio.get_running_loop().create_task(self._sample(t0))

    def _now(self) -> dict[str, float]:
        return {"machine": _machine_busy(), **{n: _cpu(p) for n, p in self.pids.items()}}

    async def _sample(self, t0: float) -> None:
        last = self._now()
        while True:
            await asyncio.sleep(self.step)
            now = self._now()
            used = {n: now[n] - last[n] for n in now if n != "machine"}
            used["others"] = max(0.0, now["machine"] - last["machine"] - sum(used.values()))
            self.rows.append((time.time() - t0, used))
            last = now

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def stream_bytes(physical: str) -> int | None:
    """Bytes in the segment and index files of the stream queue ``physical`` (a prefixed
    name); None when its folder cannot be read here."""
    tail = "_" + physical.replace(".", "_") + "_"
    folders = [p for p in Path("/").glob(STREAM_DIRS.lstrip("/") + "/*") if tail in p.name]
    if len(folders) != 1:
        return None
    try:
        return sum(f.stat().st_size for f in folders[0].iterdir())
    except OSError:
        return None


# -- the run ----------------------------------------------------------------------------------
@dataclass
class Floor:
    seconds: float
    used: dict[str, Use]


@dataclass
class RoundRun:
    """One measured round: from the first client publish to ``model.published``."""

    number: int
    latency: float = float("nan")
    sent: float = float("nan")
    used: dict[str, Use] = field(default_factory=dict)
    update_stream: int | None = None
    timeline: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    step: float = 0.5
    marks: dict[str, float] = field(default_factory=dict)
    verdicts: dict[str, int] = field(default_factory=dict)
    reread: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ModelPhase:
    """From round 1's ``model.published`` until every participant read version 1."""

    seconds: float = float("nan")
    used: dict[str, Use] = field(default_factory=dict)
    stream: int | None = None
    attach_written: int | None = None
    #: the broker's writes until round 2's ``round.opened`` reached this process (the
    #: grant, the append, the announcement), the rest being the participants' reads
    until_opened: int | None = None
    #: the broker's writes over as long a time with nothing asked of it, right after
    idle_written: int | None = None


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--rule", default="mean")
    p.add_argument("--detection", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ingest", type=int, default=2, help="ingest replicas (shares i/N)")
    p.add_argument(
        "--dp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="DP-FedAvg noise under the accountant's grant (off: no accountant)",
    )
    p.add_argument(
        "--declare-streams",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="declare the job's streams (as the aggregator does) before the services start, "
        "so every reader attaches at its start; without, a fresh deployment: the detector "
        "starts before the aggregator has declared them and waits for them",
    )
    p.add_argument("--window", type=int, default=16, help="publishes in flight")
    p.add_argument("--prefetch", type=int, default=16, help="the floors' consumer prefetch")
    p.add_argument(
        "--url", default=os.environ.get("QFLARE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
    )
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, state)")
    args = p.parse_args()
    if args.clients < 1 or args.params < 1 or args.ingest < 1 or args.window < 1:
        p.error("--clients, --params, --ingest and --window must be >= 1")
    return args


def build_envelopes(
    fed: Federation, ids: list[str], shape: tuple[int, int], round_no: int
) -> list[bytes]:
    """Each client's update for ``round_no`` (on model version ``round_no - 1``), signed
    and sealed once for the three readers, as the SDK builds it
    (``qflare.client.Participant``)."""
    folder = fed.clients[ids[0]]
    readers = [
        Certificate.from_bytes((folder / n).read_bytes()) for n in READER_CERT_FILES.values()
    ]
    rng = np.random.default_rng(round_no)
    out = []
    for cid in ids:
        delta = (rng.standard_normal(shape) * 1e-3).astype(np.float32)
        body = {"base_version": round_no - 1, "num_samples": 10, "tensors": {"w": delta}}
        out.append(
            encode("update", body, fed.identity(cid), job=JOB, round=round_no, seal_to=readers)
        )
    return out


async def floors(
    args: argparse.Namespace, envelopes: list[bytes], broker: int | None
) -> dict[str, Floor]:
    """The quorum floor and the stream floor (``benchmarks/streams.py``'s routes)."""
    out = {}
    for name, route in (("quorum", "quorum x1"), ("stream", "stream x3")):
        meter = Meter({"broker": broker, "publisher": os.getpid()})
        run = await trial(
            args.url,
            route,
            envelopes,
            window=args.window,
            prefetch=args.prefetch,
            probe=meter,
        )
        out[name] = Floor(run.seconds, meter.used)
    return out


def _stamp(rec: dict[str, Any]) -> float:
    return datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def log_records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


#: Stage events in the services' logs: (event, service) -> what it marks.
STAGES = {
    "update.accepted": "ingest verdict",
    "update.held": "aggregator recorded verdict",
    "round.closed": "round closed",
    "round.verdict": "detector verdict",
    "model.published": "model published",
    "updates.rereading": "re-read from the stream at the close",
}


async def wait_ready_log(proc: subprocess.Popen[bytes], log: Path, name: str) -> None:
    """Until the service logged ``serve.ready``; a child that exits first is an error."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if any(r.get("event") == "serve.ready" for r in log_records(log)):
            return
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"{name} exited ({proc.returncode}) before it was ready:\n{tail}")
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{name} not ready after 90 s; see {log}")


async def measure(
    args: argparse.Namespace,
    work: Path,
    fed: Federation,
    prefix: str,
    updates: dict[int, list[bytes]],
    broker: int | None,
) -> tuple[list[RoundRun], ModelPhase]:
    """Start the services, play round 1 (cold processes), the model phase, round 2."""
    env = {
        **os.environ,
        "QFLARE_BROKER": args.url,
        "QFLARE_PREFIX": prefix,
        "QFLARE_DATA_DIR": str(work / "state"),
        "QFLARE_PKI_DIR": str(fed.root),
        "QFLARE_CONFIG": str(work / "qflare.toml"),
        "QFLARE_LOG_FORMAT": "json",
        "QFLARE_LOG_LEVEL": "INFO",
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = work / "logs"
    logs.mkdir()

    def start(name: str, key: str, extra: dict[str, str] | None = None) -> None:
        with open(logs / f"{key}.log", "wb") as log:
            procs[key] = subprocess.Popen(
                [sys.executable, "-m", "qflare", "serve", name],
                env={**env, **(extra or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    bus = await connect_bus(args.url, prefix=prefix)
    trust = fed.trust()
    seen: dict[tuple[str, int], tuple[float, Any]] = {}
    arrived = asyncio.Event()

    async def on_event(d: Delivery) -> Outcome:
        e = open_envelope(d.body, trust)
        seen.setdefault((e.kind, e.round), (time.time(), e))
        arrived.set()
        return Outcome.ACK

    async def wait_for(kind: str, round_no: int, timeout: float) -> tuple[float, Any]:
        async with asyncio.timeout(timeout):
            while (kind, round_no) not in seen:
                arrived.clear()
                await arrived.wait()
        return seen[(kind, round_no)]

    updates_name = prefix + topology.update_stream(JOB).name
    models = topology.model_stream(JOB).name
    window = asyncio.Semaphore(args.window)

    async def publish(data: bytes) -> None:
        async with window:
            await bus.publish(topology.CLIENT, f"update.{JOB}", data)

    async def play(round_no: int) -> tuple[RoundRun, float, Timeline]:
        """The clients publish round ``round_no``'s updates; the services do the rest.
        Returns as soon as ``model.published`` arrived (the timeline still samples)."""
        res = RoundRun(round_no)
        named: dict[str, int | None] = {"broker": broker}
        named.update({k: p.pid for k, p in procs.items()})
        named["clients"] = os.getpid()
        meter = Meter(named)
        timeline = Timeline({n: p for n, p in named.items() if p is not None})
        stream_before = stream_bytes(updates_name)
        meter.start()
        t0 = time.time()
        timeline.start(t0)
        await asyncio.gather(*(publish(e) for e in updates[round_no]))
        res.sent = time.time() - t0
        stream_after = stream_bytes(updates_name)  # every publish confirmed: all in it
        t_pub, published = await wait_for("model.published", round_no, 600)
        meter.stop()
        res.latency, res.used = t_pub - t0, meter.used
        res.metrics = dict(published.body.metrics)
        if stream_before is not None and stream_after is not None:
            res.update_stream = stream_after - stream_before
        return res, t0, timeline

    def stages(res: RoundRun, t0: float) -> None:
        for key in procs:
            for rec in log_records(logs / f"{key}.log"):
                stage = STAGES.get(rec.get("event", ""))
                if stage is None or rec.get("job") != JOB or rec.get("round") != res.number:
                    continue
                if rec["event"] == "update.accepted":
                    res.verdicts[key] = res.verdicts.get(key, 0) + 1
                if rec["event"] == "updates.rereading":
                    res.reread[key] = res.reread.get(key, 0) + int(rec.get("count", 0))
                ts = _stamp(rec) - t0
                first, last = f"first {stage} ({key})", f"last {stage} ({key})"
                res.marks[first] = min(res.marks.get(first, ts), ts)
                res.marks[last] = max(res.marks.get(last, ts), ts)

    rounds: list[RoundRun] = []
    phase = ModelPhase()
    try:
        watch = QueueSpec(
            "bench.watch",
            bindings=tuple(
                (topology.EVENTS, f"{kind}.{JOB}") for kind in ("round.opened", "model.published")
            ),
            transient=True,
        )
        await bus.consume(watch, on_event)
        if args.declare_streams:
            for spec in topology.job_streams(JOB):
                await bus.declare_stream(spec)
        order: list[tuple[str, str, dict[str, str] | None]] = [("alerting", "alerting", None)]
        if args.dp:
            order.append(("accountant", "accountant", None))
        order.append(("detector", "detector", None))
        for i in range(args.ingest):
            share = {"QFLARE_INGEST_SHARE": f"{i}/{args.ingest}", "QFLARE_REPLICA": f"ingest-{i}"}
            order.append(("ingest", f"ingest-{i}", share))
        order.append(("aggregator", "aggregator", None))
        for name, key, extra in order:
            start(name, key, extra)
            await wait_ready_log(procs[key], logs / f"{key}.log", key)
        await wait_for("round.opened", 1, 120)

        first, t0, timeline = await play(1)
        # The model phase, from here: round 2 is granted and opens, the aggregator appends
        # version 1 once into the model stream, and every participant reads it at the
        # offset round.opened names (stream readers in this process, as the SDK reads it).
        meter = Meter({"broker": broker, "participants": os.getpid()})
        meter.start()
        t_model = time.time()
        model_before = stream_bytes(prefix + models)
        await timeline.stop()
        first.timeline, first.step = timeline.rows, timeline.step
        _t, opened = await wait_for("round.opened", 2, 120)
        if broker is not None:
            phase.until_opened = _written(broker) - meter.written_at_start("broker")
        readers = [Countdown(1) for _ in range(args.clients)]

        async def participant(reader: Countdown) -> None:
            # as the SDK fetches a model: a reader at the offset, one message, cancelled
            sub = await bus.read_stream(models, reader, offset=opened.body.model_offset, prefetch=1)
            try:
                await asyncio.wait_for(reader.done.wait(), 120)
            finally:
                await sub.cancel()

        await asyncio.gather(*(participant(r) for r in readers))
        phase.seconds = time.time() - t_model
        meter.stop()
        phase.used = meter.used
        model_after = stream_bytes(prefix + models)
        if model_before is not None and model_after is not None:
            phase.stream = model_after - model_before
        # What a reader's attach and cancel cost the broker by themselves: as many readers
        # at "next", reading nothing.
        meter = Meter({"broker": broker})
        meter.start()
        idle = [Countdown(1) for _ in range(args.clients)]
        subs = await asyncio.gather(
            *(bus.read_stream(models, r, offset="next", prefetch=1) for r in idle)
        )
        await asyncio.gather(*(sub.cancel() for sub in subs))
        meter.stop()
        phase.attach_written = meter.used["broker"].written if "broker" in meter.used else None
        if broker is not None:  # what the broker writes meanwhile on its own, for comparison
            before = _written(broker)
            await asyncio.sleep(phase.seconds)
            phase.idle_written = _written(broker) - before
        stages(first, t0)
        rounds.append(first)

        second, t0, timeline = await play(2)
        await timeline.stop()
        second.timeline, second.step = timeline.rows, timeline.step
        stages(second, t0)
        rounds.append(second)
    finally:
        for p in reversed(procs.values()):
            p.send_signal(signal.SIGTERM)
        for p in reversed(procs.values()):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        streams = (s.name for s in topology.job_streams(JOB))
        await bus.delete_all([*topology.SERVICE_QUEUES, *streams])
        await bus.close()
    return rounds, phase


# -- the report -------------------------------------------------------------------------------
def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / MIB:.1f} MiB"


def usage_line(label: str, wall: float, used: dict[str, Use]) -> str:
    mine = {n: u for n, u in used.items() if n != "others"}
    parts = ", ".join(f"{n} {u.cpu_s:.2f}" for n, u in mine.items())
    total = sum(u.cpu_s for u in mine.values())
    rest = used["others"].cpu_s if "others" in used else 0.0
    return (
        f"  {label:<12} {wall:6.2f} s {total:6.2f} cpu-s ({parts}); rest of the machine {rest:.2f}"
    )


def report(
    args: argparse.Namespace,
    rounds: list[RoundRun],
    phase: ModelPhase,
    before: dict[str, Floor],
    after: dict[str, Floor],
    sizes: dict[str, int],
) -> None:
    quorum = min(before["quorum"], after["quorum"], key=lambda f: f.seconds)
    stream = min(before["stream"], after["stream"], key=lambda f: f.seconds)

    def verdict(ratio: float, goal: float) -> str:
        return "met" if ratio <= goal else "NOT met"

    def busy(used: dict[str, Use], wall: float) -> str:
        mine = sum(u.cpu_s for n, u in used.items() if n != "others")
        return f"{mine / wall:.2f} (rest of the machine {used['others'].cpu_s / wall:.2f})"

    print(
        f"\nfloors (the faster of a run before and one after the rounds): quorum "
        f"{quorum.seconds:.2f} s (before {before['quorum'].seconds:.2f}, after "
        f"{after['quorum'].seconds:.2f}); stream {stream.seconds:.2f} s (before "
        f"{before['stream'].seconds:.2f}, after {after['stream'].seconds:.2f}) = "
        f"{stream.seconds / quorum.seconds:.2f}x the quorum floor"
    )
    print(usage_line("quorum floor", quorum.seconds, quorum.used))
    print(usage_line("stream floor", stream.seconds, stream.used))
    summary = []
    for res in rounds:
        what = "cold processes" if res.number == 1 else "warm processes"
        q_ratio, s_ratio = res.latency / quorum.seconds, res.latency / stream.seconds
        print(f"\n== round {res.number} ({what})")
        print(f"clients published all {args.clients} updates in {res.sent:6.2f} s")
        for key in sorted(res.marks, key=res.marks.__getitem__):
            print(f"  {key:<56} +{res.marks[key]:6.2f} s")
        reread = ", ".join(f"{k} {v}" for k, v in sorted(res.reread.items())) or "none"
        print(
            "  ingest verdicts per replica: "
            + ", ".join(f"{k} {v}" for k, v in sorted(res.verdicts.items()))
            + f"; re-read at the close: {reread}; model kept "
            f"{res.metrics.get('kept', 0):.0f}, flagged {res.metrics.get('flagged', 0):.0f}"
        )
        print(f"round latency (first publish -> model.published) {res.latency:6.2f} s")
        print(
            f"  latency / quorum floor {q_ratio:5.2f}x (goal <= {QUORUM_GOAL}x: "
            f"{verdict(q_ratio, QUORUM_GOAL)}); latency / stream floor {s_ratio:5.2f}x "
            f"(goal <= {STREAM_GOAL}x: {verdict(s_ratio, STREAM_GOAL)})"
        )
        if "broker" in res.used:
            written = res.used["broker"].written
            print(
                f"  the broker wrote {_mib(written)} = {written / sizes['updates']:.2f}x the "
                f"{sizes['updates'] / MIB:.0f} MiB of update envelopes; the update stream grew "
                f"{_mib(res.update_stream)}"
            )
        print(usage_line(f"round {res.number}", res.latency, res.used))
        rss = ", ".join(
            f"{n} {u.peak_rss / MIB:.0f}"
            for n, u in res.used.items()
            if n not in ("broker", "others")
        )
        print(f"  peak RSS (MiB): {rss}")
        print(
            f"  CPUs busy on average, of {os.cpu_count()}: round {busy(res.used, res.latency)}, "
            f"quorum floor {busy(quorum.used, quorum.seconds)}, stream floor "
            f"{busy(stream.used, stream.seconds)}"
        )
        names = [n for n in res.used if res.used[n].cpu_s >= 0.05]
        print("  CPU timeline (share of one CPU per process, per slice):")
        print("  " + f"{'t (s)':>6} " + " ".join(f"{n[:10]:>10}" for n in names))
        for t, cpu in res.timeline:
            shares = " ".join(f"{cpu.get(n, 0.0) / res.step:10.2f}" for n in names)
            print(f"  {t:6.1f} {shares}")
        summary.append(
            f"round {res.number} {res.latency:.2f} s ({q_ratio:.2f}x quorum, "
            f"{s_ratio:.2f}x stream; rest of the machine "
            f"{res.used['others'].cpu_s / res.latency:.2f} CPUs)"
        )

    model = sizes["model"]
    print("\n== the model to the participants (round 2 opens on version 1)")
    if "broker" not in phase.used:
        print("  broker writes n/a: the broker does not run on this machine")
        summary.append("model bytes n/a")
    else:
        written = phase.used["broker"].written
        print(
            f"  the broker wrote {_mib(written)} = {written / model:.3f}x the model's "
            f"{model / MIB:.2f} MiB (goal <= {MODEL_GOAL}x: {verdict(written / model, MODEL_GOAL)})"
            f" in {phase.seconds:.2f} s (round 2's grant, the append, {args.clients} reads); "
            f"the model stream grew {_mib(phase.stream)}"
            + ("" if phase.stream is None else f" = {phase.stream / model:.3f}x")
        )
        if phase.until_opened is not None:
            print(
                f"  of which until round 2's round.opened arrived (grant, append, announcement) "
                f"{_mib(phase.until_opened)}, during the {args.clients} reads "
                f"{_mib(written - phase.until_opened)}"
            )
        if phase.idle_written is not None:
            print(
                f"  the broker with nothing asked of it, over as long right after: "
                f"{_mib(phase.idle_written)} (its background writes: quorum segments, logs)"
            )
        if phase.attach_written is not None:
            print(
                f"  {args.clients} readers attached and cancelled, reading nothing: "
                f"{_mib(phase.attach_written)} ({phase.attach_written / args.clients / 1024:.1f} "
                "KiB each: the broker's bookkeeping of a stream reader, not model bytes)"
            )
        summary.append(f"model bytes {written / model:.3f}x")
        print(usage_line("model phase", phase.seconds, phase.used))
    print("\nsummary: " + "; ".join(summary))


async def run(args: argparse.Namespace) -> int:
    try:
        await wait_for_broker(args.url, timeout=5.0)
    except QflareError as exc:
        print(f"round.py: {exc}", file=sys.stderr)
        return 1
    broker = broker_pid(args.url)
    prefix = f"bench-round-{uuid.uuid4().hex[:8]}-"
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {args.clients} clients, {args.params:,} float32 "
        f"parameters each ({args.params * 4 / MIB:.1f} MiB per update), rule={args.rule}, "
        f"detection {'on' if args.detection else 'off'}, DP {'on' if args.dp else 'off'}, "
        f"{args.ingest} ingest replica(s), {args.window} publishes in flight, job's streams "
        f"{'declared before the services start' if args.declare_streams else 'declared by the aggregator'}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
        + ("" if broker else "; broker not on this machine: no broker CPU or disk figures")
    )
    with work_folder("qflare-bench-round-", keep=args.keep) as work:
        fed = provision(work / "pki", clients=args.clients)
        rows = 1000 if args.params % 1000 == 0 else 1
        shape = (rows, args.params // rows)
        save_file({"w": np.zeros(shape, np.float32)}, str(work / "model0.safetensors"))
        ids = sorted(fed.clients)
        job = {
            "job_id": JOB,
            "rounds": 2,
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
            "[[jobs]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in job.items())
        )
        t = time.perf_counter()
        updates = {r: build_envelopes(fed, ids, shape, r) for r in (1, 2)}
        sizes = {"model": args.params * 4, "updates": sum(len(e) for e in updates[1])}
        print(
            f"built {args.clients} update envelopes per round ({sizes['updates'] / MIB:.0f} MiB, "
            f"signed, sealed for 3 readers) in {time.perf_counter() - t:.1f} s (not timed)"
        )
        before = await floors(args, updates[1], broker)
        rounds, phase = await measure(args, work, fed, prefix, updates, broker)
        after = await floors(args, updates[1], broker)
        report(args, rounds, phase, before, after, sizes)
    return 0


def main() -> int:
    args = parse()
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
