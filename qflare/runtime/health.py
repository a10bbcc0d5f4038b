"""Health, readiness and metrics of one service process over HTTP (Kubernetes' probe
conventions and Prometheus' exposition format).

``GET /healthz``: 200 while the process's event loop answers (the server runs on that
loop, so a blocked loop shows as a probe that times out). ``GET /readyz``: 200 once every
service of the process has started (its consumers are attached), 503 while it starts or
stops. ``GET /metrics``: everything registered with ``prometheus_client``'s default
registry: the metrics of :mod:`qflare.runtime.metrics` (``qflare_service_ready{service}``,
handler latency, updates accepted and rejected, rounds, epsilon, ...). ``qflare up``
starts the next service when the previous one's ``/readyz`` answers 200, whatever the log
format.

The address is ``[qflare] metrics_host`` / ``metrics_port`` (0: any free port; the bound
port is in the ``serve.ready`` log event).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder

from qflare.runtime import metrics
from qflare.runtime.metrics import SERVICE_READY

__all__ = ["SERVICE_READY", "HealthServer", "probe_ready"]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class HealthServer:
    """The HTTP endpoint of one process running ``services``."""

    def __init__(
        self,
        services: Iterable[str],
        host: str = "127.0.0.1",
        port: int = 0,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self._ready = dict.fromkeys(services, False)
        self._stopping = False
        self._server: asyncio.Server | None = None
        for name in self._ready:
            metrics.set_ready(name, False)

    @property
    def ready(self) -> bool:
        return bool(self._ready) and all(self._ready.values()) and not self._stopping

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def set_ready(self, service: str, ready: bool = True) -> None:
        self._ready[service] = ready
        metrics.set_ready(service, ready)

    def stopping(self) -> None:
        """From now on ``/readyz`` answers 503 (the process is shutting down)."""
        self._stopping = True
        for name in self._ready:
            self.set_ready(name, False)

    async def start(self) -> None:
        """Listen; raises ``OSError`` naming the address when it is taken."""
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot serve /metrics, /healthz and /readyz on {self.host}:{self.port}: "
                f"{exc.strerror or exc} (set [qflare] metrics_port, QFLARE_METRICS_PORT or "
                "--metrics-port; 0 picks a free port)",
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    def respond(self, method: str, path: str, accept: str = "") -> tuple[int, str, bytes]:
        """Status, content type and body for one request."""
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"GET only\n"
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            if self.ready:
                return 200, "text/plain", b"ready\n"
            waiting = [n for n, ok in self._ready.items() if not ok]
            state = "stopping" if self._stopping else "starting: " + ", ".join(waiting)
            return 503, "text/plain", state.encode() + b"\n"
        if path == "/metrics":
            encode, content_type = choose_encoder(accept)
            return 200, content_type, encode(self.registry)
        return 404, "text/plain", b"try /metrics, /healthz or /readyz\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            headers = dict(
                (k.strip().lower(), v.strip())
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            )
            status, content_type, body = self.respond(
                method, target.split("?", 1)[0], headers.get("accept", "")
            )
        except (TimeoutError, ValueError, asyncio.IncompleteReadError):
            status, content_type, body, method = 400, "text/plain", b"bad request\n", "GET"
        except (asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        try:
            writer.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {content_type}"
                f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def probe_ready(url: str, timeout: float = 1.0) -> bool:
    """True when ``<url>/readyz`` answers 200 (blocking; for supervisors)."""
    import urllib.error
    import urllib.request

    # no proxy: the endpoint is local, and an http_proxy variable must not reroute it
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/readyz", timeout=timeout) as reply:
            return int(reply.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False
