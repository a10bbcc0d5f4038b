"""Building and running the console: ``qflare tui`` and ``qflare simulate --tui``.

``build_console`` wires a :class:`~qflare.tui.app.ConsoleApp` to a feed (own connection from
a URL, or a shared in-process bus), an optional trust store and the history loader.
``run_console_in_process`` runs it inside an event loop that already runs the services and
a simulation on the same bus, so one process shows its own federation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from qflare.bus import Bus
from qflare.crypto.pki import TrustStore
from qflare.tui.app import ConsoleApp
from qflare.tui.events import Event, JobDeclared
from qflare.tui.feed import Feed, describe_source


def build_console(
    *,
    url: str | None = None,
    bus: Bus | None = None,
    prefix: str = "",
    trust: TrustStore | None = None,
    state_dir: Path | None = None,
    jobs: Iterable[JobDeclared] = (),
    raw_alerts: bool = False,
    clock: Callable[[], float] = time.time,
    declare: str = "full",
) -> ConsoleApp:
    """A console on ``url`` (its own connection) or ``bus`` (shared); see :class:`Feed`."""
    declared = list(jobs)

    def history() -> list[Event]:
        events: list[Event] = list(declared)
        if state_dir is not None:
            from qflare.tui.history import load_history

            events += load_history(state_dir)
        return events

    def feed(sink: Callable[[Sequence[Event]], None]) -> Feed:
        return Feed(
            sink,
            url=url,
            bus=bus,
            prefix=prefix,
            trust=trust,
            raw_alerts=raw_alerts,
            clock=clock,
            declare=declare,
        )

    unverified = "  (signatures not re-verified)" if url is None else "  (signatures not verified)"
    source = describe_source(url) + ("" if trust is not None else unverified)
    return ConsoleApp(feed=feed, history=history, clock=clock, source=source)


@contextlib.contextmanager
def terminal_logs_to(path: Path | None) -> Iterator[None]:
    """While the console owns the terminal, send log handlers that write to it (the
    services' JSON lines in the same process) to ``path`` (os.devnull when None), so they
    do not tear the screen; restore them afterwards."""
    terminal = {sys.__stderr__, sys.__stdout__, sys.stderr, sys.stdout}
    moved: list[tuple[logging.StreamHandler[Any], Any]] = []
    sink = open(path if path is not None else os.devnull, "a", encoding="utf-8")  # noqa: SIM115
    loggers = [logging.getLogger()] + [
        logger
        for logger in logging.root.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    try:
        for logger in loggers:
            for handler in logger.handlers:
                if (
                    type(handler) is logging.StreamHandler
                    and getattr(handler, "stream", None) in terminal
                ):
                    moved.append((handler, handler.setStream(sink)))
        yield
    finally:
        for handler, stream in moved:
            handler.setStream(stream)
        sink.close()


async def run_console_in_process(
    bus: Bus,
    *,
    trust: TrustStore | None = None,
    jobs: Iterable[JobDeclared] = (),
    state_dir: Path | None = None,
    raw_alerts: bool = False,
    log_file: Path | None = None,
    exit_when: Awaitable[object] | None = None,
    headless: bool = False,
    size: tuple[int, int] | None = None,
) -> ConsoleApp:
    """Run the console on ``bus`` in the running event loop until the operator quits
    (``q``) or someone calls ``app.exit()``; returns the app (its ``state`` holds what was
    shown). ``jobs`` declares epsilon budgets the wire does not carry. The console binds its
    own queue on ``bus`` and deletes it on exit; it never closes ``bus``. Log handlers that
    write to the terminal go to ``log_file`` (or nowhere) while it runs. ``exit_when``
    (e.g. the simulation's task) closes the console when it completes; quitting the console
    first leaves it running (a coroutine given here is the console's own and is cancelled).
    ``size`` (columns, lines) is the screen of a ``headless`` console."""
    app = build_console(bus=bus, trust=trust, jobs=jobs, state_dir=state_dir, raw_alerts=raw_alerts)
    watched = asyncio.ensure_future(exit_when) if exit_when is not None else None

    async def close_after(done: asyncio.Future[object]) -> None:
        # asyncio.wait, unlike awaiting `done`, does not cancel it when this watcher is
        # cancelled: `q` must leave the job it watches running (it used to cancel it).
        await asyncio.wait([done])
        await app.action_quit()

    watcher = asyncio.ensure_future(close_after(watched)) if watched is not None else None
    try:
        with terminal_logs_to(log_file):
            await app.run_async(headless=headless, size=size)
    finally:
        if watcher is not None and not watcher.done():
            watcher.cancel()
        if watched is not None and watched is not exit_when and not watched.done():
            watched.cancel()
    return app
