"""What every QFLARE service runs on: configuration, structured logging, the SQLite helper,
the Service base with its one handler wrapper, the per-service bootstrap and the runners.

See docs/CONTRACTS.md ("qflare.runtime") for how a service plugs in.
"""

from qflare.messages.jobs import JobSpec
from qflare.runtime.bootstrap import SERVICES, build_service
from qflare.runtime.config import Settings, load_settings
from qflare.runtime.logging import configure_logging, event
from qflare.runtime.runner import InProcess, run_in_process, run_service, serve
from qflare.runtime.service import (
    TRANSIENT_ERRORS,
    Consumer,
    Service,
    ServiceContext,
    event_bindings,
    stateful_consumer,
    stateful_queue,
)
from qflare.runtime.sqlite import Database, ServiceStore, fsync_write, open_readonly

__all__ = [
    "SERVICES",
    "TRANSIENT_ERRORS",
    "Consumer",
    "Database",
    "InProcess",
    "JobSpec",
    "Service",
    "ServiceContext",
    "ServiceStore",
    "Settings",
    "build_service",
    "configure_logging",
    "event",
    "event_bindings",
    "fsync_write",
    "load_settings",
    "open_readonly",
    "run_in_process",
    "run_service",
    "serve",
    "stateful_consumer",
    "stateful_queue",
]
