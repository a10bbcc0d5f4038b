"""Service configuration as typed models: one TOML file, ``QFLARE_*`` variables, flags.

Flags win over the environment, the environment over the file, the file over the defaults.
The file (``--config`` or ``QFLARE_CONFIG``) looks like::

    [qflare]
    broker = "amqp://guest:guest@127.0.0.1:5672/"   # QFLARE_BROKER; default memory://; a
                                                     # cluster: its nodes' URLs, comma-separated
    broker_replicas = 3                              # QFLARE_BROKER_REPLICAS: replicas of each
                                                     # queue/stream; unset: the broker's default
    broker_declare = "passive"                       # QFLARE_BROKER_DECLARE: full (default) creates
                                                     # exchanges and queues; passive only checks
                                                     # them (the definitions file made them)
    prefix = ""                                      # QFLARE_PREFIX: exchange/queue prefix
    data_dir = "./qflare-data"                       # QFLARE_DATA_DIR: one sub-folder per service
    pki_dir = "./pki"                                # QFLARE_PKI_DIR: output of `qflare provision`
    log_level = "INFO"                               # QFLARE_LOG_LEVEL
    log_format = "json"                              # QFLARE_LOG_FORMAT: json | text
    metrics_host = "127.0.0.1"                       # QFLARE_METRICS_HOST: /metrics, /healthz, /readyz
    metrics_port = 0                                 # QFLARE_METRICS_PORT: 0 = any free port
    management_url = "http://admin:pw@127.0.0.1:15672/"  # QFLARE_MANAGEMENT_URL: RabbitMQ's
                                                     # management API, for `qflare revoke`

    [services.aggregator]                            # one table per service: see *Options below
    reopen_interval_s = 3.0

    [[jobs]]                                         # qflare.messages.jobs.JobSpec
    job_id = "j1"
    ...

Every table is a pydantic model with ``extra="forbid"`` and everything is checked at load:
types and ranges, each job's rule spec (by the robust core's own parser,
:func:`qflare.robust.get_rule`), the job's model file, the data and PKI folders. A mistake is
one :class:`~qflare.errors.ConfigError` naming the table and key, the value and what is
allowed, e.g. ``[services.ingest] max_update_nrom: unknown option; allowed: crl_path, ...``.
Relative paths in the file are taken relative to the file's folder.

Secrets (key passphrase) come only from the environment (``QFLARE_PASSPHRASE``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from qflare.bus.port import PASSWORD_FILE, broker_addresses, with_login
from qflare.errors import ConfigError
from qflare.messages.jobs import JobSpec
from qflare.messages.parts import (
    DEFAULT_MODEL_PART_BYTES,
    PART_THRESHOLD_BYTES,
    max_model_part_bytes,
)

log = logging.getLogger("qflare.config")

DEFAULT_BROKER = "memory://"
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: ``QFLARE_*`` variable -> ``[qflare]`` key.
ENV: dict[str, str] = {
    "QFLARE_BROKER": "broker",
    "QFLARE_BROKER_REPLICAS": "broker_replicas",
    "QFLARE_BROKER_DECLARE": "broker_declare",
    "QFLARE_PREFIX": "prefix",
    "QFLARE_DATA_DIR": "data_dir",
    "QFLARE_PKI_DIR": "pki_dir",
    "QFLARE_LOG_LEVEL": "log_level",
    "QFLARE_LOG_FORMAT": "log_format",
    "QFLARE_METRICS_HOST": "metrics_host",
    "QFLARE_METRICS_PORT": "metrics_port",
    "QFLARE_CONNECT_TIMEOUT_S": "connect_timeout_s",
    "QFLARE_START_TIMEOUT_S": "start_timeout_s",
    "QFLARE_MANAGEMENT_URL": "management_url",
}

_WORD = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class _Table(BaseModel):
    """A configuration table: unknown keys are errors, values are not coerced across types
    (``burst = true`` is not 1), and the result is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# -- [services.<name>] ---------------------------------------------------------------------
def _rows_in_memory(done: str) -> Any:
    """The aggregator's and the detector's memory budget for a round's matrix
    (qflare.runtime.spill)."""
    return Field(
        default=1024,
        ge=0,
        description=f"a round's matrix (updates x model values, float32) larger than this is "
        f"kept in a file under the data folder and {done} block by block",
    )


class AggregatorOptions(_Table):
    """``[services.aggregator]`` (services/aggregator/service.py)."""

    tick_s: float = Field(
        default=0.2, gt=0, description="how often deadlines and reopenings are checked"
    )
    reopen_interval_s: float = Field(
        default=3.0, gt=0, description="re-announce an open round this often"
    )
    stream_linger_s: float = Field(
        default=60.0,
        ge=0,
        description="after a job ends, keep its model and broadcast streams this long",
    )
    crl_path: Path | None = Field(
        default=None,
        strict=False,
        description="revocation list, re-read when it changes: the clients it names are not "
        "selected or waited for (default <pki_dir>/services/aggregator/crl.qrl)",
    )
    rows_in_memory_mb: int = _rows_in_memory("aggregated")
    model_part_threshold_bytes: int = Field(
        default=PART_THRESHOLD_BYTES,
        gt=0,
        description="a model version whose tensors take more bytes than this is written into "
        "the model stream as a manifest and parts (qflare.messages.models)",
    )
    model_part_bytes: int = Field(
        default=DEFAULT_MODEL_PART_BYTES,
        gt=0,
        le=max_model_part_bytes(),
        description="bytes per model part",
    )


class DetectorOptions(_Table):
    """``[services.detector]``: the reputation of :class:`qflare.robust.reputation.Reputation`
    (same defaults), how often pending verdicts are republished, and the memory a round's
    matrix may take."""

    decay: float = Field(default=0.8, ge=0, le=1, description="per-round decay of a score")
    penalty: float = Field(default=1.0, gt=0, description="score added per flagged round")
    threshold: float = Field(default=2.5, gt=0, description="score that quarantines a client")
    quarantine_rounds: int = Field(default=5, ge=1, description="rounds a quarantine lasts")
    republish_s: float = Field(default=2.0, gt=0, description="republish pending verdicts")
    rows_in_memory_mb: int = _rows_in_memory("judged")


class IngestOptions(_Table):
    """``[services.ingest]``, read by services/ingest/service.py as it is (the replica name,
    share and revocation list are resolved there, at start)."""

    replica: str | None = Field(
        default=None,
        description="routing-key word naming this replica's round queue "
        "(default $QFLARE_REPLICA or <host>-<pid>)",
    )
    max_update_norm: float | None = Field(
        default=None, ge=0, description="L2 bound on an update; 0 or unset: finiteness only"
    )
    round_news_wait_s: float = Field(
        default=5.0, ge=0, description="how long an update waits for news of its round"
    )
    dedup_capacity: int = Field(default=100_000, ge=1, description="updates remembered")
    report_burst: float = Field(
        default=8.0, ge=1, description="rejections reported one by one per sender, at once"
    )
    report_per_s: float = Field(
        default=2.0, ge=0, description="... and then per second; the rest are shed and counted"
    )
    shed_report_s: float = Field(
        default=5.0, gt=0, description="how often the shed rejections are summarised (an alert)"
    )
    share: str = Field(
        default="0/1",
        pattern=r"^[0-9]+/[1-9][0-9]*$",
        description="i/N: this replica checks the update-stream offsets o with o % N == i "
        "($QFLARE_INGEST_SHARE; qflare up sets it per replica)",
    )
    crl_path: Path | None = Field(
        default=None,
        strict=False,
        description="revocation list (default <pki_dir>/services/ingest/crl.qrl)",
    )
    part_ttl_s: float = Field(
        default=600.0,
        gt=0,
        description="an update sent in parts whose parts stop coming this long is refused",
    )

    @field_validator("replica")
    @classmethod
    def _replica(cls, v: str | None) -> str | None:
        if v is not None and not _WORD.match(v):
            raise ValueError("must be 1-64 letters, digits, '_' or '-' (a routing-key word)")
        return v

    @property
    def norm_bound(self) -> float | None:
        """The L2 bound ingest applies: ``max_update_norm``; None (finiteness only) for 0."""
        return self.max_update_norm or None


class AccountantOptions(_Table):
    """``[services.accountant]``: no options yet (the privacy policy is per job)."""


class AlertingOptions(_Table):
    """``[services.alerting]``: :class:`qflare.services.alerting.core.AlertPolicy`'s
    tunables (same defaults)."""

    dedup_window_s: float = Field(default=60.0, ge=0, description="one alert per key per window")
    burst: int = Field(default=20, ge=1, description="token-bucket size per key")
    rate_per_s: float = Field(default=1.0, ge=0, description="token-bucket refill per key")
    escalate_after: int = Field(default=3, ge=1, description="rounds in a row that escalate")
    max_keys: int = Field(default=10_000, ge=1, description="keys remembered")

    @field_validator("dedup_window_s", "rate_per_s")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


class ServicesConfig(_Table):
    """The ``[services.<name>]`` tables, one model each."""

    aggregator: AggregatorOptions = Field(default_factory=AggregatorOptions)
    detector: DetectorOptions = Field(default_factory=DetectorOptions)
    ingest: IngestOptions = Field(default_factory=IngestOptions)
    accountant: AccountantOptions = Field(default_factory=AccountantOptions)
    alerting: AlertingOptions = Field(default_factory=AlertingOptions)


SERVICE_OPTIONS: dict[str, type[_Table]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in ServicesConfig.model_fields.items()
}


# -- [[jobs]] --------------------------------------------------------------------------------
def check_rule_spec(spec: str, f: int = 0) -> None:
    """Raise ``ValueError`` naming what is wrong with a rule spec, as the aggregator would
    build it (``get_rule(spec, f=f)`` when a part takes ``f``)."""
    from qflare.robust import get_rule

    try:
        get_rule(spec)
        try:
            get_rule(spec, f=f)
        except TypeError as exc:
            if "takes parameter 'f'" not in str(exc):
                raise
    except (ValueError, TypeError) as exc:
        unknown = _unknown_rule_name(spec)
        raise ValueError(unknown or str(exc)) from None


def _unknown_rule_name(spec: str) -> str | None:
    # get_rule checks the parts in order and by position, so "median+nosuch" is reported
    # as a misplaced 'median'; a name that is neither a rule nor a pre-aggregator is the
    # mistake to name first.
    from qflare.robust import list_rules
    from qflare.robust.spec import ALIASES

    known = list_rules()
    names = {*known["rules"], *known["pre"], *ALIASES}
    for part in spec.split("+"):
        name = part.split("(", 1)[0].strip().lower()
        if ":" in name:
            continue  # a plug-in (module:name): get_rule's own error says what is wrong
        if name and name not in names:
            what = (
                f"unknown rule {name!r}"
                if "+" not in spec
                else f"unknown name {name!r} in {spec!r}"
            )
            return (
                f"{what}; rules (the last part): "
                f"{', '.join(known['rules'])}; pre-aggregators (before it): "
                f"{', '.join(known['pre'])}"
            )
    return None


def _check_job(spec: JobSpec, info: ValidationInfo) -> JobSpec:
    try:
        check_rule_spec(spec.rule, spec.f)
    except ValueError as exc:
        raise ValueError(f"rule = {spec.rule!r}: {exc}") from None
    if spec.initial_model is None:
        if info.context and info.context.get("from_file"):
            raise ValueError(
                "initial_model: missing; give the safetensors file of the job's round-0 model"
            )
    elif not Path(spec.initial_model).is_file():
        raise ValueError(
            f"initial_model = '{spec.initial_model}': no such file (the safetensors file of "
            "the job's round-0 model; a relative path is taken from the config file's folder)"
        )
    return spec


Job = Annotated[JobSpec, AfterValidator(_check_job)]


# -- [qflare] ----------------------------------------------------------------------------------
class QflareConfig(BaseModel):
    """``[qflare]``: what every service of one deployment shares. Values may also come from
    ``QFLARE_*`` variables and flags (strings), so they are converted where that is safe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker: str = Field(
        default=DEFAULT_BROKER,
        description="memory://, amqp:// or amqps:// URL; a RabbitMQ cluster: its nodes' URLs, "
        "comma-separated (or a list in the file), failed over in turn",
    )
    broker_replicas: int | None = Field(
        default=None,
        ge=1,
        le=9,
        description="replicas of each quorum queue and stream on a RabbitMQ cluster "
        "(unset: the broker's default, every node on RabbitMQ 3.x; one node needs none); "
        "the same for every service of the deployment",
    )
    broker_declare: Literal["full", "passive"] = Field(
        default="full",
        description="full: each service declares the exchanges and its queues when it "
        "connects (needs configure on them); passive: it only checks that they exist, as a "
        "service role's user from `qflare broker-definitions` must (the definitions file "
        "creates them; transient queues and job streams are still declared)",
    )
    prefix: str = Field(default="", description="exchange/queue name prefix")
    data_dir: Path = Field(default=Path("qflare-data"), description="one sub-folder per service")
    pki_dir: Path | None = Field(default=None, description="folder `qflare provision` wrote")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    metrics_host: str = Field(
        default="127.0.0.1", description="address of /metrics, /healthz and /readyz"
    )
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="port of /metrics, /healthz and /readyz; 0: any free port. `qflare up` "
        "gives its children this port and the next ones in start order",
    )
    connect_timeout_s: float = Field(
        default=30.0, gt=0, description="how long to wait for the broker at start-up"
    )
    start_timeout_s: float = Field(
        default=120.0, gt=0, description="how long `qflare up` waits for a service to be ready"
    )
    management_url: str | None = Field(
        default=None,
        description="RabbitMQ's management API, http(s)://<admin>:<password>@<host>:15672/: "
        "`qflare revoke` deletes the revoked clients' broker users and closes their "
        "connections there (unset: the broker is not told)",
    )

    @field_validator("broker", mode="before")
    @classmethod
    def _broker_list(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)) and v and all(isinstance(a, str) for a in v):
            return ",".join(v)
        return v

    @field_validator("broker")
    @classmethod
    def _broker(cls, v: str) -> str:
        if v.split("://")[0] not in ("memory", "amqp", "amqps") or "://" not in v:
            raise ValueError("must be a memory://, amqp:// or amqps:// URL")
        broker_addresses(v)  # several: each an amqp:// or amqps:// URL (ValueError says which)
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("data_dir")
    @classmethod
    def _data_dir(cls, v: Path) -> Path:
        if v.exists() and not v.is_dir():
            raise ValueError("is a file; give a folder (one sub-folder per service)")
        return v

    @field_validator("pki_dir")
    @classmethod
    def _pki_dir(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError(f"no such folder; run `qflare provision --out {v}` or fix the path")
        return v

    @field_validator("management_url")
    @classmethod
    def _management_url(cls, v: str | None) -> str | None:
        if v:
            from qflare.bus.management import Management

            Management.from_url(v)  # ValueError naming what is wrong, password redacted
        return v or None


#: (service, broker URL) pairs already warned about in this process: once is enough.
_WARNED_WITHOUT_LOGIN: set[tuple[str, str]] = set()


def _warn_without_login(service: str, broker: str, password_file: Path | None) -> None:
    """Warn, once per service and URL, that ``service`` connects with no login of its own
    when an address of ``broker`` names no user and there is no password file for it."""
    # only the addresses without a user are named: another one's password stays out
    bare = [a for a in broker_addresses(broker) if not urlsplit(a).username]
    if not bare or (service, broker) in _WARNED_WITHOUT_LOGIN:
        return
    _WARNED_WITHOUT_LOGIN.add((service, broker))
    missing = "no pki_dir" if password_file is None else f"no {password_file}"
    log.warning(
        "service %r connects to the broker without credentials: %s names no user and there "
        "is %s, so the client logs in as its default (guest, which RabbitMQ admits only from "
        "localhost). Give it a login: credentials in the URL (amqp://user:password@host/vhost) "
        "or the password file `qflare broker-definitions --kit` writes beside its keys",
        service,
        ", ".join(bare),
        missing,
    )


FILE_KEYS: tuple[str, ...] = tuple(QflareConfig.model_fields)


class Settings(QflareConfig):
    """Validated settings shared by every service of one deployment: ``[qflare]`` plus
    the services' tables, the jobs, the passphrase (environment only) and the file."""

    passphrase: str | None = Field(default=None, repr=False)
    jobs: tuple[Job, ...] = ()
    services: ServicesConfig = Field(default_factory=ServicesConfig)
    source: Path | None = None

    @field_validator("services", mode="before")
    @classmethod
    def _services(cls, v: Any) -> Any:
        if isinstance(v, Mapping) and not isinstance(v, dict):
            v = dict(v)
        if isinstance(v, dict):
            return {k: dict(o) if isinstance(o, Mapping) else o for k, o in v.items()}
        return v

    @model_validator(mode="after")
    def _unique_jobs(self) -> Settings:
        ids = [j.job_id for j in self.jobs]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"[[jobs]] job_id {dup[0]!r} appears {ids.count(dup[0])} times")
        return self

    @property
    def embedded(self) -> bool:
        return self.broker.startswith("memory")

    def service_dir(self, service: str) -> Path:
        """The folder a service keeps its SQLite file and blobs in (created on demand)."""
        path = self.data_dir / service
        path.mkdir(parents=True, exist_ok=True)
        return path

    def identity_dir(self, service: str) -> Path:
        """The folder ``qflare provision`` wrote the service's keys and trust store in,
        ``<pki_dir>/services/<service>/``; a :class:`ConfigError` when there is none."""
        if self.pki_dir is None:
            raise ConfigError(
                f"service {service!r} needs its keys: set pki_dir in [qflare], QFLARE_PKI_DIR "
                "or --pki-dir to the folder `qflare provision` wrote"
            )
        folder = Path(self.pki_dir) / "services" / service
        if not folder.is_dir():
            raise ConfigError(
                f"no identity for service {service!r} at {folder}: pki_dir must be the folder "
                "`qflare provision` wrote"
            )
        return folder

    def broker_for(self, service: str) -> str:
        """The broker URL ``service`` connects with: ``broker`` with the service's own login
        filled in when the URL names no user, namely its role's user
        (:func:`qflare.bus.topology.service_user`, ``<prefix>qflare-<service>``) and the
        password ``qflare broker-definitions --kit`` wrote beside its keys
        (``<pki_dir>/services/<service>/broker_password``). Unchanged when the URL names a
        user, when there is no such file, and for ``memory://``, so one URL without
        credentials (``qflare up --broker amqp://host/vhost``) gives each service its own
        user, as a kit does for a participant (:func:`qflare.bus.with_login`). A URL left
        without a user logs in as the client library's default (``guest``, which RabbitMQ
        admits only from localhost): fine for development, so it is only warned about, once
        per service and URL in a process."""
        from qflare.bus import topology

        if self.embedded:
            return self.broker
        file = None
        if self.pki_dir is not None:
            file = Path(self.pki_dir) / "services" / service / PASSWORD_FILE
        if file is None or not file.is_file():
            _warn_without_login(service, self.broker, file)
            return self.broker
        password = file.read_text().strip()
        return with_login(self.broker, topology.service_user(service, self.prefix), password)

    def crl_path(self, service: str) -> Path | None:
        """The revocation list ``service`` watches: its table's ``crl_path``, else its copy
        in its identity folder, ``<pki_dir>/services/<service>/crl.qrl``, which ``qflare
        revoke`` rewrites (None: no pki_dir and none configured)."""
        configured: Path | None = getattr(self.service_options(service), "crl_path", None)
        if configured is not None:
            return configured
        return (
            None if self.pki_dir is None else Path(self.pki_dir) / "services" / service / "crl.qrl"
        )

    def service_options(self, service: str) -> BaseModel:
        """The typed ``[services.<service>]`` table (defaults filled in)."""
        if service not in SERVICE_OPTIONS:
            raise KeyError(f"no service {service!r}; known: {', '.join(SERVICE_OPTIONS)}")
        options: BaseModel = getattr(self.services, service)
        return options

    def options(self, service: str) -> Mapping[str, Any]:
        """The validated options the file set for ``service`` (unset ones are absent, so
        a service's own defaults apply); prefer :meth:`service_options`."""
        if service not in SERVICE_OPTIONS:
            return MappingProxyType({})
        return MappingProxyType(self.service_options(service).model_dump(exclude_unset=True))

    def job(self, job_id: str) -> JobSpec:
        for job in self.jobs:
            if job.job_id == job_id:
                return job
        raise KeyError(f"no job {job_id!r} in the configuration ({[j.job_id for j in self.jobs]})")

    def with_jobs(self, *jobs: JobSpec) -> Settings:
        data = {k: getattr(self, k) for k in type(self).model_fields}
        data["jobs"] = (*self.jobs, *jobs)
        return type(self).model_validate(data)

    def safe_dict(self) -> dict[str, Any]:
        """For logs: no passphrase, no job seeds, no broker password."""
        return {
            "broker": redact_url(self.broker),
            "prefix": self.prefix,
            "data_dir": str(self.data_dir),
            "pki_dir": str(self.pki_dir) if self.pki_dir else None,
            "jobs": [j.job_id for j in self.jobs],
        }


def redact_url(url: str) -> str:
    """``amqp://user:secret@host/`` -> ``amqp://user:***@host/`` (each URL of a list)."""
    with contextlib.suppress(ValueError):
        addresses = broker_addresses(url)
        if len(addresses) > 1:
            return ",".join(redact_url(a) for a in addresses)
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    userinfo, host = rest.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in userinfo else f"{scheme}://{user}@{host}"


# -- loading -----------------------------------------------------------------------------------
def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Read the file (``path`` or ``$QFLARE_CONFIG``, optional), apply ``QFLARE_*`` from
    ``env`` (default ``os.environ``), then keyword ``overrides`` (command-line flags; None
    means not given). Raises :class:`ConfigError` with one line naming the mistake."""
    env = os.environ if env is None else env
    unknown = set(overrides) - set(FILE_KEYS)
    if unknown:
        raise TypeError(f"load_settings takes no override {sorted(unknown)}; known: {FILE_KEYS}")
    origin = "" if path else " (from QFLARE_CONFIG)"
    path = path or env.get("QFLARE_CONFIG") or None
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    source = None
    if path is not None:
        source = Path(path)
        data = _read_file(source, origin)
    for var, key in ENV.items():
        if env.get(var):
            data[key] = env[var]
            origins[key] = var
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
            origins[key] = "--" + key.replace("_", "-")
    data["passphrase"] = env.get("QFLARE_PASSPHRASE") or None
    data["source"] = source
    try:
        return Settings.model_validate(data, context={"from_file": True})
    except ValidationError as exc:
        where = f"config file {source}: " if source is not None else ""
        raise ConfigError(where + explain(exc, data, origins)) from None


def _read_file(source: Path, origin: str) -> dict[str, Any]:
    """The file's tables, flattened for :class:`Settings`, relative paths resolved."""
    try:
        with source.open("rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {source}{origin} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {source}{origin} is a folder, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"config file {source}{origin} cannot be read: {exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {source} is not valid TOML: {exc}") from None
    tables = ("qflare", "services", "jobs")
    for key in doc:
        if key not in tables:
            raise ConfigError(
                f"config file {source}: [{key}]: unknown top-level table; allowed: [qflare], "
                "[services.<name>], [[jobs]]"
            )
    top = doc.get("qflare", {})
    if not isinstance(top, dict):
        raise ConfigError(f"config file {source}: qflare = {top!r}: must be a table ([qflare])")
    for key in top:
        if key not in FILE_KEYS:
            raise ConfigError(
                f"config file {source}: [qflare] {key}: unknown option; allowed: "
                f"{', '.join(FILE_KEYS)}"
            )
    base = source.parent
    data: dict[str, Any] = dict(top)
    for key in ("data_dir", "pki_dir"):
        data[key] = _relative_to(base, data.get(key))
        if data[key] is None:
            del data[key]
    services = doc.get("services", {})
    for name in ("ingest", "aggregator"):
        if isinstance(services, dict) and isinstance(services.get(name), dict):
            table = dict(services[name])
            if "crl_path" in table:
                table["crl_path"] = _relative_to(base, table["crl_path"])
            services = {**services, name: table}
    jobs = doc.get("jobs", [])
    if isinstance(jobs, list):
        jobs = [
            {**j, "initial_model": _relative_to(base, j["initial_model"])}
            if isinstance(j, dict) and "initial_model" in j
            else j
            for j in jobs
        ]
    data["services"] = services
    data["jobs"] = jobs
    return data


def _relative_to(base: Path, value: Any) -> Any:
    if isinstance(value, str) and value and not Path(value).is_absolute():
        return str(base / value)
    return value


def explain(exc: ValidationError, data: Mapping[str, Any], origins: Mapping[str, str]) -> str:
    """One line for the first error of ``exc``: where (table and key), the value, what is
    allowed; ``(and N more)`` when there are others."""
    errors = exc.errors()
    err = errors[0]
    loc = tuple(err["loc"])
    where, allowed = _where(loc, data)
    kind = err["type"]
    if kind == "extra_forbidden":
        what = "unknown service" if loc[:1] == ("services",) and len(loc) == 2 else "unknown option"
        line = f"{where}: {what}; allowed: {', '.join(allowed) or '(none)'}"
    else:
        message = err["msg"].removeprefix("Value error, ")
        message = message.replace("Input should be", "must be")
        if kind in ("model_type", "dict_type", "model_attributes_type"):
            message = "must be a table"
        value = err.get("input")
        shown = ""
        if loc and isinstance(loc[-1], str) and kind != "missing" and _scalar(value):
            # a URL's password never reaches the message
            shown = f" = {redact_url(value) if isinstance(value, str) else value!r}"
        sep = ": "
        if len(loc) == 2 and loc[0] == "jobs" and message.split(" ", 1)[0].rstrip(":") in allowed:
            sep = " "  # a check of the whole job that names its key ("rule = ...: ...")
        line = f"{where}{shown}{sep}{message}" if loc else message
        if loc and loc[0] in origins and len(loc) == 1:
            line += f" (from {origins[str(loc[0])]})"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more)"
    return line


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, Path)) or (
        isinstance(value, (list, tuple)) and len(value) <= 8
    )


def _where(loc: tuple[Any, ...], data: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The TOML spelling of ``loc`` and the keys allowed there."""
    head = loc[0] if loc else ""
    if head == "services":
        if len(loc) == 1:
            return "[services]", list(SERVICE_OPTIONS)
        name = str(loc[1])
        if len(loc) == 2:
            return f"[services.{name}]", list(SERVICE_OPTIONS)
        model = SERVICE_OPTIONS.get(name)
        keys = list(model.model_fields) if model else []
        return f"[services.{name}] " + ".".join(map(str, loc[2:])), keys
    if head == "jobs":
        if len(loc) == 1:
            return "[[jobs]]", list(JobSpec.model_fields)
        index = loc[1]
        where = f"[[jobs]] #{index + 1}" if isinstance(index, int) else "[[jobs]]"
        jobs = data.get("jobs")
        if isinstance(index, int) and isinstance(jobs, (list, tuple)) and index < len(jobs):
            job = jobs[index]
            job_id = job.get("job_id") if isinstance(job, dict) else getattr(job, "job_id", None)
            if isinstance(job_id, str):
                where += f" (job_id {job_id!r})"
        if len(loc) > 2:
            where += " " + ".".join(map(str, loc[2:]))
        return where, list(JobSpec.model_fields)
    if head in FILE_KEYS:
        return f"[qflare] {'.'.join(map(str, loc))}", list(FILE_KEYS)
    return ".".join(map(str, loc)) or "configuration", []
