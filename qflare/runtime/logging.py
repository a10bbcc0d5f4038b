"""Structured logging: one JSON object per line on stderr, tagged with the service name.

Call sites log an event name as the message and put data in ``extra={"fields": {...}}``
(or use :func:`event`), so log shippers index fields rather than parse prose.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "pid": record.process,
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update({k: _finite(v) for k, v in fields.items() if k not in line})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


def _finite(value: Any) -> Any:
    # JSON has no Infinity/NaN (epsilon is inf with DP off): write them as strings.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Replace the root handlers with one stderr handler (json or plain text)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aio-pika/aiormq narrate every reconnect attempt at INFO; keep their warnings only.
    for noisy in ("aio_pika", "aiormq", "aiosqlite"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``name`` with structured ``fields``."""
    logger.log(level, name, extra={"fields": fields})
