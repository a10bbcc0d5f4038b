"""``q`` during ``qflare simulate --tui``, in a real terminal (a tmux pane): the console
goes, the job runs on to its end, the report is written and the summary printed, exit 0.

(Before: quitting the console cancelled the job's own future, so simulate died with a
CancelledError traceback, exit 1 and no report.)"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROUNDS = 40
SIZE = ("160", "48")
# COLUMNS/LINES in the environment (pytest's has them) would override the pane's size for
# the console (shutil.get_terminal_size reads them first)
TERMINAL_ENV = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}


class Tmux:
    """tmux commands against one session of a test."""

    def __init__(self) -> None:
        self.session = f"qflare-test-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> str:
        cmd = ["tmux", *args]
        if args[0] != "new-session":
            cmd[2:2] = ["-t", self.session]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=TERMINAL_ENV)
        return done.stdout


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    """A tmux session for the test, killed after it."""
    if shutil.which("tmux") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("tmux is not installed; CI=true, so this is a failure, not a skip")
        pytest.skip("tmux is not installed (apt-get install tmux)")
    run = Tmux()
    try:
        yield run
    finally:
        subprocess.run(
            ["tmux", "kill-session", "-t", run.session], capture_output=True, check=False
        )


def wait_for(
    what: str, check: Callable[[], object], timeout: float, screen: Callable[[], str]
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s; the pane shows:\n{screen()}")
        time.sleep(0.2)


@pytest.mark.slow
def test_q_mid_job_leaves_the_console_and_the_job_runs_on_to_its_report(
    tmux: Tmux, tmp_path: Path
) -> None:
    out, rc = tmp_path / "out", tmp_path / "rc"
    simulate = [
        sys.executable,
        "-m",
        "qflare",
        "simulate",
        "--tui",
        "--clients",
        "6",
        "--byzantine",
        "1",
        "--rounds",
        str(ROUNDS),
        "--local-epochs",
        "1",
        "--out",
        str(out),
    ]
    # the pane outlives the command, so what it printed stays readable
    script = (
        f"unset COLUMNS LINES; {shlex.join(simulate)}; echo $? > {shlex.quote(str(rc))}; sleep 600"
    )
    tmux("new-session", "-d", "-s", tmux.session, "-x", SIZE[0], "-y", SIZE[1], script)

    def screen() -> str:
        return tmux("capture-pane", "-p", "-S", "-200")

    def round_on_screen() -> int:
        match = re.search(rf"sim\s+(\d+)/{ROUNDS}\s", screen())
        return int(match.group(1)) if match else 0

    wait_for("the console showing round 3", lambda: round_on_screen() >= 3, 180, screen)
    tmux("send-keys", "q")
    notice = wait_for(
        "the console closing",
        lambda: re.search(r"console closed; the job runs on \(round (\d+) of (\d+)\)", screen()),
        30,
        screen,
    )
    assert isinstance(notice, re.Match)
    assert int(notice.group(1)) < ROUNDS, "q was pressed after the job had ended"
    assert "● connected" not in screen(), "the console is still on screen"

    wait_for("simulate to exit", rc.exists, 240, screen)
    shown = screen()
    assert rc.read_text().strip() == "0", shown
    assert "Traceback" not in shown and "CancelledError" not in shown
    assert "qflare simulate: summary" in shown
    assert f"{ROUNDS}/{ROUNDS} (completed)" in shown
    assert "report: " in shown
    for name in ("report.json", "report.md"):
        assert (out / name).is_file(), name
