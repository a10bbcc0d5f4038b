"""Checks a process makes before it starts anything: can it log in to the broker, are its
identities and folders there. Each fails with one message that says what to fix.

:func:`wait_for_broker` tells "nothing listens there yet" (wait, up to the configured
``connect_timeout_s``, as a service started before its broker must) from "the broker
refused this login" (fail at once: retrying a wrong password or a missing vhost cannot
succeed). The bus adapter's own connect retries every connection error alike, so a
refused login would cost its whole connect timeout before it is reported.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from qflare.bus import AccessRefused, BusUnavailable, broker_addresses
from qflare.errors import ConfigError
from qflare.runtime.config import Settings, redact_url


def login_of(url: str) -> tuple[str, str]:
    """The user and virtual host an ``amqp://`` URL logs in as."""
    parts = urlsplit(url)
    path = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    return unquote(parts.username or "guest"), path or "/"


async def wait_for_broker(url: str, timeout: float = 30.0) -> None:
    """Return once a connection to ``url`` (to one of a cluster's comma-separated nodes,
    tried in turn) opens (and close it). Raises :class:`~qflare.bus.AccessRefused` at once
    when the broker refuses the login or the virtual host,
    :class:`~qflare.bus.BusUnavailable` when nothing answers within ``timeout`` seconds.
    ``memory://`` needs nothing."""
    if urlsplit(url).scheme not in ("amqp", "amqps"):
        return
    where = redact_url(url)
    # aiormq logs each failed attempt at ERROR; the outcome is reported once, here.
    quiet = logging.getLogger("aiormq")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        await _connect_once_ready(broker_addresses(url), timeout, where)
    finally:
        quiet.setLevel(level)


async def _connect_once_ready(addresses: tuple[str, ...], timeout: float, where: str) -> None:
    import aiormq
    import aiormq.exceptions as amqp

    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        remaining = deadline - time.monotonic()
        url = addresses[attempt % len(addresses)]
        user, vhost = login_of(url)
        try:
            connection = await asyncio.wait_for(aiormq.connect(url), max(0.5, min(5.0, remaining)))
        except (amqp.ProbableAuthenticationError, amqp.AuthenticationError) as exc:
            raise AccessRefused(
                f"login refused by RabbitMQ at {where} for user {user!r}: check the user and "
                f"password in the broker URL ({_first(exc)})"
            ) from None
        except amqp.ConnectionNotAllowed as exc:
            raise AccessRefused(
                f"RabbitMQ at {where} refused access to virtual host {vhost!r} for user "
                f"{user!r} ({_first(exc)})"
            ) from None
        except amqp.InvalidFrameError as exc:
            # aiormq reports the broker's Connection.Close during the handshake this way:
            # RabbitMQ closes it so when the virtual host does not exist or is not allowed.
            raise AccessRefused(
                f"RabbitMQ at {where} closed the connection at login: virtual host {vhost!r} "
                f"does not exist or user {user!r} may not use it"
            ) from exc
        except (TimeoutError, OSError, amqp.AMQPConnectionError) as exc:
            attempt += 1
            turns = attempt // len(addresses)  # the next node at once; after a round, wait
            wait = 0.0 if attempt % len(addresses) else min(2.0, 0.1 * 2**turns)
            if time.monotonic() + wait >= deadline:
                raise BusUnavailable(
                    f"cannot reach RabbitMQ at {where} within {timeout:g} s ({_first(exc)}); "
                    "is it running, and are the host and port right?"
                ) from None
            await asyncio.sleep(wait)
            continue
        await connection.close()
        return


def connect_timeout_from_env(default: float = 30.0) -> float:
    """``$QFLARE_CONNECT_TIMEOUT_S`` for commands that take no configuration file."""
    text = os.environ.get("QFLARE_CONNECT_TIMEOUT_S")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"QFLARE_CONNECT_TIMEOUT_S must be a number of seconds > 0, got {text!r}")
    return value


def _first(exc: BaseException) -> str:
    args = [a for a in exc.args if not isinstance(a, int)]  # (errno, text) from aiormq
    text = str(args[0]) if args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def check_can_serve(settings: Settings, services: Iterable[str]) -> None:
    """Raise :class:`ConfigError` unless ``services`` can start here: their identities
    under ``pki_dir`` exist and the data folder can be written."""
    for name in services:
        settings.identity_dir(name)
    check_writable_folder(settings.data_dir, "data_dir")


def check_writable_folder(path: Path, what: str) -> None:
    """Raise :class:`ConfigError` unless ``path`` is a folder this process can write, or
    can be created as one."""
    probe = Path(path)
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {probe} is not writable by this user")
