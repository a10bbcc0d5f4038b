"""What the operator console costs the job it watches: ``qflare simulate`` with and without
``--tui``, on the embedded bus, interleaved.

``qflare simulate --tui`` runs the console in the services' own event loop, so every frame
it draws and every envelope it reads is time the job does not get. Each trial is a fresh
process running the same job (same seed, same data, same rounds). Figures per trial:

* wall: the job's own wall time (``summary.wall_s`` of its report: provisioning, services,
  console start-up and every round);
* cpu: the process's CPU seconds over the run (less disturbed by other work on the machine
  than wall time, which a busy neighbour stretches);
* with the console: its frames, the events it took, and the seconds the event loop spent in
  it (its frames, Textual composing the screen, the feed handing deliveries in; hooks on
  those methods, so Textual's own message handling is left out).

Trials alternate with/without (ABBA, so drift on a shared machine hits both) and each
"with" is paired with its neighbouring "without". Printed: each trial, then for wall and cpu
the median and worst of the paired ratios and the ratio of the medians (goal: <= 1.10),
and the console's share of the job's wall time.

Two ways to show the console:

* ``--mode headless`` (default): Textual headless at ``--size`` (160x48): everything but
  the terminal writes (no terminal needed);
* ``--mode terminal``: the real ``qflare simulate --tui`` in a tmux pane of that size
  (needs tmux), so the ANSI output to a real terminal is paid for too.

    python benchmarks/console.py [--rounds 80] [--clients 10] [--repeats 5] [--mode headless]
                                 [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def job_args(args: argparse.Namespace, out: Path) -> list[str]:
    return [
        "simulate",
        "--clients",
        str(args.clients),
        "--byzantine",
        str(args.byzantine),
        "--rounds",
        str(args.rounds),
        "--local-epochs",
        str(args.local_epochs),
        "--seed",
        "0",
        "--out",
        str(out),
    ]


def one(args: argparse.Namespace) -> None:
    """Child process: run the job once, in-process, and write its figures (JSON) to
    ``--figures``. With ``--headless`` the console is Textual's headless one."""
    import resource

    import qflare.tui
    from qflare.cli import main as cli
    from qflare.tui.console import run_console_in_process  # Textual loaded before the job

    apps: list[object] = []
    width, height = (int(v) for v in args.size.split("x"))

    async def watched(bus, **kwargs):  # type: ignore[no-untyped-def]
        if args.headless:
            kwargs.update(headless=True)
            if "size" in inspect.signature(run_console_in_process).parameters:  # older: 80x24
                kwargs.update(size=(width, height))
        app = await run_console_in_process(bus, **kwargs)
        apps.append(app)
        return app

    qflare.tui.run_console_in_process = watched  # looked up by simulate at call time
    in_console = _time_the_console() if args.one == "with" else None
    out = Path(args.out)
    extra = ["--tui"] if args.one == "with" else ["--quiet"]
    before = resource.getrusage(resource.RUSAGE_SELF)
    code = cli([*job_args(args, out), *extra])
    after = resource.getrusage(resource.RUSAGE_SELF)
    report = json.loads((out / "report.json").read_text())
    app = apps[0] if apps else None
    figures = {
        "code": code,
        "wall_s": report["summary"]["wall_s"],
        "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3),
        "rounds": report["summary"]["rounds_completed"],
        "frames": getattr(app, "frames", None),
        "events": app.state.events_seen if app is not None else None,  # type: ignore[attr-defined]
        "console_s": round(sum(in_console.values()), 3) if in_console is not None else None,
    }
    Path(args.figures).write_text(json.dumps(figures))


def _time_the_console() -> dict[str, float]:
    """Seconds the event loop spends in the console: its frames, Textual composing the
    screen, and the feed taking deliveries (hooks on those methods; Textual's own message
    handling is not counted)."""
    from textual.screen import Screen

    from qflare.tui.app import ConsoleApp
    from qflare.tui.feed import Feed

    spent = {"frames": 0.0, "compose": 0.0, "feed": 0.0}

    def timed(owner: type, name: str, key: str) -> None:
        inner = getattr(owner, name, None)
        if inner is None:
            return
        if asyncio.iscoroutinefunction(inner):

            async def outer_async(*a, **k):  # type: ignore[no-untyped-def]
                t = time.perf_counter()
                try:
                    return await inner(*a, **k)
                finally:
                    spent[key] += time.perf_counter() - t

            setattr(owner, name, outer_async)
            return

        def outer(*a, **k):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t

        setattr(owner, name, outer)

    timed(ConsoleApp, "redraw", "frames")
    timed(Screen, "_compositor_refresh", "compose")  # Textual's; skipped if renamed
    timed(Feed, "_handle", "feed")
    return spent


def child_command(args: argparse.Namespace, console: bool, out: Path, figures: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "with" if console else "without"]
    cmd += ["--out", str(out), "--figures", str(figures)]
    for name in ("rounds", "clients", "byzantine", "local_epochs", "size"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return cmd


def trial_headless(args: argparse.Namespace, console: bool, out: Path) -> dict[str, object]:
    figures = out.parent / f"{out.name}.json"
    cmd = [*child_command(args, console, out, figures), "--headless"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not figures.exists():
        raise SystemExit(f"trial failed ({done.returncode}): {done.stderr[-2000:]}")
    return dict(json.loads(figures.read_text()))


def trial_terminal(args: argparse.Namespace, console: bool, out: Path) -> dict[str, object]:
    """The child in a tmux pane: the console draws on a real terminal."""
    width, height = args.size.split("x")
    session = f"qflare-bench-{os.getpid()}"
    figures = out.parent / f"{out.name}.json"
    # stdout (the summary) away; the console draws on the pane through stderr. COLUMNS and
    # LINES, if exported here, would override the pane's size for the console.
    script = (
        f"unset COLUMNS LINES; {shlex.join(child_command(args, console, out, figures))} >/dev/null"
    )
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", width, "-y", height, script],
        cwd=ROOT,
        check=True,
    )
    try:
        deadline = time.monotonic() + 1800
        while (
            subprocess.run(
                ["tmux", "has-session", "-t", session], capture_output=True, check=False
            ).returncode
            == 0
        ):
            if time.monotonic() > deadline:
                raise SystemExit("trial did not finish in 30 minutes")
            time.sleep(0.5)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, check=False)
    if not figures.exists():
        raise SystemExit(f"trial failed: no figures from {shlex.join(script.split())}")
    return dict(json.loads(figures.read_text()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=80)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--byzantine", type=int, default=2)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="pairs of trials (with, without)")
    p.add_argument("--size", default="160x48", help="the console's screen, COLUMNSxLINES")
    p.add_argument("--mode", choices=("headless", "terminal"), default="headless")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--one", choices=("with", "without"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--figures", default=None, help=argparse.SUPPRESS)
    p.add_argument("--headless", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        one(args)
        return 0
    if args.mode == "terminal" and shutil.which("tmux") is None:
        raise SystemExit("--mode terminal needs tmux (apt-get install tmux)")
    trial = trial_terminal if args.mode == "terminal" else trial_headless
    print(
        f"qflare simulate --rounds {args.rounds} --clients {args.clients} --byzantine "
        f"{args.byzantine} --local-epochs {args.local_epochs}, console {args.mode} "
        f"{args.size}, {args.repeats} pairs, {time.strftime('%Y-%m-%d %H:%M')}",
        flush=True,
    )
    trials: list[dict[bool, dict[str, float]]] = []
    console_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="qflare-bench-console-") as tmp:
        for i in range(args.repeats):
            order = (True, False) if i % 2 == 0 else (False, True)  # ABBA
            pair: dict[bool, dict[str, float]] = {}
            for console in order:
                figures = trial(args, console, Path(tmp) / f"{i}-{int(console)}")
                if figures.get("code") != 0 or figures.get("rounds") != args.rounds:
                    raise SystemExit(f"trial {i} did not complete the job: {figures}")
                pair[console] = {k: float(str(figures[k])) for k in ("wall_s", "cpu_s")}
                extra = ""
                if figures.get("frames") is not None:
                    extra = f"  ({figures['frames']} frames, {figures['events']} events"
                    if figures.get("console_s") is not None:
                        extra += f", {figures['console_s']} s in the console"
                    extra += ")"
                    console_s.append(float(figures.get("console_s") or 0.0))
                label = "with console   " if console else "without console"
                print(
                    f"  pair {i + 1}: {label} {figures['wall_s']:7.2f} s wall "
                    f"{figures['cpu_s']:7.2f} s cpu{extra}",
                    flush=True,
                )
            trials.append(pair)
    result: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python benchmarks/console.py", *sys.argv[1:]]),
        "job": f"qflare simulate --rounds {args.rounds} --clients {args.clients} "
        f"--byzantine {args.byzantine} --local-epochs {args.local_epochs}",
        "mode": args.mode,
        "size": args.size,
    }
    for measure in ("wall_s", "cpu_s"):
        with_ = [p[True][measure] for p in trials]
        without = [p[False][measure] for p in trials]
        ratios = [w / wo for w, wo in zip(with_, without, strict=True)]
        name = measure[:-2]
        result[name] = {
            "with_median_s": round(statistics.median(with_), 2),
            "without_median_s": round(statistics.median(without), 2),
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_worst": round(max(ratios), 3),
            "ratio_of_medians": round(statistics.median(with_) / statistics.median(without), 3),
            "ratios": [round(r, 3) for r in ratios],
        }
        r = result[name]
        assert isinstance(r, dict)
        print(
            f"{name}: with console median {r['with_median_s']} s, without "
            f"{r['without_median_s']} s; ratio per pair median {r['ratio_median']}, worst "
            f"{r['ratio_worst']} (ratio of medians {r['ratio_of_medians']})"
        )
    if console_s and all(console_s):
        share = [c / p[True]["wall_s"] for c, p in zip(console_s, trials, strict=True)]
        result["console_share"] = {
            "median": round(statistics.median(share), 3),
            "worst": round(max(share), 3),
        }
        median, worst = 100 * statistics.median(share), 100 * max(share)
        print(
            f"time the event loop spent in the console: median {median:.1f}%, worst "
            f"{worst:.1f}% of the job's wall time"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
