"""``qflare up`` against a broker: one ``qflare serve`` child per service replica.

Children start one at a time in :data:`qflare.runtime.SERVICES` order, each once the
previous one's ``/readyz`` (:mod:`qflare.runtime.health`) answers 200, so nothing the
aggregator publishes at start-up falls on an undeclared queue. Readiness comes from the
services themselves, not from their log lines, so any log format works.

Fail fast: a child that exits, or is not ready within ``start_timeout_s``, before every
service is up stops the ones already started, and ``up`` fails (exit code 1). SIGTERM or
SIGINT at any time spawns nothing more and stops every child, one at a time in reverse
start order (SIGTERM, then SIGKILL after ``grace_s``; a second signal kills at once);
nothing is left behind. Once all are ready, a
child that dies is restarted on its own port unless ``restart`` is off.

Children run in their own process group, so a Ctrl-C in the terminal reaches the
supervisor only and it stops them in order; on Linux each child also gets SIGTERM if the
supervisor itself dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TextIO

from qflare.errors import CommandFailed
from qflare.runtime.health import probe_ready


@dataclass
class Child:
    name: str
    index: int
    port: int
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name}[{self.index}]"


def free_ports(host: str, count: int) -> list[int]:
    """``count`` ports the OS calls free on ``host`` now (held together, so distinct)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = [socket.socket(family, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def probe_host(host: str) -> str:
    """Where to reach a server bound to ``host`` from this machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


class Supervisor:
    """Start ``children`` in order, each once ready; supervise; stop them all."""

    def __init__(
        self,
        children: Sequence[Child],
        command: Callable[[Child], list[str]],
        *,
        host: str = "127.0.0.1",
        start_timeout_s: float = 120.0,
        restart: bool = True,
        grace_s: float = 20.0,
        out: TextIO | None = None,
    ) -> None:
        self.children = list(children)
        self.command = command
        self.host = probe_host(host)
        self.start_timeout_s = start_timeout_s
        self.restart = restart
        self.grace_s = grace_s
        self.out = out or sys.stderr
        self._stop = threading.Event()
        self._signals: list[int] = []
        self._failure: str | None = None
        self._stopping = False
        self._force = False

    def url(self, child: Child) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{child.port}"

    def say(self, text: str) -> None:
        print(f"qflare up: {text}", file=self.out, flush=True)

    # -- the whole life ------------------------------------------------------------------
    def run(self) -> int:
        """Returns the exit code after a stop by SIGTERM (0, or the first child's failure);
        raises ``KeyboardInterrupt`` after SIGINT and :class:`CommandFailed` when a service
        did not start."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        code = 0
        try:
            if self._start_all():
                self.say(f"all {len(self.children)} services ready; SIGTERM or Ctrl-C stops them")
                code = self._supervise()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self._failure is not None:
            raise CommandFailed(self._failure)
        if signal.SIGINT in self._signals:
            raise KeyboardInterrupt
        return code

    def _on_signal(self, sig: int, _frame: FrameType | None) -> None:
        self._signals.append(sig)
        self._force = self._stopping  # a second signal while stopping: kill
        self._stop.set()

    # -- start-up ------------------------------------------------------------------------
    def _start_all(self) -> bool:
        for child in self.children:
            if self._stop.is_set():
                return False
            self._spawn(child)
            self.say(f"starting {child.label} (pid {self._pid(child)}, {self.url(child)})")
            if not self._wait_ready(child):
                return False
        return not self._stop.is_set()

    def _wait_ready(self, child: Child) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        assert child.proc is not None
        while not self._stop.is_set():
            rc = child.proc.poll()
            if rc is not None:
                self._failure = (
                    f"{child.label} exited with code {rc} before it was ready; stopped the "
                    "services that had started"
                )
                return False
            if probe_ready(self.url(child), timeout=1.0):
                self.say(f"{child.label} ready")
                return True
            if time.monotonic() > deadline:
                self._failure = (
                    f"{child.label} was not ready within {self.start_timeout_s:g} s "
                    f"({self.url(child)}/readyz; [qflare] start_timeout_s); stopped the "
                    "services that had started"
                )
                return False
            self._stop.wait(0.1)
        return False

    def _spawn(self, child: Child) -> None:
        child.proc = subprocess.Popen(
            self.command(child),
            env={**os.environ, **child.env},
            process_group=0,
            preexec_fn=_die_with_parent(),
        )

    @staticmethod
    def _pid(child: Child) -> int:
        return child.proc.pid if child.proc is not None else -1

    # -- running ---------------------------------------------------------------------------
    def _supervise(self) -> int:
        code = 0
        while not self._stop.wait(0.5):
            alive = 0
            for child in self.children:
                if child.proc is None:
                    continue
                rc = child.proc.poll()
                if rc is None:
                    alive += 1
                    continue
                if self.restart and not self._stop.is_set():
                    self.say(f"{child.label} exited with code {rc}; restarting")
                    self._spawn(child)
                    alive += 1
                    continue
                code = code or (rc if rc > 0 else 1)
                child.proc = None
            if alive == 0:
                break
        return code

    # -- stopping --------------------------------------------------------------------------
    def _stop_all(self) -> None:
        """SIGTERM each running child in reverse start order, waiting for each (up to
        ``grace_s``, then SIGKILL) before the next, so consumers outlive their producers."""
        self._stopping = True
        for child in reversed(self.children):
            proc = child.proc
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s
            while proc.poll() is None:
                if time.monotonic() > deadline or self._force:
                    self.say(f"{child.label} did not stop in time; killing it")
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
                    break
                time.sleep(0.05)


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to send the child SIGTERM when this process dies
    (``PR_SET_PDEATHSIG``), so a supervisor killed with -9 leaves no service behind."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)

    return preexec
