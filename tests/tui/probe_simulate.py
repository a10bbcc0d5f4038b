"""Run ``qflare simulate --tui`` with the live check's latency probe on its console.

    tmux new -d -s q -x 160 -y 48 'python -m tests.tui.probe_simulate /tmp/probe.json \\
        --clients 10 --byzantine 2 --attack sign-flip --rounds 8 --out /tmp/simout'

The arguments after the output path go to ``qflare simulate --tui``; the probe's figures
(flagged client / alert -> on screen, see :mod:`tests.tui.live_job`) are written to the path
when the console closes (``q``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import qflare.tui.console as console
from qflare.cli import main as cli
from tests.tui.live_job import LatencyProbe


def run(out: Path, args: list[str]) -> int:
    probes: list[LatencyProbe] = []
    build = console.build_console

    def build_with_probe(**kwargs):  # type: ignore[no-untyped-def]
        app = build(**kwargs)
        probes.append(LatencyProbe(app))
        return app

    console.build_console = build_with_probe  # run_console_in_process looks it up at call time
    try:
        code = cli(["simulate", "--tui", *args])
    finally:
        console.build_console = build
    out.write_text(json.dumps([p.summary() for p in probes], indent=2))
    return code


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]), sys.argv[2:]))
