"""RabbitMQ set-up as code: ``qflare broker-definitions`` writes a definitions file.

The file (RabbitMQ's JSON definitions format, loaded with ``load_definitions`` or
``rabbitmqctl import_definitions``) declares the vhost, QFLARE's five topic exchanges, every
durable queue a service consumes (:func:`service_queues`: the aggregator's, the detector's and
the accountant's work queues, alerting's two), a policy that bounds the dead-letter drain, and
one broker user per client and per service role, with their permissions. Services under these
users run with ``[qflare] broker_declare = "passive"`` (``QFLARE_BROKER_DECLARE``): they only
check that the exchanges and their durable queues exist, so no role needs configure on an
exchange, which would also let it delete one.

Permissions are the broker half of the trust model (docs/architecture.md, "The data
plane"): signatures already stop a client from forging a model, the broker additionally
limits what each user may touch. RabbitMQ checks three regexes per user and vhost against
resource names: *configure* (declare, delete), *write* (publish to an exchange; bind a queue,
as its destination) and *read* (consume from a queue; bind, as the source exchange); a
passive declaration needs none. A topic permission adds a regex over routing keys that a
user may publish to a topic exchange.

* **A participant** may publish to ``qflare.client`` only with the routing keys
  ``update.<job>`` of its own jobs (topic permission), and read only its jobs' streams
  ``broadcast.<job>`` and ``models.<job>``. It configures nothing: it checks the exchanges
  and streams passively (``declare="passive"``) and reads the streams by name. It cannot
  read ``updates.<job>`` (other clients' updates), bind anything (no write on a queue), or
  publish to the default exchange (which would put bytes straight into a stream).
* **The aggregator** declares, binds, reads and deletes every job's three streams and
  publishes to ``qflare.events`` and ``qflare.broadcast``.
* **Ingest and the detector** read every job's update stream, by name (they cannot declare,
  bind or delete it), and publish to ``qflare.events``.
* **Every service** configures only its own queues (``<role>``, ``<role>.<suffix>``; the
  operator's console queues ``console.<...>``) and binds them to the exchanges it reads. It
  configures no exchange: the file creates the exchanges and the durable queues, and a
  passive service only checks them. The one queue a service still declares is a transient one
  (ingest's ``ingest.rounds.<replica>``, a console's), which no file can hold; RabbitMQ checks
  write on the dead-letter exchange when a queue that dead-letters is declared, so the role
  whose transient queue dead-letters (ingest) keeps write on ``qflare.dead`` and no other
  does (a durable queue's dead-lettering is set by the file and checked at its import).

Job streams are never pre-declared here (the aggregator declares them when a job is
submitted and deletes them when it ends; a file loaded at every broker boot would re-create
them). Service users may touch any job's streams; a participant's permissions name its jobs,
which come from the configuration's ``[[jobs]]`` (``--config``, default ``$QFLARE_CONFIG``:
each job's ``participants``) and from ``--job`` (a job every client listed takes part in).
A client in no job can log in and do nothing else; for a new job, write the file again and
import it (an import adds and updates users and permissions; passwords are kept).

A service role's broker user is ``<prefix>qflare-<role>``
(:func:`qflare.bus.topology.service_user`, with the federation's ``prefix``: broker users are
global, so two federations on one broker keep theirs apart; so is the dead-letter policy's
name, per vhost). With ``--kit`` its password is written to its identity folder, and a
service whose broker URL names no user logs in as that user with that password
(:meth:`qflare.runtime.config.Settings.broker_for`). A participant's broker user is its client
id (:func:`client_user`; the SDK logs in as its kit's id; the federation picks its ids,
``qflare provision --client-prefix``). A client whose certificate is revoked (the kit's ``ca/crl.qrl`` names it) gets no
user in a file written from a kit. An import never deletes a user, though: ``qflare revoke``
with a management URL deletes the revoked client's user and closes its connections
(:mod:`qflare.bus.management`); without one, delete it on the broker
(``rabbitmqctl delete_user <client id>``).

Queue arguments come from the bus's own :func:`qflare.bus.rabbitmq.queue_arguments`, with
the configuration's ``broker_replicas`` (a cluster's replica count): a re-declaration with
other arguments fails with PRECONDITION_FAILED, so the file and the services cannot drift
apart.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import hashlib
import importlib
import json
import os
import re
import secrets
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qflare.bus import QueueSpec, topology
from qflare.bus.port import PASSWORD_FILE


@dataclass(frozen=True)
class Role:
    """What one service role does on the broker; its permissions follow from it."""

    publishes: tuple[str, ...]
    """Exchanges it publishes to (write)."""
    binds_from: tuple[str, ...]
    """Exchanges its queues or streams are bound to (read on the exchange)."""
    declares_streams: tuple[str, ...] = ()
    """Kinds of job stream it declares, binds and deletes (configure and write)."""
    reads_streams: tuple[str, ...] = ()
    """Kinds of job stream it reads (read)."""
    queues: tuple[str, ...] = ()
    """Regexes of its own queues (configure, write, read), prefix excluded; default
    ``<role>`` and ``<role>.<suffix>``."""
    dead_letters: bool = False
    """It declares a transient queue that dead-letters to ``qflare.dead``: write on it, which
    RabbitMQ checks at that declaration (its durable queues the definitions file declares)."""


#: Kinds of job stream, named as in :mod:`qflare.bus.topology` (``<kind>.<job>``).
UPDATES, MODELS, BROADCASTS = "updates", "models", "broadcast"

#: The service roles that get a broker user.
ROLES: dict[str, Role] = {
    # ingest.rounds.<replica>: transient (one per replica), dead-lettering a round event
    # that fails 3 times
    "ingest": Role(
        publishes=(topology.EVENTS,),
        binds_from=(topology.EVENTS,),
        reads_streams=(UPDATES,),
        dead_letters=True,
    ),
    "detector": Role(
        publishes=(topology.EVENTS,), binds_from=(topology.EVENTS,), reads_streams=(UPDATES,)
    ),
    "aggregator": Role(
        publishes=(topology.EVENTS, topology.BROADCAST),
        binds_from=(topology.EVENTS, topology.CLIENT, topology.BROADCAST),
        declares_streams=(UPDATES, MODELS, BROADCASTS),
        reads_streams=(UPDATES, MODELS),
    ),
    "accountant": Role(publishes=(topology.EVENTS,), binds_from=(topology.EVENTS,)),
    "alerting": Role(
        publishes=(topology.EVENTS, topology.ALERTS),
        binds_from=(topology.EVENTS, topology.DEAD),
    ),
    # the operator's console (qflare tui): a transient queue console.<host>.<pid>.<tag>
    # bound to events and alerts, which does not dead-letter
    "operator": Role(
        publishes=(topology.EVENTS,),
        binds_from=(topology.EVENTS, topology.ALERTS),
        queues=(r"console\..+",),
    ),
}

#: A job id (``messages.jobs.check_id``): a routing-key word.
JOB_WORD = r"[A-Za-z0-9_\-]+"
#: Policies (bounded backlogs). Ingest's per-replica round queues and the consoles' queues
#: need none: they are transient (exclusive, auto-delete), so the broker removes them with
#: their connection. Streams carry their own retention (``topology.*_RETENTION_S``).
DEAD_QUEUE_MAX_LENGTH = 100_000
#: No resource: RabbitMQ checks the default exchange under the name ``amq.default``.
NOTHING = "^$"


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


def _any_of(parts: Iterable[str]) -> str:
    parts = [p for p in parts if p]
    return f"^({'|'.join(parts)})$" if parts else NOTHING


def _streams(prefix: str, kinds: Iterable[str], jobs: str) -> str:
    kinds = list(kinds)
    if not kinds:
        return ""
    return f"{re.escape(prefix)}({'|'.join(re.escape(k) for k in kinds)})\\.{jobs}"


def client_permissions(
    user: str, jobs: Iterable[str], vhost: str, prefix: str = ""
) -> tuple[dict[str, str], dict[str, str]]:
    """The permissions and the ``qflare.client`` topic permission of participant ``user``
    taking part in ``jobs``."""
    jobs = sorted(set(jobs))
    names = _alt(jobs)
    perms = {
        "user": user,
        "vhost": vhost,
        "configure": NOTHING,
        "write": f"^{re.escape(prefix + topology.CLIENT)}$" if jobs else NOTHING,
        "read": f"^{_streams(prefix, (BROADCASTS, MODELS), f'({names})')}$" if jobs else NOTHING,
    }
    topic = {
        "user": user,
        "vhost": vhost,
        "exchange": prefix + topology.CLIENT,
        "write": f"^update\\.({names})$" if jobs else NOTHING,
        "read": NOTHING,
    }
    return perms, topic


def permissions(
    role: str, user: str, vhost: str, prefix: str = "", jobs: Iterable[str] = ()
) -> dict[str, str]:
    """Configure/write/read regexes for a service role or, with ``role == "client"``, for the
    client whose id is ``user`` taking part in ``jobs``."""
    if role == "client":
        return client_permissions(user, jobs, vhost, prefix)[0]
    spec = ROLES.get(role)
    if spec is None:
        raise ValueError(
            f"no broker permissions for role {role!r}; known: client, {', '.join(ROLES)}"
        )
    p = re.escape(prefix)
    own = "|".join(f"{p}{q}" for q in (spec.queues or (f"{re.escape(role)}(\\..*)?",)))
    declared = _streams(prefix, spec.declares_streams, JOB_WORD)
    read = _streams(prefix, spec.reads_streams, JOB_WORD)
    writes = (*spec.publishes, *((topology.DEAD,) if spec.dead_letters else ()))
    return {
        "user": user,
        "vhost": vhost,
        # no exchange: services run passive (broker_declare), the file creates them
        "configure": _any_of((own, declared)),
        "write": _any_of((_alt(prefix + e for e in writes), own, declared)),
        "read": _any_of((_alt(prefix + e for e in spec.binds_from), own, read)),
    }


def _queue_arguments(spec: QueueSpec, prefix: str, replicas: int | None) -> dict[str, Any]:
    from qflare.bus.rabbitmq import queue_arguments  # loads aio_pika: only when needed

    return queue_arguments(spec, prefix, replicas)


def _queue(
    spec: QueueSpec, vhost: str, prefix: str, replicas: int | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    queue = {
        "name": prefix + spec.name,
        "vhost": vhost,
        "durable": True,
        "auto_delete": False,
        "arguments": _queue_arguments(spec, prefix, replicas),
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
    """The durable queues the services consume, as their own :meth:`consumers` say: each
    service is built (not started, no identity) on an in-memory bus and asked. A passive
    service only checks that these exist, so the file must hold every one; asking the
    services themselves keeps it from missing one. Transient queues are left out (they
    belong to the connection that declares them)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # asyncio.run, also from a loop
        return pool.submit(asyncio.run, _consumed_queues()).result()


async def _consumed_queues() -> list[QueueSpec]:
    from qflare.bus import connect_bus
    from qflare.runtime.bootstrap import SERVICES, service_module
    from qflare.runtime.config import Settings
    from qflare.runtime.service import ServiceContext

    specs: list[QueueSpec] = []
    bus = await connect_bus("memory://")
    try:
        for name in SERVICES:
            module = importlib.import_module(service_module(name))
            service = module.build(ServiceContext(name=name, settings=Settings(), bus=bus))
            specs.extend(c.spec for c in service.consumers() if not c.spec.transient)
    finally:
        await bus.close()
    return specs


def build_definitions(
    clients: Iterable[BrokerUser],
    services: Iterable[BrokerUser] = (),
    *,
    vhost: str = "qflare",
    prefix: str = "",
    jobs: Mapping[str, Iterable[str]] | None = None,
    queues: Iterable[QueueSpec] | None = None,
    replicas: int | None = None,
) -> dict[str, Any]:
    """The definitions document. ``jobs`` maps each client id to the jobs it takes part in
    (a client not in it gets no job). ``services`` users are named
    :func:`~qflare.bus.topology.service_user` (``<prefix>qflare-<role>``, e.g.
    ``BrokerUser("qflare-ingest", ...)`` without a prefix); their role is the part after
    ``qflare-``.
    ``replicas``: the services' ``broker_replicas``, part of each queue's arguments."""
    clients = list(clients)
    services = list(services)
    jobs = jobs or {}
    specs = list(service_queues() if queues is None else queues)
    users, perms, topic_perms = [], [], []
    for u in clients:
        users.append(_user(u))
        perm, topic = client_permissions(u.name, jobs.get(u.name, ()), vhost, prefix)
        perms.append(perm)
        topic_perms.append(topic)
    for u in services:
        role = u.name.removeprefix(prefix).removeprefix("qflare-")
        users.append(_user(u))
        perms.append(permissions(role, u.name, vhost, prefix))
    queues_out, bindings_out, seen = [], [], set()
    for spec in specs:
        # a transient queue belongs to the connection that declares it; pre-declared as
        # durable here it would refuse that declaration (PRECONDITION_FAILED)
        if spec.name in seen or spec.transient:
            continue
        seen.add(spec.name)
        q, b = _queue(spec, vhost, prefix, replicas)
        queues_out.append(q)
        bindings_out.extend(b)
    policies = [
        {
            "vhost": vhost,
            # named per federation, as its users: one vhost may hold several
            "name": f"{prefix}qflare-dead-letters",
            "pattern": f"^{re.escape(prefix)}alerting\\.dead$",
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


def jobs_by_client(
    clients: Iterable[str], config_jobs: Iterable[Any] = (), every: Iterable[str] = ()
) -> dict[str, set[str]]:
    """Each client's jobs: those of the configuration's ``[[jobs]]`` that list it among
    their ``participants``, and every job in ``every``."""
    from qflare.messages.jobs import check_id

    every = {check_id(j, "--job") for j in every}
    out = {c: set(every) for c in clients}
    for spec in config_jobs:
        for client in spec.participants:
            if client in out:
                out[client].add(spec.job_id)
    return out


def client_user(client_id: str) -> str:
    """The broker user of participant ``client_id``: its id."""
    return client_id


def client_ids_from_kit(kit: Path) -> list[str]:
    """Client ids from a ``qflare provision`` output folder (``clients/<id>/``), without
    those the CA's revocation list (``ca/crl.qrl``) names."""
    folder = kit / "clients"
    if not folder.is_dir():
        raise ValueError(f"{kit} has no clients/ folder; pass the folder `qflare provision` wrote")
    revoked: frozenset[str] = frozenset()
    crl = kit / "ca" / "crl.qrl"
    if crl.is_file():
        from qflare.crypto.pki import RevocationList

        revoked = RevocationList.from_bytes(crl.read_bytes()).holders
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in revoked)


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


def definitions_for_kit(
    kit: Path,
    *,
    vhost: str,
    prefix: str,
    example: bool,
    jobs: Mapping[str, Iterable[str]] | None = None,
    replicas: int | None = None,
) -> dict[str, Any]:
    clients, services = [], []
    for cid in client_ids_from_kit(kit):
        folder = kit / "clients" / cid
        clients.append(
            BrokerUser(client_user(cid), None if example else _password_for(folder, True))
        )
    for role in ROLES:
        own = kit / "services" / role
        services.append(
            BrokerUser(
                topology.service_user(role, prefix),
                None if example else _password_for(own if own.is_dir() else None, True),
            )
        )
    return build_definitions(
        clients, services, vhost=vhost, prefix=prefix, jobs=jobs, replicas=replicas
    )


def _cmd(args: argparse.Namespace) -> int:
    from qflare.commands._common import output_file
    from qflare.errors import UsageError
    from qflare.runtime import load_settings

    if args.kit is None and not args.clients:
        raise UsageError("give --kit DIR (a `qflare provision` folder) or --clients ID ...")
    if args.out != "-":
        output_file(args.out)
    settings = load_settings(args.config)  # [[jobs]] and prefix; a ConfigError exits 2
    prefix = settings.prefix if args.prefix is None else args.prefix
    try:
        ids = client_ids_from_kit(Path(args.kit)) if args.kit is not None else list(args.clients)
        jobs = jobs_by_client(ids, settings.jobs, args.job)
        if args.kit is not None:
            doc = definitions_for_kit(
                Path(args.kit),
                vhost=args.vhost,
                prefix=prefix,
                example=args.example,
                jobs=jobs,
                replicas=settings.broker_replicas,
            )
        else:
            doc = build_definitions(
                [BrokerUser(client_user(c), None) for c in args.clients],
                [BrokerUser(topology.service_user(r, prefix), None) for r in ROLES],
                vhost=args.vhost,
                prefix=prefix,
                jobs=jobs,
                replicas=settings.broker_replicas,
            )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
    named = sorted(set().union(*jobs.values())) if jobs else []
    print(
        f"{'wrote ' + args.out if args.out != '-' else 'definitions'}: {len(doc['users'])} "
        f"users, {len(doc['queues'])} queues, jobs: {', '.join(named) or 'none'}"
        + (
            ""
            if named
            else " (participants can log in but read and write nothing; "
            "give --config with [[jobs]] or --job)"
        ),
        file=sys.stderr,
    )
    return 0


def register(subparsers: Any) -> None:
    from qflare.commands._common import DefaultsHelpFormatter, add_config_option

    p = subparsers.add_parser(
        "broker-definitions",
        help="write RabbitMQ definitions (exchanges, queues, policies, users, permissions)",
        formatter_class=DefaultsHelpFormatter,
        description="Write a RabbitMQ definitions file for a provisioned federation. With "
        "--kit, a random broker password is created per client and service (kept in "
        f"<kit>/.../{PASSWORD_FILE}, mode 0600) unless one exists. A participant may read "
        "the streams of its jobs and publish its updates to them, nothing else: its jobs "
        "come from the configuration's [[jobs]] (their participants) and from --job. Write "
        "the file again and import it when a job is added.",
    )
    p.add_argument("--kit", help="folder written by `qflare provision`")
    p.add_argument("--clients", nargs="*", default=[], help="client ids (users without passwords)")
    p.add_argument("--example", action="store_true", help="users without passwords (a sample file)")
    add_config_option(p, read_for=" whose [[jobs]] name the participants")
    p.add_argument(
        "--job",
        action="append",
        default=[],
        metavar="JOB",
        help="a job every client takes part in (repeat for more)",
    )
    p.add_argument("--vhost", default="qflare")
    p.add_argument(
        "--prefix",
        help="exchange/queue name prefix (default: the configuration's, $QFLARE_PREFIX, none)",
    )
    p.add_argument("--out", default="-", help="output file (default stdout)")
    p.set_defaults(func=_cmd)


__all__ = [
    "ROLES",
    "BrokerUser",
    "Role",
    "build_definitions",
    "client_permissions",
    "client_user",
    "jobs_by_client",
    "permissions",
    "rabbit_password_hash",
    "register",
]
