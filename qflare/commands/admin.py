"""Operator commands: ``qflare status``, ``qflare alerts``, ``qflare clients``, ``qflare revoke``.

The first three read the services' SQLite files read-only (WAL lets them do so while the
services write): the aggregator's jobs, rounds and models, the detector's reputation, the
alerting history. A file or table that does not exist yet (a service that never ran) is
reported as empty, not as an error; a configuration, a data folder or a file that cannot be
read is one line on stderr (:func:`qflare.cli.main`). ``revoke`` issues a new revocation list through
:func:`qflare.crypto.provision.revoke`, which rewrites ``crl.qrl`` in every identity folder;
ingest and the aggregator re-read their copies when the file changes, so without a restart
ingest refuses the client's next update and the aggregator stops selecting and waiting for it
(docs/architecture.md, "Revocation"). With a management URL (``--management-url``,
``[qflare] management_url``) it also deletes each revoked client's broker user and closes its
connections (:mod:`qflare.bus.management`); without one it says, in one line, that the
broker was not told.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qflare.commands._common import add_config_option, add_pki_dir_option

if TYPE_CHECKING:  # qflare.runtime loads messages, numpy, pydantic models: only in handlers
    from qflare.runtime.config import Settings

SEVERITIES = ("info", "warning", "critical")
#: Rounds whose metrics ``status`` shows per job (the newest), and of those in the table.
METRIC_ROUNDS = 100
METRIC_ROUNDS_SHOWN = 5


def _common(p: argparse.ArgumentParser) -> None:
    add_config_option(p)
    p.add_argument("--data-dir", help="the services' state folder (default from the config)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _settings(args: argparse.Namespace) -> Settings:
    from qflare.runtime.config import load_settings

    return load_settings(
        args.config,
        data_dir=getattr(args, "data_dir", None),
        pki_dir=getattr(args, "pki_dir", None),
    )


@contextlib.contextmanager
def _db(data_dir: Path, service: str) -> Iterator[sqlite3.Connection | None]:
    path = data_dir / service / f"{service}.sqlite"
    if not path.exists():
        yield None
        return
    from qflare.errors import CommandFailed
    from qflare.runtime.sqlite import open_readonly

    try:
        conn = open_readonly(path)
    except sqlite3.Error as exc:
        raise CommandFailed(f"cannot read {path}: {exc}") from None
    try:
        yield conn
    except sqlite3.Error as exc:
        raise CommandFailed(f"cannot read {path}: {exc}") from None
    finally:
        conn.close()


def _rows(
    conn: sqlite3.Connection | None, sql: str, params: tuple[Any, ...] = ()
) -> list[sqlite3.Row]:
    if conn is None:
        return []
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise


# -- data gathering (plain dicts, so --json and the tables share one source) -------------------
def status_data(data_dir: Path) -> dict[str, Any]:
    jobs: list[dict[str, Any]] = []
    with (
        _db(data_dir, "aggregator") as agg,
        _db(data_dir, "detector") as det,
        _db(data_dir, "alerting") as al,
        _db(data_dir, "accountant") as acc,
    ):
        for job in _rows(
            agg, "SELECT job_id, ended, end_reason, created FROM jobs ORDER BY created"
        ):
            jid = job["job_id"]
            spec = {}
            with contextlib.suppress(Exception):
                spec = json.loads(
                    _rows(agg, "SELECT spec FROM jobs WHERE job_id=?", (jid,))[0]["spec"]
                )
            last = _rows(
                agg,
                "SELECT round, state, participants, epsilon, clip FROM rounds WHERE job_id=? "
                "ORDER BY round DESC LIMIT 1",
                (jid,),
            )
            model = _rows(
                agg,
                "SELECT version, epsilon, digest FROM models WHERE job_id=? "
                "ORDER BY version DESC LIMIT 1",
                (jid,),
            )
            updates = (
                _rows(
                    agg,
                    "SELECT COUNT(*) AS n FROM updates WHERE job_id=? AND round=?",
                    (jid, last[0]["round"]),
                )
                if last
                else []
            )
            quarantined = _rows(
                det,
                "SELECT client FROM clients WHERE job_id=? AND quarantined_until >= "
                "(SELECT IFNULL(MAX(round),0) FROM verdicts WHERE job_id=?)",
                (jid, jid),
            )
            alerts = _rows(
                al,
                "SELECT severity, SUM(count) AS n FROM alerts WHERE job=? GROUP BY severity",
                (jid,),
            )
            ledger = _rows(
                acc,
                "SELECT SUM(granted) AS granted, SUM(1 - granted) AS denied, "
                "MAX(CASE WHEN granted THEN epsilon_total END) AS spent FROM decisions "
                "WHERE job=?",
                (jid,),
            )
            jobs.append(
                {
                    "job": jid,
                    "metrics": round_metrics(agg, jid),
                    "state": ("ended: " + (job["end_reason"] or "")) if job["ended"] else "running",
                    "rounds": spec.get("rounds"),
                    "round": last[0]["round"] if last else None,
                    "round_state": last[0]["state"] if last else None,
                    # the clip norm of the latest round (it moves with adaptive clipping)
                    "clip": last[0]["clip"]
                    if last and last[0]["clip"] is not None
                    else spec.get("clip"),
                    "participants": len(json.loads(last[0]["participants"] or "[]")) if last else 0,
                    "updates": updates[0]["n"] if updates else 0,
                    "model_version": model[0]["version"] if model else None,
                    "model_digest": bytes(model[0]["digest"]).hex()[:16] if model else None,
                    "epsilon": model[0]["epsilon"] if model else None,
                    "epsilon_budget": spec.get("epsilon_budget"),
                    "quarantined": [r["client"] for r in quarantined],
                    "alerts": {r["severity"]: r["n"] for r in alerts},
                    "ledger": (
                        {
                            "granted": ledger[0]["granted"] or 0,
                            "denied": ledger[0]["denied"] or 0,
                            "epsilon_spent": ledger[0]["spent"],
                        }
                        if ledger
                        else None
                    ),
                }
            )
    services = {
        name: (data_dir / name / f"{name}.sqlite").exists()
        for name in ("aggregator", "detector", "accountant", "alerting")
    }
    return {"data_dir": str(data_dir), "stores": services, "jobs": jobs}


def round_metrics(conn: sqlite3.Connection | None, job: str) -> list[dict[str, Any]]:
    """The weighted metrics of the job's newest published rounds, oldest first: per round
    ``train`` (the kept updates' training metrics, weighted by samples), ``evaluate`` (their
    evaluations of the round's base model, weighted by examples) and ``central`` (the job's
    evaluate_fn on the round's model), as the aggregator stored them with the round."""
    rows = _rows(
        conn,
        "SELECT round, verdict FROM rounds WHERE job_id=? AND verdict IS NOT NULL "
        "ORDER BY round DESC LIMIT ?",
        (job, METRIC_ROUNDS),
    )
    out = []
    for row in reversed(rows):
        with contextlib.suppress(ValueError, TypeError):
            metrics = json.loads(row["verdict"]).get("metrics")
            if metrics:
                out.append({"round": row["round"], **metrics})
    return out


def alerts_data(
    data_dir: Path, *, job: str | None, severity: str | None, client: str | None, limit: int
) -> list[dict[str, Any]]:
    where, params = [], []
    if job:
        where.append("job = ?")
        params.append(job)
    if client:
        where.append("client = ?")
        params.append(client)
    if severity:
        allowed = SEVERITIES[SEVERITIES.index(severity) :]
        where.append(f"severity IN ({','.join('?' * len(allowed))})")
        params.extend(allowed)
    sql = (
        "SELECT id, job, kind, severity, client, round, reason, detail, source, first_ts, last_ts, "
        "count, action FROM alerts"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY id DESC LIMIT ?"
    )
    with _db(data_dir, "alerting") as al:
        return [dict(r) for r in _rows(al, sql, (*params, limit))]


def clients_data(settings: Settings, job: str | None) -> list[dict[str, Any]]:
    data_dir = settings.data_dir
    revoked: set[bytes] = set()
    kits: dict[str, Any] = {}
    if settings.pki_dir is not None and (Path(settings.pki_dir) / "ca").exists():
        from qflare.crypto.pki import Certificate, RevocationList

        root = Path(settings.pki_dir)
        crl_path = root / "ca" / "crl.qrl"
        if crl_path.exists():
            revoked = set(RevocationList.from_bytes(crl_path.read_bytes()).serials)
        for issued in sorted((root / "ca" / "issued").glob("*.qc")):
            cert = Certificate.from_bytes(issued.read_bytes())
            if cert.role == "client":
                kits[cert.id] = cert
    out: dict[str, dict[str, Any]] = {}
    for cid, cert in kits.items():
        out[cid] = {
            "client": cid,
            "revoked": cert.serial in revoked,
            "expires": time.strftime("%Y-%m-%d", time.gmtime(cert.not_after)),
            "updates": 0,
            "flags": 0,
            "score": None,
            "quarantined": False,
            "alerts": 0,
        }
    with (
        _db(data_dir, "aggregator") as agg,
        _db(data_dir, "detector") as det,
        _db(data_dir, "alerting") as al,
    ):
        jf, jp = (" WHERE job_id = ?", (job,)) if job else ("", ())
        for r in _rows(
            agg, "SELECT client, COUNT(*) AS n FROM updates" + jf + " GROUP BY client", jp
        ):
            out.setdefault(r["client"], _blank(r["client"]))["updates"] = r["n"]
        for r in _rows(
            det,
            "SELECT client, SUM(offences) AS flags, MIN(score) AS score, "
            "MAX(quarantined_until) AS q FROM clients" + jf + " GROUP BY client",
            jp,
        ):
            row = out.setdefault(r["client"], _blank(r["client"]))
            row.update(flags=r["flags"], score=r["score"], quarantined=bool(r["q"] and r["q"] > 0))
        af, ap = (" AND job = ?", (job,)) if job else ("", ())
        for r in _rows(
            al,
            "SELECT client, SUM(count) AS n FROM alerts WHERE client IS NOT NULL"
            + af
            + " GROUP BY client",
            ap,
        ):
            out.setdefault(r["client"], _blank(r["client"]))["alerts"] = r["n"]
    return [out[k] for k in sorted(out)]


def _blank(client: str) -> dict[str, Any]:
    return {
        "client": client,
        "revoked": None,
        "expires": None,
        "updates": 0,
        "flags": 0,
        "score": None,
        "quarantined": False,
        "alerts": 0,
    }


# -- rendering ------------------------------------------------------------------------------------
def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*["" if v is None else str(v) for v in row])
    Console(width=160).print(table)


def _ts(value: float | None) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(value)) if value else ""


def run_status(args: argparse.Namespace) -> int:
    data = status_data(_settings(args).data_dir)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    stores = ", ".join(f"{k}{'' if v else ' (none)'}" for k, v in data["stores"].items())
    print(f"data dir {data['data_dir']}: {stores}")
    if not data["jobs"]:
        print("no jobs yet (is the aggregator running with this --data-dir?)")
        return 0
    _table(
        "jobs",
        [
            "job",
            "state",
            "round",
            "phase",
            "updates/selected",
            "model",
            "epsilon",
            "alerts",
            "quarantined",
        ],
        [
            [
                j["job"],
                j["state"]
                + (
                    f" (denied {j['ledger']['denied']})"
                    if j["ledger"] and j["ledger"]["denied"]
                    else ""
                ),
                f"{j['round']}/{j['rounds']}" if j["rounds"] else j["round"],
                j["round_state"],
                f"{j['updates']}/{j['participants']}",
                f"v{j['model_version']} {j['model_digest']}"
                if j["model_version"] is not None
                else "",
                (f"{j['epsilon']:.3f}" if j["epsilon"] is not None else "")
                + (f" / {j['epsilon_budget']}" if j["epsilon_budget"] else ""),
                " ".join(f"{k}:{v}" for k, v in sorted(j["alerts"].items())),
                ", ".join(j["quarantined"]),
            ]
            for j in data["jobs"]
        ],
    )
    rows = [[j["job"], m] for j in data["jobs"] for m in j["metrics"][-METRIC_ROUNDS_SHOWN:]]
    if rows:
        _table(
            f"round metrics (newest {METRIC_ROUNDS_SHOWN} rounds per job; weighted means)",
            ["job", "round", "train (samples)", "evaluated by participants", "central"],
            [
                [
                    job,
                    m["round"],
                    _measured(m.get("train"), "num_samples"),
                    _measured(m.get("evaluate"), "num_examples"),
                    _measured(m.get("central"), "num_examples"),
                ]
                for job, m in rows
            ],
        )
    return 0


def _measured(part: dict[str, Any] | None, weight: str) -> str:
    """One stored part of a round's metrics as a table cell."""
    if not part:
        return ""
    if "error" in part:
        return f"v{part.get('model_version')} failed: {str(part['error'])[:40]}"
    values = {"loss": part["loss"]} if "loss" in part else {}
    values.update(part.get("metrics", {}))
    head = f"v{part['model_version']} " if "model_version" in part else ""
    shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
    return f"{head}{shown} (n={part.get(weight, 0)})"


def _listing(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    empty: str,
    title: str,
    columns: list[str],
    cells: Callable[[dict[str, Any]], list[Any]],
) -> int:
    """Print ``rows`` as JSON (``--json``), as ``empty`` when there are none, or as a table."""
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(empty)
    else:
        _table(title, columns, [cells(r) for r in rows])
    return 0


def run_alerts(args: argparse.Namespace) -> int:
    rows = alerts_data(
        _settings(args).data_dir,
        job=args.job,
        severity=args.severity,
        client=args.client,
        limit=args.limit,
    )
    return _listing(
        args,
        rows,
        "no alerts",
        "alerts (newest first)",
        [
            "#",
            "time",
            "severity",
            "job",
            "kind",
            "client",
            "round",
            "reason",
            "count",
            "state",
            "detail",
        ],
        lambda r: [
            r["id"],
            _ts(r["last_ts"]),
            r["severity"],
            r["job"],
            r["kind"],
            r["client"],
            r["round"],
            r["reason"],
            r["count"],
            "sent" if r["action"] == "publish" else r["action"],
            r["detail"][:60],
        ],
    )


def run_clients(args: argparse.Namespace) -> int:
    rows = clients_data(_settings(args), args.job)
    return _listing(
        args,
        rows,
        "no clients known (give --pki-dir, or run a job first)",
        "clients" + (f" of {args.job}" if args.job else ""),
        ["client", "revoked", "expires", "updates", "flags", "score", "quarantined", "alerts"],
        lambda r: [
            r["client"],
            r["revoked"],
            r["expires"],
            r["updates"],
            r["flags"],
            f"{r['score']:.3f}" if isinstance(r["score"], float) else r["score"],
            r["quarantined"],
            r["alerts"],
        ],
    )


def run_revoke(args: argparse.Namespace) -> int:
    from qflare.crypto.keystore import passphrase_from_env
    from qflare.crypto.pki import Certificate
    from qflare.crypto.provision import resolve_targets, revoke
    from qflare.errors import UsageError
    from qflare.runtime.config import load_settings

    settings = load_settings(args.config, pki_dir=args.pki_dir, management_url=args.management_url)
    if settings.pki_dir is None:
        raise UsageError(
            "give --pki-dir (the folder `qflare provision` wrote) or set QFLARE_PKI_DIR"
        )
    try:
        passphrase = (
            passphrase_from_env(args.passphrase_env)
            if args.passphrase_env
            else (settings.passphrase.encode() if settings.passphrase else None)
        )
        crl = revoke(settings.pki_dir, args.clients, passphrase)
        clients = [
            t.id
            for t in resolve_targets(settings.pki_dir, args.clients)
            if isinstance(t, Certificate) and t.role == "client"
        ]
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    print(
        f"revoked {', '.join(args.clients)}: revocation list #{crl.number} ({len(crl.serials)} "
        f"certificates) written to every kit under {settings.pki_dir}; ingest and the "
        "aggregator apply it without a restart"
    )
    if clients:
        tell_broker(settings.management_url, clients)
    return 0


def tell_broker(management_url: str | None, clients: list[str]) -> None:
    """Delete the broker users of ``clients`` and close their connections through the
    management API; without a URL, say in one line that the broker was not told."""
    from qflare.commands.broker import client_user
    from qflare.errors import CommandFailed

    users = [client_user(c) for c in clients]
    if not management_url:
        print(
            f"broker not told (no management URL): {', '.join(users)} can still log in; give "
            "--management-url or [qflare] management_url, or run `rabbitmqctl delete_user "
            f"{' '.join(users)}` on the broker"
        )
        return
    from qflare.bus.management import Management, ManagementError

    api = Management.from_url(management_url)
    for user in users:
        try:
            done = api.disable_user(user, reason=f"client {user} revoked")
        except ManagementError as exc:
            raise CommandFailed(
                f"revocation list written, but the broker was not told: {exc} (run the "
                "command again once the management API answers)"
            ) from None
        print(
            f"broker: user {user} "
            + ("deleted" if done.deleted else "was not there")
            + f", {len(done.closed)} open connection(s) closed"
        )


def register(subparsers: Any) -> None:
    s = subparsers.add_parser(
        "status", help="jobs, rounds, models, budget and alerts from the services' state"
    )
    _common(s)
    s.set_defaults(func=run_status)

    a = subparsers.add_parser("alerts", help="stored alerts, newest first")
    _common(a)
    a.add_argument("--job")
    a.add_argument("--client")
    a.add_argument("--severity", choices=SEVERITIES, help="this severity and above")
    a.add_argument("--limit", type=int, default=50)
    a.set_defaults(func=run_alerts)

    c = subparsers.add_parser(
        "clients", help="enrolled clients: revocation, updates, flags, reputation"
    )
    _common(c)
    c.add_argument("--job")
    add_pki_dir_option(c)
    c.set_defaults(func=run_clients)

    r = subparsers.add_parser(
        "revoke", help="revoke client certificates (takes effect without restarts)"
    )
    r.add_argument(
        "clients", nargs="+", metavar="CLIENT", help="client id (or certificate serial in hex)"
    )
    add_config_option(r)
    add_pki_dir_option(r)
    r.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="env variable holding the CA key passphrase (default QFLARE_PASSPHRASE)",
    )
    r.add_argument(
        "--management-url",
        metavar="URL",
        help="RabbitMQ management API, http://<admin>:<password>@<host>:15672/: delete the "
        "revoked clients' broker users and close their connections (default [qflare] "
        "management_url, $QFLARE_MANAGEMENT_URL)",
    )
    r.set_defaults(func=run_revoke)
