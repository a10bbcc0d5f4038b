"""Service configuration: one TOML file plus ``QFLARE_*`` environment variables.

Environment wins over the file, the file over the defaults. The file (``--config`` or
``QFLARE_CONFIG``) looks like::

    [qflare]
    broker = "amqp://guest:guest@127.0.0.1:5672/"   # QFLARE_BROKER; default memory://
    prefix = ""                                      # QFLARE_PREFIX: exchange/queue prefix
    data_dir = "./qflare-data"                       # QFLARE_DATA_DIR: one sub-folder per service
    pki_dir = "./pki"                                # QFLARE_PKI_DIR: output of `qflare provision`
    log_level = "INFO"                               # QFLARE_LOG_LEVEL
    log_format = "json"                              # QFLARE_LOG_FORMAT: json | text

    [services.aggregator]                            # free-form options per service
    reopen_interval_s = 3.0

    [[jobs]]                                         # see qflare.runtime.jobs.JobSpec
    job_id = "j1"
    ...

Secrets (key passphrase) come only from the environment (``QFLARE_PASSPHRASE``).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from qflare.messages.jobs import JobSpec
from qflare.runtime.jobs import load_jobs

DEFAULT_BROKER = "memory://"
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_ENV = {
    "QFLARE_BROKER": "broker",
    "QFLARE_PREFIX": "prefix",
    "QFLARE_DATA_DIR": "data_dir",
    "QFLARE_PKI_DIR": "pki_dir",
    "QFLARE_LOG_LEVEL": "log_level",
    "QFLARE_LOG_FORMAT": "log_format",
}
_FILE_KEYS = frozenset(_ENV.values())


@dataclass(frozen=True)
class Settings:
    """Validated settings shared by every service of one deployment."""

    broker: str = DEFAULT_BROKER
    prefix: str = ""
    data_dir: Path = Path("qflare-data")
    pki_dir: Path | None = None
    log_level: str = "INFO"
    log_format: str = "json"
    passphrase: str | None = field(default=None, repr=False)
    jobs: tuple[JobSpec, ...] = ()
    services: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    source: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.broker, str) or self.broker.split("://")[0] not in (
            "memory",
            "amqp",
            "amqps",
        ):
            raise ValueError(
                f"broker must be a memory://, amqp:// or amqps:// URL, got {self.broker!r}"
            )
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {LOG_FORMATS}, got {self.log_format!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        object.__setattr__(self, "log_level", self.log_level.upper())
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.pki_dir is not None:
            object.__setattr__(self, "pki_dir", Path(self.pki_dir))

    @property
    def embedded(self) -> bool:
        return self.broker.startswith("memory")

    def service_dir(self, service: str) -> Path:
        """The folder a service keeps its SQLite file and blobs in (created on demand)."""
        path = self.data_dir / service
        path.mkdir(parents=True, exist_ok=True)
        return path

    def options(self, service: str) -> Mapping[str, Any]:
        return self.services.get(service, MappingProxyType({}))

    def job(self, job_id: str) -> JobSpec:
        for job in self.jobs:
            if job.job_id == job_id:
                return job
        raise KeyError(f"no job {job_id!r} in the configuration ({[j.job_id for j in self.jobs]})")

    def with_jobs(self, *jobs: JobSpec) -> Settings:
        return replace(self, jobs=load_jobs([j.model_dump() for j in (*self.jobs, *jobs)]))

    def safe_dict(self) -> dict[str, Any]:
        """For logs: no passphrase, no job seeds, no broker password."""
        broker = self.broker
        if "@" in broker:
            scheme, rest = broker.split("://", 1)
            broker = f"{scheme}://***@{rest.split('@', 1)[1]}"
        return {
            "broker": broker,
            "prefix": self.prefix,
            "data_dir": str(self.data_dir),
            "pki_dir": str(self.pki_dir) if self.pki_dir else None,
            "jobs": [j.job_id for j in self.jobs],
        }


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Read the file (``path`` or ``$QFLARE_CONFIG``, optional), apply ``QFLARE_*`` from
    ``env`` (default ``os.environ``), then keyword ``overrides`` (command-line flags)."""
    env = os.environ if env is None else env
    path = path or env.get("QFLARE_CONFIG") or None
    values: dict[str, Any] = {}
    jobs: tuple[JobSpec, ...] = ()
    services: dict[str, Mapping[str, Any]] = {}
    source = None
    if path is not None:
        source = Path(path)
        try:
            with source.open("rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError:
            raise ValueError(f"config file {source} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {source} is not valid TOML: {exc}") from None
        unknown = set(doc) - {"qflare", "services", "jobs"}
        if unknown:
            raise ValueError(
                f"config file {source}: unknown top-level tables {sorted(unknown)}; "
                "use [qflare], [services.<name>] and [[jobs]]"
            )
        top = doc.get("qflare", {})
        bad = set(top) - _FILE_KEYS
        if bad:
            raise ValueError(f"config file {source}: unknown [qflare] keys {sorted(bad)}")
        values.update(top)
        base = source.parent
        for key in ("data_dir", "pki_dir"):
            if key in values and not Path(values[key]).is_absolute():
                values[key] = base / values[key]
        jobs = load_jobs(doc.get("jobs", []), base_dir=base)
        services = {
            name: MappingProxyType(dict(opts)) for name, opts in doc.get("services", {}).items()
        }
    for var, key in _ENV.items():
        if env.get(var):
            values[key] = env[var]
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(
        **values,
        passphrase=env.get("QFLARE_PASSPHRASE") or None,
        jobs=jobs,
        services=MappingProxyType(services),
        source=source,
    )
