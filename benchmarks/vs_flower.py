"""A whole federated round in QFLARE and in Flower 1.42, on the same work, in one run.

A round as a user sees it: the global model goes to every participant, each takes one
trivial training step (``benchmarks/flower_app/vsflower/task.py``: one gradient step
towards a target of its own on one float32 tensor of ``--params`` values), the update
comes back and the new model is published. N participants, each a separate OS process.

* **QFLARE**: ``qflare provision`` into a temporary folder, the five services as
  processes (``qflare up``) against RabbitMQ in a virtual host made for the run and deleted
  after it, N SDK participants (``qflare.client.Participant`` with a torch model, as
  README's "Writing a participant"). Everything signed (ML-DSA-65) and sealed (ML-KEM-768
  + X25519), detection on, DP-FedAvg noise on under the accountant, rule ``mean``. A round
  is timed from the aggregator's ``round.opened`` to its ``model.published`` (the
  services' JSON log lines, millisecond stamps).
* **Flower** (deployment mode): ``flower-superlink --insecure`` and N ``flower-supernode
  --insecure`` processes, the app in ``benchmarks/flower_app`` started with ``flwr run``
  (FedAvg over every node, evaluation off). A round is timed by the ServerApp, from
  ``configure_train`` (the model about to go out) to the end of ``aggregate_train`` (the
  new model exists).

The first round of every run is not counted on either side (it includes connecting and
waiting for the participants); ``--rounds`` counts the rounds that are. For each N the
runs alternate, QFLARE then Flower, ``--repeats`` times. Also printed: publish-to-publish
intervals (the whole cycle, including QFLARE's privacy grant between rounds).

    python benchmarks/vs_flower.py [--sizes 10,25] [--rounds 3] [--repeats 2]
                                   [--params 1000000] [--json out.json] [--keep]
    python benchmarks/vs_flower.py --install-flower     # Flower 1.42 into its own virtualenv

Flower: the executables come from ``--flower-venv`` / ``$QFLARE_FLOWER_VENV``, else the
virtualenv ``--install-flower`` makes under ``~/.cache/qflare/bench/`` (``$XDG_CACHE_HOME``
respected), else the running environment when ``pip install -e '.[bench]'`` put Flower's
full install there. A virtualenv of its own is the default because flwr 1.42's pins
(``rich<15``, ``packaging<26``) would downgrade what the test suite runs with.

Needs ``rabbitmqctl`` on this machine (the per-run virtual host) and RabbitMQ at
``--amqp`` (default ``$QFLARE_TEST_AMQP`` or amqp://guest:guest@127.0.0.1:5672/).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
APP = HERE / "flower_app"
sys.path.insert(0, str(APP))
from vsflower.task import initial_model, shape, train_step  # noqa: E402

JOB = "vsflower"
VHOST_PREFIX = "vsflower-"
GOAL = 10.0  # QFLARE's round at most a tenth of Flower's
FLOWER_EXES = ("flower-superlink", "flower-supernode", "flwr")
QUIET_FLOWER = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


class BenchError(RuntimeError):
    """A run could not be measured; the message says what to look at."""


# -- where Flower comes from ------------------------------------------------------------------
def flower_requirement() -> str:
    """The ``bench`` extra's Flower pin in pyproject.toml (one place for the version)."""
    try:
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
            "optional-dependencies"
        ]
        for req in extras.get("bench", []):
            if req.replace(" ", "").startswith("flwr"):
                return str(req)
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        pass
    return "flwr==1.42.0"


def default_venv() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    version = flower_requirement().split("==")[-1].strip()
    return cache / "qflare" / "bench" / f"flwr-{version}"


def _works(bin_dir: Path) -> bool:
    if not all((bin_dir / exe).exists() for exe in FLOWER_EXES):
        return False
    try:  # peers.sh installs flwr without its dependencies: the executables exist but fail
        out = subprocess.run(
            [str(bin_dir / "flower-superlink"), "--version"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **QUIET_FLOWER},
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def find_flower(venv: Path | None) -> Path:
    """The folder holding Flower's executables, or BenchError naming the install command."""
    candidates = [venv / "bin"] if venv else [default_venv() / "bin", Path(sys.executable).parent]
    for bin_dir in candidates:
        if _works(bin_dir):
            return bin_dir
    raise BenchError(
        f"Flower's executables ({', '.join(FLOWER_EXES)}) are missing or incomplete in "
        f"{' and '.join(str(c) for c in candidates)}: run `python benchmarks/vs_flower.py "
        f"--install-flower` (a virtualenv at {default_venv()}), or `pip install -e '.[bench]'` "
        "in an environment of its own, then pass --flower-venv"
    )


def install_flower(venv: Path) -> Path:
    """A virtualenv with Flower's full install (the ``bench`` extra's pin), apart from ours."""
    req = flower_requirement()
    print(f"installing {req} into {venv} ...", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", req],
            check=True,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"installing {req} into {venv} failed: {exc}") from None
    if not _works(venv / "bin"):
        raise BenchError(f"{req} installed into {venv} but flower-superlink --version fails")
    return venv / "bin"


# -- processes ---------------------------------------------------------------------------------
class Procs:
    """Every process a run starts, each leading a process group of its own. Stopping one
    stops what it started too: the processes of its group (a SuperNode's SuperExec and
    ClientApps) and every descendant, also one in a group of its own (``qflare up`` starts
    each service in a new process group)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=log.parent,
                start_new_session=True,
            )
        self.items.append((name, proc))
        return proc

    def stop(self, grace: float = 20.0) -> list[str]:
        """SIGTERM to each group (``qflare up`` forwards it to its services), SIGKILL to
        whatever of it is left after ``grace`` s; returns the names whose processes still
        ran after SIGKILL (none expected)."""
        table = _process_table()
        trees = {name: {proc.pid, *_descendants(proc.pid, table)} for name, proc in self.items}
        for _name, proc in self.items:
            _signal_group(proc.pid, signal.SIGTERM)

        def running() -> list[str]:
            now = _process_table()
            return [
                name
                for name, proc in self.items
                if any(pid in now for pid in trees[name])
                or any(pgid == proc.pid for _ppid, pgid in now.values())
            ]

        end = time.monotonic() + grace
        while running() and time.monotonic() < end:
            for _name, proc in self.items:
                proc.poll()  # reap the leaders that are done
            time.sleep(0.2)
        for name, proc in self.items:
            _signal_group(proc.pid, signal.SIGKILL)
            for pid in trees[name]:
                with suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        end = time.monotonic() + 5.0
        while (left := running()) and time.monotonic() < end:
            time.sleep(0.2)
        self.items.clear()
        return left


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process that runs (zombies waiting to be
    reaped do not count)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def _descendants(pid: int, table: dict[int, tuple[int, int]]) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _pgid) in table.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def wait_for(
    what: str, predicate: Callable[[], bool], timeout: float, detail: Callable[[], str]
) -> None:
    """Poll ``predicate`` until true; BenchError with ``detail()`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}\n{detail()}")
        time.sleep(0.25)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} not written)"
    return f"--- last lines of {path}:\n" + "\n".join(text[-lines:])


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# -- results -----------------------------------------------------------------------------------
@dataclass
class Run:
    side: str  # "qflare" or "flower"
    n: int
    repeat: int
    rounds: list[float] = field(default_factory=list)  # s per counted round
    cycles: list[float] = field(default_factory=list)  # publish-to-publish, s
    error: str = ""
    wall: float = 0.0
    leftovers: list[str] = field(default_factory=list)


def _median_worst(values: list[float]) -> tuple[float, float] | None:
    return (statistics.median(values), max(values)) if values else None


def table(runs: list[Run], sizes: list[int], attr: str) -> list[str]:
    """Median and worst per side and N; the goal is judged on the medians."""
    rows = [
        f"{'N':>4} | {'QFLARE s/round':>14} {'worst':>7} | {'Flower s/round':>14} {'worst':>7} "
        f"| {'Flower/QFLARE':>13} | goal: QFLARE <= Flower/{GOAL:g}",
        "-" * 98,
    ]
    for n in sizes:
        cells, stats, notes = [], [], []
        for side in ("qflare", "flower"):
            mine = [r for r in runs if r.side == side and r.n == n]
            failed = sum(1 for r in mine if r.error)
            if failed:
                notes.append(f"{failed} {side} run(s) failed")
            stat = _median_worst([v for r in mine for v in getattr(r, attr)])
            stats.append(stat)
            if stat:
                cells.append(f"{stat[0]:14.2f} {stat[1]:7.2f}")
            else:
                cells.append(f"{'failed' if mine else 'not run':>14} {'':>7}")
        q, f = stats
        if q and f:
            ratio = f[0] / q[0]
            verdict = "met" if ratio >= GOAL else f"not met (needs <= {f[0] / GOAL:.2f} s)"
            rs = f"{ratio:12.1f}x"
        else:
            rs, verdict = f"{'-':>13}", "not measured"
        note = f" ({'; '.join(notes)})" if notes else ""
        rows.append(f"{n:>4} | {cells[0]} | {cells[1]} | {rs} | {verdict}{note}")
    return rows


# -- QFLARE --------------------------------------------------------------------------------------
def rabbitmqctl(*args: str) -> str:
    try:
        out = subprocess.run(
            ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=120
        )
    except FileNotFoundError:
        raise BenchError(
            "rabbitmqctl not found: the benchmark makes a RabbitMQ virtual host per run; run it "
            "on the broker's machine"
        ) from None
    if out.returncode != 0:
        raise BenchError(f"rabbitmqctl {' '.join(args)} failed: {out.stderr.strip()[-500:]}")
    return out.stdout


def drop_stale_vhosts() -> None:
    """Virtual hosts of earlier runs whose process is gone (a killed benchmark)."""
    for line in rabbitmqctl("list_vhosts", "name").split():
        if not line.startswith(VHOST_PREFIX):
            continue
        try:
            pid = int(line[len(VHOST_PREFIX) :].split("-")[0])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            rabbitmqctl("delete_vhost", line)
        except PermissionError:
            pass


@contextmanager
def vhost(amqp: str, name: str) -> Iterator[str]:
    """A virtual host for one run (guest may use it), deleted afterwards with everything in
    it; yields the run's broker URL."""
    rabbitmqctl("add_vhost", name)
    try:
        user = urlsplit(amqp).username or "guest"
        rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        parts = urlsplit(amqp)
        yield urlunsplit((parts.scheme, parts.netloc, "/" + name, "", ""))
    finally:
        rabbitmqctl("delete_vhost", name)


def qflare_config(
    work: Path, pki: Path, n: int, rounds: int, params: int, round_timeout: float
) -> Path:
    from safetensors.numpy import save_file

    model = work / "model0.safetensors"
    save_file({"w": initial_model(params)}, str(model))
    clients = [f"client-{i:03d}" for i in range(n)]
    job = {
        "job_id": JOB,
        "initial_model": str(model),
        "participants": clients,
        "rounds": rounds,
        "rule": "mean",
        "f": min(10, (n - 1) // 2),  # as benchmarks/round.py: the detector's budget
        "detection": True,
        "sample_rate": 1.0,
        "noise_multiplier": 1.0,
        "clip": 10.0,
        "epsilon_budget": 1e6,
        "min_updates": n,
        "deadline_s": round_timeout,
        "seed": 1,
    }
    text = (
        "[qflare]\n"
        f"data_dir = {json.dumps(str(work / 'state'))}\n"
        f"pki_dir = {json.dumps(str(pki))}\n"
        'log_level = "INFO"\nlog_format = "json"\n\n[[jobs]]\n'
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in job.items())
    )
    config = work / "qflare.toml"
    config.write_text(text)
    return config


def service_events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("job") in (JOB, None):
                out.append(rec)
    return out


def _stamp(rec: dict[str, Any]) -> float:
    return datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def qflare_rounds(events: list[dict[str, Any]], total: int) -> tuple[list[float], list[float]]:
    """(opened -> published per round, published -> published) for rounds 2..total."""
    opened: dict[int, float] = {}
    published: dict[int, float] = {}
    for rec in events:
        ev, r = rec.get("event"), rec.get("round")
        if ev == "round.opened" and isinstance(r, int):
            opened.setdefault(r, _stamp(rec))
        elif ev == "model.published" and isinstance(r, int):
            published.setdefault(r, _stamp(rec))
    missing = [r for r in range(1, total + 1) if r not in opened or r not in published]
    if missing:
        raise BenchError(
            f"no round.opened/model.published in the services' log for rounds {missing}"
        )
    rounds = [published[r] - opened[r] for r in range(2, total + 1)]
    cycles = [published[r] - published[r - 1] for r in range(2, total + 1)]
    return rounds, cycles


def ensure_pki(pki: Path, n: int) -> None:
    if (pki / "clients" / f"client-{n - 1:03d}").exists():
        return
    out = subprocess.run(
        [sys.executable, "-m", "qflare", "provision", "--out", str(pki), "--clients", str(n)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise BenchError(f"qflare provision failed ({out.returncode}): {out.stderr.strip()[-800:]}")


def run_qflare(args: argparse.Namespace, n: int, pki: Path, work: Path, run: Run) -> None:
    total = args.rounds + 1
    ensure_pki(pki, n)
    config = qflare_config(work, pki, n, total, args.params, args.round_timeout)
    procs = Procs()
    name = f"{VHOST_PREFIX}{os.getpid()}-{run.repeat}-{n}"
    with vhost(args.amqp, name) as url:
        try:
            parts = []
            for i in range(n):
                log = work / f"client-{i:03d}.log"
                parts.append(
                    procs.start(
                        f"participant {i}",
                        [
                            sys.executable,
                            __file__,
                            "_participant",
                            str(pki / "clients" / f"client-{i:03d}"),
                            url,
                            str(i),
                            str(args.params),
                            str(args.lr),
                            str(total * args.round_timeout + args.start_timeout),
                        ],
                        log,
                    )
                )

            def following() -> bool:
                for i, proc in enumerate(parts):
                    log = work / f"client-{i:03d}.log"
                    if proc.poll() is not None:
                        raise BenchError(
                            f"participant {i} exited with {proc.returncode}\n{tail(log)}"
                        )
                    if "following" not in log.read_text(errors="replace"):
                        return False
                return True

            # the participants' queues must exist before the aggregator's first broadcast
            wait_for(
                f"{n} participants to follow the job",
                following,
                args.start_timeout,
                lambda: "\n".join(
                    tail(work / f"client-{i:03d}.log", 5)
                    for i in range(n)
                    if "following" not in (work / f"client-{i:03d}.log").read_text(errors="replace")
                ),
            )
            up_log = work / "up.log"
            up = procs.start(
                "qflare up",
                [sys.executable, "-m", "qflare", "up", "--config", str(config), "--broker", url],
                up_log,
                env={**os.environ, "QFLARE_PREFIX": ""},
            )
            t0 = time.monotonic()

            def ended() -> bool:
                if up.poll() is not None:
                    raise BenchError(f"qflare up exited with {up.returncode}\n{tail(up_log)}")
                return any(e.get("event") == "job.ended" for e in service_events(up_log))

            wait_for(
                "the job to end",
                ended,
                total * args.round_timeout + args.start_timeout,
                lambda: tail(up_log),
            )
            run.wall = time.monotonic() - t0
            events = service_events(up_log)
            end = next(e for e in events if e.get("event") == "job.ended")
            if end.get("reason") not in (None, "completed"):
                raise BenchError(f"the job ended early: {end}\n{tail(up_log)}")
            run.rounds, run.cycles = qflare_rounds(events, total)
            deadline = time.monotonic() + 30
            for proc in parts:  # each saw job.ended and exits by itself
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(max(0.1, deadline - time.monotonic()))
        finally:  # before the virtual host goes
            run.leftovers = procs.stop()


def participant_main(argv: list[str]) -> int:
    """Child process: one SDK participant (README's "Writing a participant")."""
    import logging

    import torch

    from qflare.client import Participant

    kit, url, index, params, lr, timeout = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)

    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(shape(int(params))))

    def train(model: Flat, _round_info: object) -> int:
        with torch.no_grad():
            w = model.w.detach().numpy()
            w[...] = train_step(w, int(index), float(lr))
        return 10

    participant = Participant.from_kit(kit, Flat(), train, broker=url, jobs=[JOB])
    reason = participant.run_blocking(timeout=float(timeout))
    print(
        json.dumps(
            {"client": participant.id, "ended": reason, "sent": participant.stats.updates_sent}
        )
    )
    return 0 if reason == "completed" else 1


# -- Flower ----------------------------------------------------------------------------------------
def run_flower(args: argparse.Namespace, n: int, bin_dir: Path, work: Path, run: Run) -> None:
    total = args.rounds + 1
    home = work / "flwr-home"
    home.mkdir()
    link_port, *node_ports = free_ports(n + 1)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        **QUIET_FLOWER,
        "FLWR_HOME": str(home),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(bin_dir.parent),
    }
    env.pop("PYTHONPATH", None)
    procs = Procs()
    link_log = work / "superlink.log"
    out = work / "flower-rounds.jsonl"
    try:
        link = procs.start(
            "flower-superlink",
            [
                str(bin_dir / "flower-superlink"),
                "--insecure",
                "--port",
                str(link_port),
                "--disable-runtime-dependency-installation",
            ],
            link_log,
            env,
        )

        def link_text() -> str:
            if link.poll() is not None:
                raise BenchError(
                    f"flower-superlink exited with {link.returncode}\n{tail(link_log)}"
                )
            return link_log.read_text(errors="replace") if link_log.exists() else ""

        wait_for(
            "flower-superlink",
            lambda: "Uvicorn running" in link_text(),
            args.start_timeout,
            lambda: tail(link_log),
        )
        for i, port in enumerate(node_ports):
            procs.start(
                f"flower-supernode {i}",
                [
                    str(bin_dir / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--port",
                    str(port),
                    "--node-config",
                    f"partition-id={i} num-partitions={n}",
                ],
                work / f"supernode-{i:03d}.log",
                env,
            )
        wait_for(
            f"{n} SuperNodes to register",
            lambda: link_text().count("Activated node_id") >= n,
            args.start_timeout,
            lambda: tail(link_log),
        )
        run_config = (
            f"num-server-rounds={total} num-nodes={n} params={args.params} lr={args.lr} "
            f"round-timeout={float(args.round_timeout)} out={json.dumps(str(out))}"
        )
        started = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(APP), "bench", "--run-config", run_config],
            capture_output=True,
            text=True,
            env=env,
            cwd=work,
            timeout=args.start_timeout,
        )
        if started.returncode != 0 or "Successfully started run" not in started.stdout:
            raise BenchError(
                f"flwr run failed ({started.returncode}): {started.stdout}{started.stderr}"
            )
        t0 = time.monotonic()

        def lines() -> list[dict[str, Any]]:
            text = out.read_text() if out.exists() else ""
            return [json.loads(line) for line in text.splitlines() if line.strip()]

        def done() -> bool:
            if len(lines()) >= total:
                return True
            if "Finished task" in link_text():
                raise BenchError(
                    f"the ServerApp finished after {len(lines())} of {total} rounds\n{tail(link_log)}"
                )
            return False

        wait_for(
            f"{total} Flower rounds",
            done,
            total * args.round_timeout + args.start_timeout,
            lambda: tail(link_log),
        )
        run.wall = time.monotonic() - t0
        recs = sorted(lines(), key=lambda r: r["round"])
        bad = [r for r in recs if r["replies"] != n or r["errors"]]
        if bad:
            raise BenchError(f"Flower rounds without {n} good replies: {bad}")
        run.rounds = [r["end"] - r["start"] for r in recs[1:total]]
        run.cycles = [recs[k]["end"] - recs[k - 1]["end"] for k in range(1, total)]
    finally:
        run.leftovers = procs.stop()


# -- the run -----------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="10,25", help="participant counts N, comma-separated")
    p.add_argument("--rounds", type=int, default=3, help="rounds counted per run (one more is run)")
    p.add_argument("--repeats", type=int, default=2, help="QFLARE, Flower pairs per N")
    p.add_argument("--params", type=int, default=1_000_000, help="float32 parameters of the model")
    p.add_argument("--lr", type=float, default=0.01, help="the training step's learning rate")
    p.add_argument("--only", choices=("qflare", "flower"), help="run one side only")
    p.add_argument(
        "--amqp",
        default=os.environ.get("QFLARE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/"),
        help="RabbitMQ (a virtual host is made per run)",
    )
    p.add_argument("--round-timeout", type=float, default=300.0, help="seconds a round may take")
    p.add_argument(
        "--start-timeout", type=float, default=240.0, help="seconds for processes to start"
    )
    p.add_argument("--flower-venv", type=Path, default=os.environ.get("QFLARE_FLOWER_VENV") or None)
    p.add_argument(
        "--install-flower", action="store_true", help="make the Flower virtualenv if missing"
    )
    p.add_argument("--json", type=Path, help="also write the runs and tables here")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, state)")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes takes integers separated by commas, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 1 or args.rounds < 1 or args.repeats < 1:
        p.error("--sizes, --rounds and --repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_participant"]:
        return participant_main(argv[1:])
    args = parse(argv)

    def interrupted(sig: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {sig}")

    signal.signal(signal.SIGTERM, interrupted)
    try:
        bin_dir = None
        if args.only != "qflare":
            try:
                bin_dir = find_flower(args.flower_venv)
            except BenchError:
                if not args.install_flower:
                    raise
                bin_dir = install_flower(args.flower_venv or default_venv())
        if args.only != "flower":
            drop_stale_vhosts()
    except BenchError as exc:
        print(f"vs_flower: {exc}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="qflare-vsflower-"))
    started = datetime.now(UTC)
    print(
        f"vs_flower {started:%Y-%m-%d %H:%M} UTC: N = {args.sizes}, {args.params:,} float32 parameters "
        f"({args.params * 4 / 2**20:.1f} MiB), {args.rounds} counted rounds per run (+1 not counted), "
        f"{args.repeats} x (QFLARE, Flower) per N; Flower from {bin_dir}; work folder {work}",
        flush=True,
    )
    runs: list[Run] = []
    try:
        for n in args.sizes:
            pki = work / f"pki-{n}"  # one federation per N, made by the first QFLARE run
            for k in range(args.repeats):
                for side in ("qflare", "flower"):
                    if args.only and side != args.only:
                        continue
                    run = Run(side, n, k)
                    folder = work / f"{side}-n{n}-{k}"
                    folder.mkdir()
                    t = time.monotonic()
                    try:
                        if side == "qflare":
                            run_qflare(args, n, pki, folder, run)
                        else:
                            assert bin_dir is not None
                            run_flower(args, n, bin_dir, folder, run)
                    except BenchError as exc:
                        run.error = str(exc)
                    runs.append(run)
                    status = (
                        "rounds " + ", ".join(f"{v:.2f}" for v in run.rounds) + " s"
                        if not run.error
                        else "FAILED: " + run.error.splitlines()[0]
                    )
                    print(
                        f"  N={n:<3} {side:<6} run {k + 1}: {status}  ({time.monotonic() - t:.0f} s with start-up)",
                        flush=True,
                    )
                    if run.error:
                        print("    " + "\n    ".join(run.error.splitlines()[1:]), flush=True)
                    if run.leftovers:
                        print(f"    processes left after SIGKILL: {run.leftovers}", flush=True)
    except KeyboardInterrupt:
        print("vs_flower: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            subprocess.run(["rm", "-rf", str(work)], check=False)

    ended = datetime.now(UTC)
    lines = [
        "",
        f"round time (QFLARE: round.opened -> model.published; Flower: configure_train -> end of "
        f"aggregate_train), {started:%Y-%m-%d %H:%M}-{ended:%H:%M} UTC:",
        *table(runs, args.sizes, "rounds"),
        "",
        "publish-to-publish interval (the whole cycle between two global models):",
        *table(runs, args.sizes, "cycles"),
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "started": started.isoformat(),
                    "ended": ended.isoformat(),
                    "params": args.params,
                    "runs": [asdict(r) for r in runs],
                    "table": lines,
                },
                indent=2,
            )
        )
    failed = [r for r in runs if r.error or r.leftovers]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
