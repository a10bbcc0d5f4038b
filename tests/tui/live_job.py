"""Real-terminal check of the console: a job under attack, run by the real services and SDK
participants in this process, watched by the console on the same embedded bus.

    tmux new -d -s q -x 160 -y 48 'python -m tests.tui.live_job --out /tmp/qflare-live'
    tmux capture-pane -p -t q

Over RabbitMQ, with the console as its own process (the `qflare tui` command):

    qflare provision --out /tmp/qflare-rmq/pki --clients 8
    tmux new -d -s q -x 160 -y 48 'qflare tui --broker amqp://guest:guest@127.0.0.1:5672/ \
        --prefix live- --pki /tmp/qflare-rmq/pki --budget demo=30'
    python -m tests.tui.live_job --out /tmp/qflare-rmq --broker amqp://guest:guest@127.0.0.1:5672/ \
        --prefix live- --no-console

Eight participants train a small classifier; two of them (``client-006``, ``client-007``)
send sign-flipped, scaled updates. An evaluator with the operator identity publishes
``metrics.evaluated`` for each new model version (held-out accuracy), so the sparkline
fills. The console measures, for every flagged client and every alert, the time from the
signed event (the envelope's timestamp: the verdict, the alerting service's republish, and
for flag alerts also the verdict they report) to the redraw that put it on screen, and
writes those figures to ``<out>/latency.json`` when it quits (``q``, or ``--exit-after``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from qflare.bus import Delivery, Outcome, QueueSpec, connect_bus, topology
from qflare.client import Participant, RoundInfo, load_tensors, model_tensors
from qflare.crypto import Federation, provision
from qflare.messages import encode, open_envelope
from qflare.runtime import JobSpec, load_settings, run_in_process
from qflare.tui.app import ConsoleApp
from qflare.tui.console import build_console, terminal_logs_to
from qflare.tui.events import JobDeclared

CLIENTS = 8
BYZANTINE = ("client-006", "client-007")
W_TRUE = torch.tensor([[1.5, -2.0, 0.5], [-1.5, 2.0, -0.5]])


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def batch(seed: int, n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, (x @ W_TRUE.T).argmax(dim=1)


def train(model: torch.nn.Module, info: RoundInfo) -> int:
    x, y = batch(hash((info.client, info.round)) % 2**31)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return len(x)


def sign_flip(update: dict[str, np.ndarray], info: RoundInfo) -> dict[str, np.ndarray]:
    return {k: -4.0 * v for k, v in update.items()}


class Evaluator:
    """Scores each published model on held-out data and signs the result as the operator."""

    def __init__(self, bus, identity, trust, job: str) -> None:
        self.bus, self.identity, self.trust, self.job = bus, identity, trust, job
        self.model = make_model()
        self.x, self.y = batch(10_000, 2000)

    async def start(self) -> None:
        spec = QueueSpec(
            f"evaluator.{self.job}", bindings=((topology.BROADCAST, f"{self.job}.model.published"),)
        )
        await self.bus.consume(spec, self.on_model)

    async def on_model(self, delivery: Delivery) -> Outcome:
        env = open_envelope(delivery.body, self.trust, expect_kind="model.published")
        if env.body.tensors is None:
            return Outcome.ACK
        load_tensors(self.model, env.body.tensors)
        with torch.no_grad():
            logits = self.model(self.x)
            acc = float((logits.argmax(dim=1) == self.y).float().mean())
            loss = float(torch.nn.functional.cross_entropy(logits, self.y))
        body = dict(
            model_version=env.body.version, accuracy=acc, loss=loss, num_examples=len(self.y)
        )
        data = encode("metrics.evaluated", body, self.identity, job=self.job, round=env.round)
        await self.bus.publish(topology.EVENTS, f"metrics.evaluated.{self.job}", data)
        return Outcome.ACK


class LatencyProbe:
    """Wraps the console's redraw: the first redraw that shows a flagged client or an alert
    records how long after its signed event that was."""

    def __init__(self, app: ConsoleApp) -> None:
        self.app = app
        self.flagged: dict[tuple[str, int, str], float] = {}
        self.alerts: dict[int, float] = {}
        self.flag_alerts: dict[int, float] = {}
        self.redraw = app.redraw
        app.redraw = self  # type: ignore[method-assign]

    def __call__(self, force: bool = False) -> None:
        self.redraw(force)
        now = time.time()
        state = self.app.state
        for row in state.rounds.values():
            for client in row.flagged:
                key = (row.job, row.round, client)
                if key not in self.flagged and row.verdict_ts is not None:
                    self.flagged[key] = now - row.verdict_ts
        for alert in state.alerts:
            if alert.seq not in self.alerts and alert.source != "console":
                self.alerts[alert.seq] = now - alert.ts
                # a flag alert, timed from the verdict it reports (the detector's decision)
                row = state.rounds.get((alert.job, alert.round))
                if alert.kind == "client.flagged" and row is not None and row.verdict_ts:
                    self.flag_alerts[alert.seq] = now - row.verdict_ts

    def summary(self) -> dict[str, object]:
        def stats(values: list[float]) -> dict[str, float | int]:
            if not values:
                return {"n": 0}
            return {
                "n": len(values),
                "median_s": round(statistics.median(values), 4),
                "max_s": round(max(values), 4),
            }

        return {
            "flagged_clients": stats(list(self.flagged.values())),
            "alerts": stats(list(self.alerts.values())),
            "flag_alerts_from_verdict": stats(list(self.flag_alerts.values())),
            "flagged": sorted({c for (_, _, c) in self.flagged}),
        }


async def main(
    out: Path, rounds: int, exit_after: float | None, broker: str, prefix: str, console: bool
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if (out / "pki" / "ca" / "ca.qc").is_file():  # provisioned beforehand (qflare provision)
        fed = Federation.at(out / "pki")
    else:
        fed = provision(out / "pki", clients=CLIENTS)
    clients = sorted(fed.clients)
    # DP needs the accountant service; without it the job runs with DP off (z = 0).
    dp = importlib.util.find_spec("qflare.services.accountant.service") is not None
    services = [
        n
        for n in ("alerting", "accountant", "detector", "ingest", "aggregator")
        if dp or n != "accountant"
    ]
    spec = JobSpec.model_validate(
        dict(
            job_id="demo",
            rounds=rounds,
            participants=clients,
            rule="median",
            f=2,
            detection=True,
            noise_multiplier=0.3 if dp else 0.0,
            clip=20.0,
            epsilon_budget=30.0,
            seed=11,
            deadline_s=20.0,
            min_updates=CLIENTS,
        )
    )
    if broker.startswith("memory"):
        bus = await connect_bus(f"memory://live-{time.time_ns()}")
    else:
        bus = await connect_bus(broker, prefix=prefix)
    settings = load_settings(None, env={}, data_dir=str(out / "data"), pki_dir=str(fed.root))
    ids = {n: (fed.identity(n), fed.trust()) for n in services}
    app = build_console(
        bus=bus,
        trust=fed.trust(),
        state_dir=out / "data",
        jobs=[
            JobDeclared(
                "demo",
                0,
                time.time(),
                rounds=spec.rounds,
                epsilon_budget=spec.epsilon_budget if dp else None,
            )
        ],
    )
    probe = LatencyProbe(app)
    ended = asyncio.Event()
    with terminal_logs_to(out / "services.log"):
        async with run_in_process(settings, bus, services=services, identities=ids) as running:
            evaluator = Evaluator(bus, fed.identity("operator"), fed.trust(), "demo")
            await evaluator.start()
            parts = [
                Participant.from_kit(
                    fed.clients[c],
                    make_model(),
                    train,
                    broker=bus,
                    jobs=["demo"],
                    update_transform=sign_flip if c in BYZANTINE else None,
                )
                for c in clients
            ]

            async def job() -> None:
                await asyncio.sleep(2.0)  # the console is up and subscribed first
                for p in parts:
                    await p.start()
                await running.submit_job(spec, model_tensors(make_model()))
                await running.wait_job("demo")
                if exit_after is not None:
                    await asyncio.sleep(exit_after)
                    await app.action_quit()
                ended.set()

            task = asyncio.create_task(job())
            if console:
                await app.run_async()
                task.cancel()
            else:
                await ended.wait()
            for p in parts:
                await p.stop()
    if prefix:
        await bus.delete_all()
    await bus.close()
    if console:
        (out / "latency.json").write_text(json.dumps(probe.summary(), indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/qflare-live"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--exit-after",
        type=float,
        default=None,
        help="quit this many seconds after the job ends (default: wait for q)",
    )
    parser.add_argument(
        "--broker",
        default="memory://",
        help="amqp://... runs the job over RabbitMQ (watch it with `qflare tui`)",
    )
    parser.add_argument("--prefix", default="", help="name prefix on RabbitMQ (deleted at the end)")
    parser.add_argument(
        "--no-console",
        dest="console",
        action="store_false",
        help="run the job only (watch it from another terminal with `qflare tui`)",
    )
    args = parser.parse_args()
    if not args.console and args.exit_after is None:
        args.exit_after = 0.0
    asyncio.run(
        main(args.out, args.rounds, args.exit_after, args.broker, args.prefix, args.console)
    )
