"""What the end-to-end tests run: QFLARE's services as OS processes, small numpy clients,
a recorder of everything on ``qflare.events`` and ``qflare.alerts``, and hostile senders.

The clients are real participants on the wire (signed, sealed ``update`` envelopes on
``qflare.client``; the signed model from ``qflare.broadcast`` checked against its digest
before use); their model is a softmax regression of 650 parameters trained for a few
gradient steps, so a round costs milliseconds and the test measures the system, not torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from qflare.bus import Bus, Delivery, Outcome, QueueSpec, topology
from qflare.client import Kit, LocalUpdate, Participant, RoundInfo
from qflare.crypto import Federation
from qflare.messages import MessageRejected, open_envelope

FEATURES, CLASSES = 64, 10
PARTICIPANTS = tuple(f"client-{i:03d}" for i in range(10))
BYZANTINE = ("client-007", "client-008", "client-009")
REVOKED = "client-010"


def require_broker(url: str) -> None:
    """Skip when RabbitMQ is not reachable (fail under CI=true), as tests/conftest does."""
    import socket
    from urllib.parse import urlsplit

    import pytest

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 1.0):
            return
    except OSError:
        message = f"RabbitMQ is not reachable at {parts.hostname}:{parts.port or 5672}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def require_management(api: Any) -> None:
    """The management API answers; on this machine's broker, as root, the plugin is enabled
    if it is off (``rabbitmq-plugins enable``, as CI needs; it stays on). Skips otherwise
    (fails under CI=true). ``api``: a :class:`qflare.bus.management.Management`."""
    import shutil

    import pytest

    from qflare.bus.management import ManagementError

    try:
        api.request("GET", "/api/overview")
        return
    except ManagementError as exc:
        error = exc
    local = "QFLARE_TEST_MANAGEMENT" not in os.environ
    if local and os.geteuid() == 0 and shutil.which("rabbitmq-plugins"):
        subprocess.run(
            ["rabbitmq-plugins", "enable", "rabbitmq_management"],
            capture_output=True,
            timeout=120,
            check=False,
        )
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                api.request("GET", "/api/overview")
                return
            except ManagementError as exc:
                error = exc
                time.sleep(0.5)
    message = (
        f"RabbitMQ's management API is not reachable ({error}); enable it with "
        "`rabbitmq-plugins enable rabbitmq_management` or set QFLARE_TEST_MANAGEMENT"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


SERVICE_NAMES = ("alerting", "accountant", "detector", "ingest", "aggregator")


# -- the model -------------------------------------------------------------------------------
def initial_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": (0.01 * rng.standard_normal((FEATURES, CLASSES))).astype(np.float32),
        "b": np.zeros(CLASSES, np.float32),
    }


def write_initial_model(path: Path, seed: int = 0) -> Path:
    save_file(initial_model(seed), str(path))
    return path


def _client_data(client: str, n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    seed = int.from_bytes(hashlib.sha256(client.encode()).digest()[:4], "big")
    rng = np.random.default_rng(seed)
    truth = np.random.default_rng(99).standard_normal((FEATURES, CLASSES))
    x = rng.standard_normal((n, FEATURES))
    y = np.argmax(x @ truth + 0.5 * rng.standard_normal((n, CLASSES)), axis=1)
    return x, y


def train_delta(
    client: str, model: dict[str, np.ndarray], steps: int = 5, lr: float = 0.5
) -> dict[str, np.ndarray]:
    """A few full-batch gradient steps of softmax regression; returns trained - base."""
    x, y = _client_data(client)
    w = model["w"].astype(np.float64)
    b = model["b"].astype(np.float64)
    onehot = np.eye(CLASSES)[y]
    for _ in range(steps):
        logits = x @ w + b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot) / len(x)
        w -= lr * (x.T @ g)
        b -= lr * g.sum(axis=0)
    return {"w": (w - model["w"]).astype(np.float32), "b": (b - model["b"]).astype(np.float32)}


def byzantine_delta(client: str, model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sign flip, scaled: the update an attacker sends to push the model backwards."""
    honest = train_delta(client, model)
    return {k: (-4.0 * v).astype(np.float32) for k, v in honest.items()}


# -- clients ------------------------------------------------------------------------------------
class NumpyParticipant(Participant):
    """A participant through the client SDK (``qflare.client``): the SDK follows rounds,
    verifies the signed model, signs and seals the update and reconnects; this class only
    computes the update (numpy instead of a torch model). A Byzantine one sends the scaled,
    sign-flipped update; ``gate`` holds its update for round ``gate_round`` until set."""

    def __init__(
        self,
        kit: Kit,
        *,
        byzantine: bool = False,
        gate: threading.Event | None = None,
        gate_round: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(kit, None, None, **kwargs)
        self.byzantine = byzantine
        self.gate = gate
        self.gate_round = gate_round

    def compute_update(
        self, global_tensors: Mapping[str, np.ndarray], info: RoundInfo
    ) -> LocalUpdate:
        if self.gate is not None and info.round == self.gate_round:
            self.gate.wait(60)
        base = {k: np.asarray(v) for k, v in global_tensors.items()}
        make = byzantine_delta if self.byzantine else train_delta
        return LocalUpdate(make(self.id, base), 48)


# -- the recorder -----------------------------------------------------------------------------
@dataclass
class Recorder:
    """Everything the services publish for the job, decoded and verified."""

    fed: Federation
    job: str
    events: list[tuple[float, str, int, Any]] = field(default_factory=list)
    alerts: list[tuple[str, Any]] = field(default_factory=list)
    hooks: list[Callable[[str, int, Any], Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, bus: Bus, name: str) -> None:
        self.trust = self.fed.trust()
        await bus.consume(
            QueueSpec(
                f"rec.{name}",
                bindings=((topology.EVENTS, f"*.{self.job}"), (topology.EVENTS, f"*.*.{self.job}")),
            ),
            self.on_event,
            prefetch=64,
        )
        await bus.consume(
            QueueSpec(f"rec-alerts.{name}", bindings=((topology.ALERTS, "#"),)),
            self.on_alert,
            prefetch=64,
        )

    async def on_event(self, d: Delivery) -> Outcome:
        env = open_envelope(d.body, self.trust)
        self.events.append((time.monotonic(), env.kind, env.round, env.body))
        for hook in list(self.hooks):
            result = hook(env.kind, env.round, env.body)
            if asyncio.iscoroutine(result):
                await result
        self._poke()
        return Outcome.ACK

    async def on_alert(self, d: Delivery) -> Outcome:
        try:
            env = open_envelope(d.body, self.trust)
            body: Any = env.body
        except MessageRejected:
            body = d.body
        self.alerts.append((d.routing_key, body))
        self._poke()
        return Outcome.ACK

    def _poke(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def of(self, kind: str) -> list[tuple[int, Any]]:
        return [(r, b) for _t, k, r, b in self.events if k == kind]

    async def until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not predicate():
            left = end - loop.time()
            if left <= 0:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; "
                    f"saw {[(k, r) for _t, k, r, _b in self.events][-15:]}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.5))


# -- service processes -------------------------------------------------------------------------
@dataclass
class Cluster:
    """``qflare serve <name>`` processes sharing a config, a broker prefix and a data dir."""

    root: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def log_path(self, key: str) -> Path:
        return self.root / "logs" / f"{key}-{self.starts[key]}.log"

    def start(self, name: str, replica: str | None = None) -> None:
        key = replica or name
        self.starts[key] += 1
        env = {**os.environ, **self.env}
        if replica:
            env["QFLARE_REPLICA"] = replica
        path = self.log_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as log:
            self.procs[key] = subprocess.Popen(
                [sys.executable, "-m", "qflare", "serve", name],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )

    def logs(self, key: str) -> list[dict[str, Any]]:
        lines = []
        for n in range(1, self.starts[key] + 1):
            path = self.root / "logs" / f"{key}-{n}.log"
            for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        lines.append(json.loads(line))
        return lines

    async def ready(self, key: str, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(rec.get("event") == "serve.ready" for rec in self._current_log(key)):
                return
            if self.procs[key].poll() is not None:
                raise AssertionError(
                    f"{key} exited with {self.procs[key].returncode}:\n{self.log_path(key).read_text()[-3000:]}"
                )
            await asyncio.sleep(0.1)
        raise AssertionError(
            f"{key} not ready after {timeout}s:\n{self.log_path(key).read_text()[-3000:]}"
        )

    def _current_log(self, key: str) -> list[dict[str, Any]]:
        path = self.log_path(key)
        out = []
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def kill9(self, key: str) -> None:
        proc = self.procs[key]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def trouble(self, most: int = 12) -> str:
        """The last ``most`` warnings and errors of each service, one line each."""
        out = []
        for key in self.procs:
            bad = [
                rec
                for rec in self.logs(key)
                if rec.get("level") in ("WARNING", "ERROR", "CRITICAL")
            ]
            out.append(f"-- {key}: {len(bad)} warnings/errors, the last {min(most, len(bad))}:")
            for rec in bad[-most:]:
                fields = {k: v for k, v in rec.items() if k not in ("ts", "service", "pid", "exc")}
                out.append("   " + json.dumps(fields, default=str)[:400])
        return "\n".join(out)

    def stop_all(self, timeout: float = 15.0) -> dict[str, int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for key, proc in self.procs.items():
            try:
                codes[key] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[key] = proc.wait(5)
        return codes


def config_text(job: dict[str, Any], options: dict[str, dict[str, Any]] | None = None) -> str:
    """A TOML config with one job (values: str, int, float, bool, list of str)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = []
    for name, opts in (options or {}).items():
        lines.append(f"[services.{name}]")
        lines += [f"{k} = {value(v)}" for k, v in opts.items()]
    lines.append("[[jobs]]")
    lines += [f"{k} = {value(v)}" for k, v in job.items()]
    return "\n".join(lines) + "\n"


# -- one job run -------------------------------------------------------------------------------
@dataclass
class RunResult:
    recorder: Recorder
    cluster: Cluster
    participants: dict[str, NumpyParticipant]
    final_version: int
    final_model: dict[str, np.ndarray]
    hostile_sent: dict[str, bytes] = field(default_factory=dict)
    kills: list[tuple[str, str, int]] = field(default_factory=list)
    seconds: float = 0.0
    end_reason: str = ""
    stop_codes: dict[str, int] = field(default_factory=dict)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    broker_down: float = 0.0
    broker_up: float = 0.0

    def story(self, since: float = -math.inf) -> str:
        """What the recorder saw from ``since`` (monotonic) on, an event a line, then the
        services' warnings: what a failed assertion on a finished run prints, since a CI
        failure leaves no other trace of them."""
        lines = [f"end reason {self.end_reason!r}; events from {since:.2f}:"]
        for t, kind, round_no, body in self.recorder.events:
            if t >= since:
                client = getattr(body, "client", "")
                reason = getattr(body, "reason", "")
                lines.append(f"   {t:.2f} {kind} round {round_no} {client} {reason}".rstrip())
        return "\n".join([*lines[-80:], self.cluster.trouble()])


@dataclass
class Scenario:
    """How one run goes: which replicas, which kills (``(service, kind, round, count)``: kill
    -9 ``service`` when the ``count``-th ``kind`` event of ``round`` is seen, then restart
    it), and an optional hostile routine run when round ``hostile_round`` opens."""

    name: str
    ingest_replicas: tuple[str, ...] = ("ingest-a",)
    kills: tuple[tuple[str, str, int, int], ...] = ()
    hostile_round: int | None = None
    hostile: Callable[..., Any] | None = None
    hold_client: str | None = (
        None  # held in hostile_round until the hostile routine or restart is done
    )
    timeout: float = 120.0
    stateful: tuple[str, ...] = ("alerting", "accountant", "detector")
    broker_restart: tuple[str, int, int] | None = None  # (kind, round, count): stop_app/start_app
    # chaos(cluster, recorder, bus): started once every service is ready, cancelled when the
    # job has ended (its failure fails the run); for faults on a clock, not on an event
    chaos: Callable[[Cluster, Recorder, Bus], Awaitable[Any]] | None = None
    # the participants, if not NumpyParticipant: participant(kit, broker=, prefix=, jobs=)
    participant: Callable[..., Participant] | None = None
    # more recorder hooks: hook(kind, round, body), awaited if it returns a coroutine
    hooks: tuple[Callable[[str, int, Any], Any], ...] = ()
    before_stop: Callable[[], Awaitable[Any]] | None = None  # awaited before services stop


async def run_scenario(
    fed: Federation,
    root: Path,
    amqp: str,
    prefix: str,
    job: dict[str, Any],
    participants: tuple[str, ...],
    byzantine: tuple[str, ...],
    scenario: Scenario,
    options: dict[str, dict[str, Any]] | None = None,
) -> RunResult:
    from qflare.bus import connect_bus

    root.mkdir(parents=True, exist_ok=True)
    config = root / "qflare.toml"
    config.write_text(config_text(job, options))
    cluster = Cluster(
        root,
        {
            "QFLARE_BROKER": amqp,
            "QFLARE_PREFIX": prefix,
            "QFLARE_DATA_DIR": str(root / "state"),
            "QFLARE_PKI_DIR": str(fed.root),
            "QFLARE_CONFIG": str(config),
            "QFLARE_LOG_LEVEL": "INFO",
        },
    )
    job_id = job["job_id"]
    bus = await connect_bus(amqp, prefix=prefix)
    recorder = Recorder(fed, job_id)
    gate = threading.Event()
    where: dict[str, Any] = {"broker": amqp, "prefix": prefix, "jobs": [job_id]}
    clients = {
        cid: scenario.participant(Kit.load(fed.clients[cid]), **where)
        if scenario.participant is not None
        else NumpyParticipant(
            Kit.load(fed.clients[cid]),
            byzantine=cid in byzantine,
            gate=gate if cid == scenario.hold_client else None,
            gate_round=scenario.hostile_round,
            **where,
        )
        for cid in participants
    }
    result = RunResult(recorder, cluster, clients, -1, {})
    started = time.monotonic()
    chaos: asyncio.Task[Any] | None = None
    try:
        await recorder.start(bus, scenario.name)
        for p in clients.values():
            await p.start()
        recorder.hooks.extend(scenario.hooks)
        _install_kills(scenario, recorder, cluster, result)
        _install_broker_restart(scenario, recorder, result, gate)
        if scenario.hostile is not None:

            async def on_open(kind: str, round_no: int, _body: Any) -> None:
                if (
                    kind == "round.opened"
                    and round_no == scenario.hostile_round
                    and not result.hostile_sent
                ):
                    result.hostile_sent["started"] = b""
                    asyncio.get_running_loop().create_task(
                        _run_hostile(scenario, clients, bus, recorder, result, gate)
                    )

            recorder.hooks.append(on_open)
        order = [*scenario.stateful, *scenario.ingest_replicas]
        for key in order:
            cluster.start(
                "ingest" if key.startswith("ingest") else key,
                replica=key if key.startswith("ingest") else None,
            )
        for key in order:
            await cluster.ready(key)
        cluster.start("aggregator")
        await cluster.ready("aggregator")
        if scenario.chaos is not None:
            chaos = asyncio.get_running_loop().create_task(scenario.chaos(cluster, recorder, bus))

        def over() -> bool:
            failed = chaos is not None and chaos.done() and chaos.exception() is not None
            return failed or bool(recorder.of("job.ended"))

        try:
            await recorder.until(over, scenario.timeout, "job.ended")
        except AssertionError as exc:
            # what the services said about it: a CI failure has no other trace of them
            rejected = recorder.of("update.rejected")[-3:]
            raise AssertionError(
                f"{exc}\nthe last rejections: {rejected}\n{cluster.trouble()}"
            ) from None
        if chaos is not None:
            chaos.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await chaos  # raises what made the chaos routine fail
        result.end_reason = recorder.of("job.ended")[-1][1].reason
        # the final model reaches the clients on the broadcast after job.ended is decided
        await recorder.until(
            lambda: all(job_id in p.ended for p in clients.values()), 30, "clients see job.ended"
        )
        latest = clients[participants[0]].latest_model(job_id)
        assert latest is not None
        result.final_version = latest[0]
        result.final_model = {k: np.array(v) for k, v in latest[1].items()}
        result.seconds = time.monotonic() - started
        if scenario.before_stop is not None:
            await scenario.before_stop()
    finally:
        gate.set()
        if chaos is not None and not chaos.done():
            chaos.cancel()
            await asyncio.gather(chaos, return_exceptions=True)
        for task in result.tasks:  # a broker restart in progress finishes first
            await asyncio.gather(task, return_exceptions=True)
        for p in clients.values():
            await p.stop()
        result.stop_codes = cluster.stop_all()
        queues = [
            *(f"client.{c}" for c in participants),
            *topology.SERVICE_QUEUES,
            *(f"ingest.rounds.{r}" for r in scenario.ingest_replicas),
            # the job's streams: the aggregator deletes them after a linger it may not live to
            *(stream.name for stream in topology.job_streams(job_id)),
        ]
        try:
            await bus.delete_all(queues)
        except Exception as exc:
            print(f"e2e cleanup of {prefix!r} failed: {exc!r}", file=sys.stderr)
        finally:
            await bus.close()
    return result


async def delete_prefix(amqp: str, prefix: str, queues: Iterable[str]) -> None:
    """Delete what services under ``prefix`` declared: the logical ``queues`` named and the
    exchanges. For a test that starts services without :func:`run_scenario`."""
    from qflare.bus import connect_bus

    bus = await connect_bus(amqp, prefix=prefix)
    try:
        await bus.delete_all(queues)
    finally:
        await bus.close()


async def remaining(amqp: str, prefix: str, queues: Iterable[str]) -> list[str]:
    """Which of the prefix's logical ``queues`` and exchanges still exist on the broker
    (passive declares on a fresh connection, which declare nothing)."""
    import aio_pika
    import aiormq

    found = []
    connection = await aio_pika.connect(amqp)
    async with connection:
        for kind, names in (("queue", queues), ("exchange", topology.EXCHANGES)):
            for logical in names:
                channel = await connection.channel()  # a NOT_FOUND closes it
                try:
                    if kind == "queue":
                        await channel.declare_queue(prefix + logical, passive=True)
                    else:
                        await channel.declare_exchange(prefix + logical, passive=True)
                    found.append(prefix + logical)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    pass
                except aiormq.exceptions.ChannelLockedResource:
                    found.append(prefix + logical)  # exclusive to its owner, but there
                finally:
                    if not channel.is_closed:
                        await channel.close()
    return found


def _install_kills(
    scenario: Scenario, recorder: Recorder, cluster: Cluster, result: RunResult
) -> None:
    counts: dict[tuple[str, int], int] = defaultdict(int)
    pending = list(scenario.kills)

    async def hook(kind: str, round_no: int, _body: Any) -> None:
        counts[(kind, round_no)] += 1
        for item in list(pending):
            service, k, r, n = item
            if k == kind and r == round_no and counts[(kind, round_no)] >= n:
                pending.remove(item)
                cluster.kill9(service)
                result.kills.append((service, kind, round_no))
                await asyncio.sleep(0.3)
                cluster.start(service)
                await cluster.ready(service)

    recorder.hooks.append(hook)


def _install_broker_restart(
    scenario: Scenario, recorder: Recorder, result: RunResult, gate: threading.Event
) -> None:
    if scenario.broker_restart is None:
        return
    kind, round_no, count = scenario.broker_restart
    seen = 0

    def hook(k: str, r: int, _body: Any) -> None:
        nonlocal seen
        if k == kind and r == round_no:
            seen += 1
            if seen == count:
                # not inside the handler: its own connection goes down with the broker
                result.tasks.append(
                    asyncio.get_running_loop().create_task(_restart_broker(result, gate))
                )

    recorder.hooks.append(hook)


async def _restart_broker(result: RunResult, gate: threading.Event) -> None:
    result.kills.append(("broker", "stop_app", 0))
    result.broker_down = time.monotonic()
    try:
        await _ctl("stop_app")
        await asyncio.sleep(2.0)
    finally:
        # whatever happens, the shared broker comes back
        await asyncio.shield(_ctl("start_app"))
        result.broker_up = time.monotonic()
        result.kills.append(("broker", "start_app", 0))
        gate.set()  # the held client sends now, over its reconnected connection


async def _ctl(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _out, err = await asyncio.wait_for(proc.communicate(), 120)
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {err.decode()[-500:]}")


async def _run_hostile(
    scenario: Scenario,
    clients: dict[str, NumpyParticipant],
    bus: Bus,
    recorder: Recorder,
    result: RunResult,
    gate: threading.Event,
) -> None:
    try:
        assert scenario.hostile is not None and scenario.hostile_round is not None
        await scenario.hostile(scenario.hostile_round, clients, bus, recorder, result.hostile_sent)
        before = len(result.hostile_sent) - 1
        await recorder.until(
            lambda: len(recorder.of("update.rejected")) + _duplicate_alerts(recorder) >= before,
            30,
            "every hostile message rejected",
        )
    finally:
        gate.set()


def _duplicate_alerts(recorder: Recorder) -> int:
    return sum(
        1
        for _r, b in recorder.of("alert.raised")
        if b.alert_kind == "message.rejected" and b.reason == "DUPLICATE"
    )
