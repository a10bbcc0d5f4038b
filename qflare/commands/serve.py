"""``qflare serve <service>`` and ``qflare up``: run QFLARE's services.

``serve`` runs one service in this process until SIGTERM/SIGINT. ``up`` runs all five:
against a broker URL (``amqp://``) each service is its own OS process (``qflare serve``
children, ``--replicas ingest=2`` for more ingest replicas; a child that dies is restarted
unless ``--no-restart``; they start in dependency order, each once the previous one's
``/readyz`` answers, and if one fails to start the others are stopped:
:mod:`qflare.runtime.supervisor`); on the embedded bus (``memory://``, the default) or with
``--in-process`` they share one process and one bus. A broker URL that names no user
(``amqp://host:5672/vhost``) logs each service in as its own role's user with the password
``qflare broker-definitions --kit`` wrote beside its keys
(:meth:`qflare.runtime.config.Settings.broker_for`; ``--in-process`` has one connection, so
it needs a URL whose user may do what every service does). Configuration comes from ``--config``
(or ``$QFLARE_CONFIG``) plus ``QFLARE_*`` variables; flags override both. It is checked
whole (:mod:`qflare.runtime.config`) before anything starts.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from qflare.commands._common import add_config_option, add_pki_dir_option, whole_number_in

if TYPE_CHECKING:  # qflare.runtime loads messages, numpy, pydantic models: only in handlers
    from qflare.runtime.config import Settings

#: ``qflare.runtime.SERVICES`` (start order), spelled out so that building the CLI does not
#: load the runtime; tests/unit/test_cli_startup.py checks that the two agree.
SERVICES: tuple[str, ...] = ("alerting", "accountant", "detector", "ingest", "aggregator")


def _common(p: argparse.ArgumentParser) -> None:
    add_config_option(p)
    p.add_argument(
        "--broker", help="memory:// or amqp://user:pass@host:port/ (default $QFLARE_BROKER)"
    )
    p.add_argument("--prefix", help="exchange/queue name prefix (default $QFLARE_PREFIX)")
    p.add_argument("--data-dir", help="state folder, one sub-folder per service")
    add_pki_dir_option(p)
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")
    p.add_argument("--log-format", help="json (one object per line) or text")
    p.add_argument(
        "--metrics-port",
        type=whole_number_in("--metrics-port", 0, 65535),
        help="port of /metrics, /healthz and /readyz (default [qflare] metrics_port; 0: any "
        "free port; `up` gives its children this port and the next ones)",
    )


#: Flags a child of ``qflare up`` gets from its parent's command line.
_PASSED = ("config", "broker", "prefix", "data_dir", "pki_dir", "log_level", "log_format")


def register(subparsers: Any) -> None:
    s = subparsers.add_parser(
        "serve",
        help="run one service until SIGTERM",
        description="Run one QFLARE service in this process. It serves /healthz, /readyz "
        "and /metrics on [qflare] metrics_host:metrics_port.",
    )
    s.add_argument("service", choices=SERVICES)
    _common(s)
    s.set_defaults(func=run_serve)

    u = subparsers.add_parser(
        "up",
        help="run all services (separate processes on RabbitMQ, one process on memory://)",
        description="Run every QFLARE service: one OS process each against a broker URL, "
        "each started once the previous one's /readyz answers, or all in one process on the "
        "embedded bus. The configuration is checked before any service starts; if one fails "
        "to start, the others are stopped and up exits 1. A broker URL without user:password "
        "logs each service in as its own broker user (<prefix>qflare-<service>, the password "
        "from <pki_dir>/services/<service>/broker_password, written by `qflare "
        "broker-definitions --kit`).",
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
        log_format=args.log_format,
        metrics_port=args.metrics_port,
    )


def run_serve(args: argparse.Namespace) -> int:
    from qflare.runtime.runner import run_service

    return run_service(args.service, _settings(args))


def _replicas(values: list[str]) -> dict[str, int]:
    from qflare.errors import UsageError

    out = {name: 1 for name in SERVICES}
    for item in values:
        name, sep, count = item.partition("=")
        if not sep or name not in ("ingest", "alerting") or not count.isdigit() or int(count) < 1:
            raise UsageError(
                f"--replicas takes ingest=N or alerting=N with N >= 1 (the other services run one "
                f"active consumer each), got {item!r}"
            )
        out[name] = int(count)
    return out


def run_up(args: argparse.Namespace) -> int:
    replicas = _replicas(args.replicas)
    settings = _settings(args)
    from qflare.runtime.preflight import check_can_serve

    check_can_serve(settings, SERVICES)
    if settings.embedded or args.in_process:
        from qflare.runtime.runner import run_all

        return run_all(settings)
    return _up_processes(args, settings, replicas)


def _up_processes(args: argparse.Namespace, settings: Settings, replicas: dict[str, int]) -> int:
    """Supervise one ``qflare serve`` child per service replica
    (:class:`qflare.runtime.supervisor.Supervisor`), after checking that the broker takes
    the login."""
    import asyncio

    from qflare.errors import UsageError
    from qflare.runtime.preflight import wait_for_broker
    from qflare.runtime.supervisor import Child, Supervisor, free_ports
    from qflare.services.ingest.service import SHARE_ENV

    async def logins() -> None:  # each service's own user when the URL names none
        for url in dict.fromkeys(settings.broker_for(name) for name in SERVICES):
            await wait_for_broker(url, settings.connect_timeout_s)

    asyncio.run(logins())
    plan = [(name, i) for name in SERVICES for i in range(replicas[name])]
    if settings.metrics_port:
        ports = [settings.metrics_port + k for k in range(len(plan))]
        if ports[-1] > 65535:
            raise UsageError(
                f"metrics_port {settings.metrics_port} leaves no room for {len(plan)} services "
                "(one port each, counting up); choose a lower one or 0"
            )
    else:
        ports = free_ports(settings.metrics_host or "127.0.0.1", len(plan))
    flags: list[str] = []
    for name in _PASSED:
        value = getattr(args, name)
        if value:
            flags += [f"--{name.replace('_', '-')}", str(value)]

    def command(child: Child) -> list[str]:
        return [
            sys.executable,
            "-m",
            "qflare",
            "serve",
            child.name,
            *flags,
            "--metrics-port",
            str(child.port),
        ]

    def child_env(name: str, i: int) -> dict[str, str]:
        # ingest replicas split the offsets of each update stream: each update checked once
        if name == "ingest":
            return {SHARE_ENV: f"{i}/{replicas[name]}"}
        return {}

    supervisor = Supervisor(
        [
            Child(name, i, port, env=child_env(name, i))
            for (name, i), port in zip(plan, ports, strict=True)
        ],
        command,
        host=settings.metrics_host,
        start_timeout_s=settings.start_timeout_s,
        restart=not args.no_restart,
    )
    return supervisor.run()
