"""``qflare tui``: the live operator console (Textual) on a broker."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from qflare.cli import add_federation_flags
from qflare.commands._common import DefaultsHelpFormatter, add_pairs_option, number_in

_EPSILON = number_in("EPSILON (--budget JOB=EPSILON)", 0.0, low_open=True, high_open=True)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "tui",
        help="watch a federation live: rounds, alerts, clients, privacy budget, accuracy",
        description="A terminal console subscribed to qflare.events and qflare.alerts. "
        "Keys: p pause/resume the feed, f filter alerts (sev:warning kind:client.flagged "
        "client:client-003 words), s cycle the minimum severity, a acknowledge, d details, "
        "q quit.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_federation_flags(p)
    p.add_argument(
        "--pki",
        type=Path,
        default=os.environ.get("QFLARE_PKI_DIR") or None,
        help="a `qflare provision` folder or any kit folder holding ca.qc and "
        "crl.qrl: verify every signature ($QFLARE_PKI_DIR); without it the feed "
        "is decoded but not verified",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="the services' data folder: load recent alerts and rounds from their "
        "SQLite files (read-only) on start",
    )
    add_pairs_option(
        p,
        "--budget",
        _EPSILON,
        form="JOB=EPSILON",
        help="a job's epsilon budget, for the gauge (the wire carries spend only)",
    )
    p.add_argument(
        "--declare",
        choices=("full", "passive"),
        default=os.environ.get("QFLARE_BROKER_DECLARE") or "full",
        help="passive: only check that the exchanges exist, as the operator's broker user "
        "from `qflare broker-definitions` must; full: declare them ($QFLARE_BROKER_DECLARE)",
    )
    p.add_argument(
        "--raw-alerts",
        action="store_true",
        help="also show alert.raised from qflare.events (when no alerting service runs)",
    )
    p.set_defaults(func=main)


def load_trust_from(path: Path) -> Any:
    """The trust store of a provision root (``ca/``) or of a kit folder."""
    from qflare.crypto import load_trust

    for folder in (path, path / "ca"):
        if (folder / "ca.qc").is_file():
            return load_trust(folder)
    raise ValueError(f"{path} holds no ca.qc (give the `qflare provision --out` folder or a kit)")


def main(args: argparse.Namespace) -> int:
    import asyncio
    import time

    from qflare.errors import UsageError
    from qflare.runtime.preflight import connect_timeout_from_env, wait_for_broker
    from qflare.tui.console import build_console
    from qflare.tui.events import JobDeclared

    try:
        trust = load_trust_from(args.pki) if args.pki else None
        if args.state_dir is not None and not args.state_dir.is_dir():
            raise ValueError(f"--state-dir {args.state_dir} is not a folder")
        if args.broker.startswith("memory"):
            raise ValueError(
                "the in-memory bus lives inside one process: use "
                "`qflare simulate --tui` to watch it, or --broker amqp://..."
            )
        if not args.broker.startswith(("amqp://", "amqps://")):
            raise ValueError(f"--broker must be an amqp:// or amqps:// URL, got {args.broker!r}")
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None
    # before the screen takes the terminal: a refused login or an absent broker is one line
    asyncio.run(wait_for_broker(args.broker, connect_timeout_from_env()))
    now = time.time()
    jobs = [JobDeclared(job, 0, now, epsilon_budget=eps) for job, eps in args.budget]
    app = build_console(
        url=args.broker,
        prefix=args.prefix,
        trust=trust,
        state_dir=args.state_dir,
        jobs=jobs,
        raw_alerts=args.raw_alerts,
        declare=args.declare,
    )
    app.run()
    return 0
