"""``qflare serve <service>`` and ``qflare up``: run QFLARE's services.

``serve`` runs one service in this process until SIGTERM/SIGINT. ``up`` runs all five:
against a broker URL (``amqp://``) each service is its own OS process (``qflare serve``
children, ``--replicas ingest=2`` for more ingest replicas; a child that dies is restarted
unless ``--no-restart``; they start in dependency order, each once the previous are
ready); on the embedded bus (``memory://``, the default) or with
``--in-process`` they share one process and one bus. Configuration comes from ``--config``
(or ``$QFLARE_CONFIG``) plus ``QFLARE_*`` variables; flags override both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # qflare.runtime loads messages, numpy, pydantic models: only in handlers
    from qflare.runtime.config import Settings

#: ``qflare.runtime.SERVICES`` (start order), spelled out so that building the CLI does not
#: load the runtime; tests/unit/test_cli_startup.py checks that the two agree.
SERVICES: tuple[str, ...] = ("alerting", "accountant", "detector", "ingest", "aggregator")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (default $QFLARE_CONFIG)")
    p.add_argument(
        "--broker", help="memory:// or amqp://user:pass@host:port/ (default $QFLARE_BROKER)"
    )
    p.add_argument("--prefix", help="exchange/queue name prefix (default $QFLARE_PREFIX)")
    p.add_argument("--data-dir", help="state folder, one sub-folder per service")
    p.add_argument("--pki-dir", help="folder written by `qflare provision`")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")


def register(subparsers: Any) -> None:
    s = subparsers.add_parser(
        "serve",
        help="run one service until SIGTERM",
        description="Run one QFLARE service in this process.",
    )
    s.add_argument("service", choices=SERVICES)
    _common(s)
    s.set_defaults(func=run_serve)

    u = subparsers.add_parser(
        "up",
        help="run all services (separate processes on RabbitMQ, one process on memory://)",
        description="Run every QFLARE service: one OS process each against a broker URL, or "
        "all in one process on the embedded bus.",
    )
    _common(u)
    u.add_argument(
        "--in-process",
        action="store_true",
        help="one process and one bus connection for all services, even on amqp://",
    )
    u.add_argument(
        "--replicas",
        action="append",
        default=[],
        metavar="SERVICE=N",
        help="replicas of a stateless service (ingest, alerting), e.g. ingest=2",
    )
    u.add_argument("--no-restart", action="store_true", help="do not restart a child that exits")
    u.set_defaults(func=run_up)


def _settings(args: argparse.Namespace) -> Settings:
    from qflare.runtime.config import load_settings

    return load_settings(
        args.config,
        broker=args.broker,
        prefix=args.prefix,
        data_dir=args.data_dir,
        pki_dir=args.pki_dir,
        log_level=args.log_level,
    )


def run_serve(args: argparse.Namespace) -> int:
    from qflare.runtime.runner import run_service

    try:
        settings = _settings(args)
    except (ValueError, TypeError) as exc:
        print(f"qflare serve: {exc}", file=sys.stderr)
        return 2
    return run_service(args.service, settings)


def _replicas(values: list[str]) -> dict[str, int]:
    out = {name: 1 for name in SERVICES}
    for item in values:
        name, sep, count = item.partition("=")
        if not sep or name not in ("ingest", "alerting") or not count.isdigit() or int(count) < 1:
            raise ValueError(
                f"--replicas takes ingest=N or alerting=N with N >= 1 (the other services run one "
                f"active consumer each), got {item!r}"
            )
        out[name] = int(count)
    return out


def run_up(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
        replicas = _replicas(args.replicas)
    except (ValueError, TypeError) as exc:
        print(f"qflare up: {exc}", file=sys.stderr)
        return 2
    if settings.embedded or args.in_process:
        return _up_in_process(settings)
    return _up_processes(args, replicas)


def _up_in_process(settings: Settings) -> int:
    from qflare.runtime.logging import configure_logging
    from qflare.runtime.runner import run_in_process

    configure_logging("up", settings.log_level, settings.log_format)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with run_in_process(settings):
            print(
                "qflare up: all services running in this process; SIGTERM or Ctrl-C stops them",
                file=sys.stderr,
                flush=True,
            )
            await stop.wait()

    try:
        asyncio.run(main())
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"qflare up: {exc}", file=sys.stderr)
        return 2
    return 0


def _up_processes(args: argparse.Namespace, replicas: dict[str, int]) -> int:
    """Supervise one ``qflare serve`` child per service replica; forward SIGTERM.

    Children start in :data:`SERVICES` order, each once the previous ones reported
    ``serve.ready`` (their queues exist), so nothing the aggregator publishes at start-up
    falls on an undeclared queue. Their log lines pass through this process's stderr."""
    flags: list[str] = []
    for name in ("config", "broker", "prefix", "data_dir", "pki_dir", "log_level"):
        value = getattr(args, name)
        if value:
            flags += [f"--{name.replace('_', '-')}", value]
    children: dict[tuple[str, int], subprocess.Popen[bytes]] = {}
    ready: dict[tuple[str, int], threading.Event] = {}

    def forward(key: tuple[str, int], stream: Any, flag: threading.Event) -> None:
        for line in iter(stream.readline, b""):
            sys.stderr.buffer.write(line)
            sys.stderr.buffer.flush()
            if b'"event":"serve.ready"' in line:
                flag.set()
        stream.close()

    def spawn(name: str, index: int) -> None:
        cmd = [sys.executable, "-m", "qflare", "serve", name, *flags]
        child = subprocess.Popen(cmd, env=os.environ.copy(), stderr=subprocess.PIPE)
        flag = threading.Event()
        children[(name, index)] = child
        ready[(name, index)] = flag
        threading.Thread(
            target=forward, args=((name, index), child.stderr, flag), daemon=True
        ).start()

    stopping = False

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for name in SERVICES:
        for i in range(replicas[name]):
            spawn(name, i)
        for i in range(replicas[name]):
            while not stopping and not ready[(name, i)].wait(0.2):
                if children[(name, i)].poll() is not None:
                    print(
                        f"qflare up: {name}[{i}] exited with {children[(name, i)].returncode} "
                        "before it was ready",
                        file=sys.stderr,
                    )
                    stop(signal.SIGTERM, None)
                    break
    code = 0
    while children:
        time.sleep(0.5)
        for key, child in list(children.items()):
            rc = child.poll()
            if rc is None:
                continue
            del children[key]
            if stopping or args.no_restart:
                code = code or (rc if rc > 0 else 0)
                continue
            print(f"qflare up: {key[0]}[{key[1]}] exited with {rc}; restarting", file=sys.stderr)
            spawn(*key)
    return code
