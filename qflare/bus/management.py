"""RabbitMQ's management HTTP API, for what ``qflare revoke`` tells the broker.

A revoked participant's certificate stops its updates at ingest, but its broker user could
still log in and read its jobs' streams. With the management plugin on (``rabbitmq-plugins
enable rabbitmq_management``, port 15672) and a management URL (``[qflare]
management_url``, ``$QFLARE_MANAGEMENT_URL`` or ``qflare revoke --management-url``;
``http://<admin>:<password>@<host>:15672/``), :meth:`Management.disable_user` deletes the
client's broker user (``DELETE /api/users/<user>``: a login as it is then refused
ACCESS_REFUSED) and closes its open connections (listed with ``GET /api/connections`` before
the deletion; RabbitMQ closes a deleted user's connections itself, and any left are closed
with ``DELETE /api/connections/<name>``). A client whose connection is closed cannot log in
again. The broker user of a client is its id (``qflare broker-definitions``,
:func:`qflare.commands.broker.client_user`).

Standard library only (:mod:`urllib.request`): four calls do not need an HTTP client.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import quote, unquote, urlsplit, urlunsplit
from urllib.request import Request, urlopen

from qflare.errors import QflareError

#: How long to wait before each new try of a call the management API failed with a 5xx
#: status: under load RabbitMQ 3.10's API answers 500 now and then (an internal call that
#: timed out), and every call made here is idempotent, so it is made again.
SERVER_ERROR_RETRY_S = (0.5, 1.0, 2.0, 4.0)


class ManagementError(QflareError):
    """The management API refused a call or could not be reached (the message says which
    call, and the status or error)."""

    reason = "BROKER_MANAGEMENT"


class _ServerError(Exception):
    """A 5xx answer: the call is made again (:meth:`Management.request`)."""


class GoneAfterRetry(LookupError):
    """A 404 on a try made again after a 5xx: gone now, perhaps by the try that failed."""


@dataclass(frozen=True)
class Disabled:
    """What :meth:`Management.disable_user` did: whether the user existed (and is deleted
    now), and the names of the connections it had open (closed now)."""

    user: str
    deleted: bool
    closed: tuple[str, ...]


@dataclass(frozen=True)
class Management:
    """The management API at ``base`` (``http(s)://host:port[/path]``, no credentials),
    as ``user``."""

    base: str
    user: str
    password: str
    timeout_s: float = 10.0

    @classmethod
    def from_url(cls, url: str, timeout_s: float = 10.0) -> Management:
        """``http(s)://user:password@host:port[/path]`` (credentials of a broker user tagged
        ``administrator``); ValueError naming what is wrong."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"management URL must be http(s)://user:password@host:15672/, got {redact(url)!r}"
            )
        if parts.username is None or parts.password is None:
            raise ValueError(
                f"management URL {redact(url)!r} names no user and password "
                "(http://user:password@host:15672/)"
            )
        netloc = parts.netloc.rsplit("@", 1)[1]  # host[:port], without the credentials
        base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        return cls(base, unquote(parts.username), unquote(parts.password), timeout_s)

    def request(self, method: str, path: str, body: Any = None, reason: str = "") -> Any:
        """One call (``path`` from ``/api/``); the decoded JSON answer, or None for an empty
        one. A 5xx answer is tried again after each of :data:`SERVER_ERROR_RETRY_S`. A 404
        raises :class:`LookupError` (:class:`GoneAfterRetry` when an earlier try failed with
        a 5xx: that try may have done the work); any other failure :class:`ManagementError`."""
        retried = False
        for wait in (*SERVER_ERROR_RETRY_S, None):
            try:
                return self._request_once(method, path, body, reason)
            except _ServerError as exc:
                if wait is None:
                    raise ManagementError(str(exc)) from None
                retried = True
                time.sleep(wait)
            except LookupError as exc:
                if retried:
                    raise GoneAfterRetry(str(exc)) from None
                raise
        raise AssertionError("unreachable")  # the last try returns or raises

    def _request_once(self, method: str, path: str, body: Any, reason: str) -> Any:
        data = None if body is None else json.dumps(body).encode()
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
        if reason:
            headers["X-Reason"] = reason  # shown to the client whose connection is closed
        req = Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except HTTPError as exc:
            if exc.code == 404:
                raise LookupError(f"{method} {path}: not found") from None
            detail = exc.read()[:300].decode(errors="replace")
            failure = f"{method} {path}: HTTP {exc.code} {detail}".strip()
            if exc.code >= 500:
                raise _ServerError(failure) from None
            raise ManagementError(failure) from None
        except (URLError, OSError) as exc:
            reason_ = getattr(exc, "reason", exc)
            raise ManagementError(
                f"{method} {path}: cannot reach the management API at {self.base} ({reason_})"
            ) from None
        return json.loads(raw) if raw.strip() else None

    def delete_user(self, user: str) -> bool:
        """Delete broker user ``user``; False when there was none (True when a try that
        failed with a 5xx had deleted it)."""
        try:
            self.request("DELETE", f"/api/users/{quote(user, safe='')}")
        except GoneAfterRetry:
            return True
        except LookupError:
            return False
        return True

    def connections_of(self, user: str) -> list[str]:
        """The names of the open connections logged in as ``user`` (any vhost)."""
        rows = self.request("GET", "/api/connections?columns=name,user") or []
        return sorted(str(r["name"]) for r in rows if r.get("user") == user)

    def close_connection(self, name: str, reason: str) -> bool:
        """Close connection ``name`` (the broker tells its client ``reason``); False when it
        was gone already."""
        try:
            self.request("DELETE", f"/api/connections/{quote(name, safe='')}", reason=reason)
        except LookupError:
            return False
        return True

    def disable_user(self, user: str, reason: str = "revoked") -> Disabled:
        """Delete ``user`` and close the connections it had open (module docstring)."""
        opened = self.connections_of(user)
        deleted = self.delete_user(user)
        # RabbitMQ closes a deleted user's connections itself (CONNECTION_FORCED); any still
        # open (another broker version, a node slow to act) are closed here, the rest 404
        for name in opened:
            self.close_connection(name, reason)
        return Disabled(user, deleted, tuple(opened))


def redact(url: str) -> str:
    """``http://admin:secret@host/`` -> ``http://admin:***@host/``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc}"))
