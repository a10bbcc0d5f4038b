"""RabbitMQ set-up as code: ``qflare broker-definitions`` writes a definitions file.

The file (RabbitMQ's JSON definitions format, loaded with ``load_definitions`` or
``rabbitmqctl import_definitions``) declares the vhost, QFLARE's five topic exchanges, the
queues whose shape is fixed (ingest, alerting, the dead-letter drain, one broadcast queue
per client, and every queue a service module lists in ``QUEUES``), policies that bound what
can pile up, and one broker user per client and per service role.

Permissions are the broker half of the trust model (docs/architecture.md): signatures already stop a client from
forging a model, the broker additionally stops it from *writing* anywhere but
``qflare.client`` (and only ``update.*`` routing keys there, via a topic permission) and from
*reading* anything but its own queue ``client.<id>``. RabbitMQ permissions are three regexes
per user and vhost (configure, write, read) checked against resource names; ``queue.bind``
needs write on the queue and read on the exchange, so a client gets write on its own queue
(to bind it to ``<job>.#``), which does not let it publish into it (publishing goes through an
exchange). The exchanges are pre-declared here, so a client never needs configure on them.

Queue arguments come from the bus's own :func:`qflare.bus.rabbitmq.queue_arguments`: a
re-declaration with other arguments fails with PRECONDITION_FAILED, so the file and the
services cannot drift apart.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib
import json
import os
import re
import secrets
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qflare.bus import QueueSpec, topology

#: Service roles that get a broker user, with the exchanges each may publish to.
SERVICE_WRITES: dict[str, tuple[str, ...]] = {
    "ingest": (topology.EVENTS,),
    "detector": (topology.EVENTS,),
    "aggregator": (topology.EVENTS, topology.BROADCAST),
    "accountant": (topology.EVENTS,),
    "alerting": (topology.EVENTS, topology.ALERTS),
    "operator": (topology.EVENTS,),
}
#: ... and the exchanges each may bind its queues to (read).
SERVICE_READS: dict[str, tuple[str, ...]] = {
    "ingest": (topology.CLIENT, topology.EVENTS),
    "detector": (topology.EVENTS,),
    "aggregator": (topology.EVENTS,),
    "accountant": (topology.EVENTS,),
    "alerting": (topology.EVENTS, topology.DEAD),
    "operator": (topology.EVENTS, topology.ALERTS),
}

#: Policies (bounded backlogs). A client offline for long keeps only its latest broadcasts.
#: Ingest's per-replica round queues and the consoles' queues need none: they are transient
#: (exclusive, auto-delete), so the broker removes them with their connection.
CLIENT_QUEUE_MAX_LENGTH = 64
DEAD_QUEUE_MAX_LENGTH = 100_000


def client_queue(client_id: str, job_pattern: str = "#") -> QueueSpec:
    """A client's broadcast queue; the SDK binds it to ``<job>.#`` (same name and
    arguments, so both declarations agree)."""
    return QueueSpec(name=f"client.{client_id}", bindings=((topology.BROADCAST, job_pattern),))


def rabbit_password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt || sha256(salt || pw)),
    with a 4-byte salt."""
    salt = os.urandom(4) if salt is None else salt
    if len(salt) != 4:
        raise ValueError(f"salt must be 4 bytes, got {len(salt)}")
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


@dataclass(frozen=True)
class BrokerUser:
    name: str
    password: str | None
    """None: the user exists but cannot log in with a password (e.g. an example file)."""


def _alt(names: Iterable[str]) -> str:
    return "|".join(re.escape(n) for n in names)


def _own(prefix: str, stem: str) -> str:
    # the queue `stem` and any `stem.<suffix>` (e.g. ingest.rounds.<replica>)
    return f"{re.escape(prefix + stem)}(\\..*)?"


def permissions(role: str, user: str, vhost: str, prefix: str = "") -> dict[str, str]:
    """Configure/write/read regexes for a service role or, with ``role == "client"``, for the
    client whose id is ``user``."""
    p = prefix
    if role == "client":
        own = re.escape(f"{p}client.{user}")
        return {
            "user": user,
            "vhost": vhost,
            "configure": f"^{own}$",
            "write": f"^({re.escape(p + topology.CLIENT)}|{own})$",
            "read": f"^({re.escape(p + topology.BROADCAST)}|{own})$",
        }
    if role not in SERVICE_WRITES:
        raise ValueError(
            f"no broker permissions for role {role!r}; known: client, {', '.join(SERVICE_WRITES)}"
        )
    exchanges = [p + e for e in topology.EXCHANGES]
    own = _own(p, role)
    return {
        "user": user,
        "vhost": vhost,
        "configure": f"^({_alt(exchanges)}|{own})$",
        # write on qflare.dead: RabbitMQ checks it when a queue with that dead-letter
        # exchange is created (the broker republishes into it on the queue's behalf); services
        # create queues the file does not pre-declare (e.g. ingest.rounds.<replica>).
        "write": f"^({_alt(p + e for e in (*SERVICE_WRITES[role], topology.DEAD))}|{own})$",
        "read": f"^({_alt(p + e for e in SERVICE_READS[role])}|{own})$",
    }


def _queue_arguments(spec: QueueSpec, prefix: str) -> dict[str, Any]:
    from qflare.bus.rabbitmq import queue_arguments  # loads aio_pika: only when needed

    return queue_arguments(spec, prefix)


def _queue(spec: QueueSpec, vhost: str, prefix: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    queue = {
        "name": prefix + spec.name,
        "vhost": vhost,
        "durable": True,
        "auto_delete": False,
        "arguments": _queue_arguments(spec, prefix),
    }
    bindings = [
        {
            "source": prefix + exchange,
            "vhost": vhost,
            "destination": prefix + spec.name,
            "destination_type": "queue",
            "routing_key": pattern,
            "arguments": {},
        }
        for exchange, pattern in spec.bindings
    ]
    return queue, bindings


def service_queues() -> list[QueueSpec]:
    """Queues that services declare with a fixed shape: every ``QUEUES`` tuple a service
    module exposes (modules that are absent or list none contribute nothing)."""
    specs: list[QueueSpec] = []
    from qflare.runtime.bootstrap import SERVICES

    for name in SERVICES:
        try:
            module = importlib.import_module(f"qflare.services.{name}.service")
        except ImportError:
            continue
        specs.extend(getattr(module, "QUEUES", ()))
    return specs


def build_definitions(
    clients: Iterable[BrokerUser],
    services: Iterable[BrokerUser] = (),
    *,
    vhost: str = "qflare",
    prefix: str = "",
    queues: Iterable[QueueSpec] | None = None,
) -> dict[str, Any]:
    """The definitions document. ``services`` users are named ``qflare-<role>`` or pass
    ``BrokerUser("qflare-ingest", ...)``; their role is the part after ``qflare-``."""
    clients = list(clients)
    services = list(services)
    specs = list(service_queues() if queues is None else queues)
    specs += [client_queue(c.name) for c in clients]
    users, perms, topic_perms = [], [], []
    for u in clients:
        users.append(_user(u))
        perms.append(permissions("client", u.name, vhost, prefix))
        topic_perms.append(
            {
                "user": u.name,
                "vhost": vhost,
                "exchange": prefix + topology.CLIENT,
                "write": "^update\\.[^.]+$",
                "read": "^$",
            }
        )
    for u in services:
        role = u.name.removeprefix("qflare-")
        users.append(_user(u))
        perms.append(permissions(role, u.name, vhost, prefix))
    queues_out, bindings_out, seen = [], [], set()
    for spec in specs:
        # a transient queue belongs to the connection that declares it; pre-declared as
        # durable here it would refuse that declaration (PRECONDITION_FAILED)
        if spec.name in seen or spec.transient:
            continue
        seen.add(spec.name)
        q, b = _queue(spec, vhost, prefix)
        queues_out.append(q)
        bindings_out.extend(b)
    p = re.escape(prefix)
    policies = [
        {
            "vhost": vhost,
            "name": "qflare-client-queues",
            "pattern": f"^{p}client\\.",
            "apply-to": "queues",
            "priority": 1,
            "definition": {"max-length": CLIENT_QUEUE_MAX_LENGTH, "overflow": "drop-head"},
        },
        {
            "vhost": vhost,
            "name": "qflare-dead-letters",
            "pattern": f"^{p}alerting\\.dead$",
            "apply-to": "queues",
            "priority": 1,
            "definition": {"max-length": DEAD_QUEUE_MAX_LENGTH, "overflow": "drop-head"},
        },
    ]
    return {
        "vhosts": [{"name": vhost}],
        "users": users,
        "permissions": perms,
        "topic_permissions": topic_perms,
        "exchanges": [
            {
                "name": prefix + e,
                "vhost": vhost,
                "type": "topic",
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for e in topology.EXCHANGES
        ],
        "queues": queues_out,
        "bindings": bindings_out,
        "policies": policies,
    }


def _user(u: BrokerUser) -> dict[str, Any]:
    return {
        "name": u.name,
        "password_hash": rabbit_password_hash(u.password) if u.password else "",
        "hashing_algorithm": "rabbit_password_hashing_sha256",
        "tags": [],
    }


def client_ids_from_kit(kit: Path) -> list[str]:
    """Client ids from a ``qflare provision`` output folder (``clients/<id>/``)."""
    folder = kit / "clients"
    if not folder.is_dir():
        raise ValueError(f"{kit} has no clients/ folder; pass the folder `qflare provision` wrote")
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


PASSWORD_FILE = "broker_password"


def _password_for(folder: Path | None, write: bool) -> str:
    """A participant's broker password, kept beside its keys (0600) so its SDK can read it."""
    if folder is not None and (folder / PASSWORD_FILE).exists():
        return (folder / PASSWORD_FILE).read_text().strip()
    password = secrets.token_urlsafe(24)
    if folder is not None and write:
        fd = os.open(folder / PASSWORD_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
    return password


def definitions_for_kit(kit: Path, *, vhost: str, prefix: str, example: bool) -> dict[str, Any]:
    clients, services = [], []
    for cid in client_ids_from_kit(kit):
        folder = kit / "clients" / cid
        clients.append(BrokerUser(cid, None if example else _password_for(folder, True)))
    for role in SERVICE_WRITES:
        own = kit / "services" / role
        services.append(
            BrokerUser(
                f"qflare-{role}",
                None if example else _password_for(own if own.is_dir() else None, True),
            )
        )
    return build_definitions(clients, services, vhost=vhost, prefix=prefix)


def _cmd(args: argparse.Namespace) -> int:
    from qflare.commands._common import output_file
    from qflare.errors import UsageError

    if args.kit is None and not args.clients:
        raise UsageError("give --kit DIR (a `qflare provision` folder) or --clients ID ...")
    if args.out != "-":
        output_file(args.out)
    try:
        if args.kit is not None:
            doc = definitions_for_kit(
                Path(args.kit), vhost=args.vhost, prefix=args.prefix, example=args.example
            )
        else:
            doc = build_definitions(
                [BrokerUser(c, None) for c in args.clients],
                [BrokerUser(f"qflare-{r}", None) for r in SERVICE_WRITES],
                vhost=args.vhost,
                prefix=args.prefix,
            )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
        print(
            f"wrote {args.out}: {len(doc['users'])} users, {len(doc['queues'])} queues",
            file=sys.stderr,
        )
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "broker-definitions",
        help="write RabbitMQ definitions (exchanges, queues, policies, users, permissions)",
        description="Write a RabbitMQ definitions file for a provisioned federation. With "
        "--kit, a random broker password is created per client and service (kept in "
        f"<kit>/.../{PASSWORD_FILE}, mode 0600) unless one exists.",
    )
    p.add_argument("--kit", help="folder written by `qflare provision`")
    p.add_argument("--clients", nargs="*", default=[], help="client ids (users without passwords)")
    p.add_argument("--example", action="store_true", help="users without passwords (a sample file)")
    p.add_argument("--vhost", default="qflare")
    p.add_argument("--prefix", default="", help="exchange/queue name prefix (QFLARE_PREFIX)")
    p.add_argument("--out", default="-", help="output file (default stdout)")
    p.set_defaults(func=_cmd)


__all__ = [
    "BrokerUser",
    "build_definitions",
    "client_queue",
    "permissions",
    "rabbit_password_hash",
    "register",
]
