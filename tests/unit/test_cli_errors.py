"""Every ``qflare`` command, run as a process, given bad flags, a bad or missing config file,
an unreachable or a refusing broker, or an interrupt: one line on stderr naming the
problem, never a traceback, and the exit code of its kind (2 usage, 1 runtime, 130
interrupt). The table below is the contract; a new command must add its row."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from qflare.cli import build_parser

#: One runnable command line per command (``{tmp}`` is the test's folder).
COMMANDS: dict[str, list[str]] = {
    "status": ["status"],
    "alerts": ["alerts"],
    "clients": ["clients"],
    "revoke": ["revoke", "client-000"],
    "serve": ["serve", "aggregator"],
    "up": ["up"],
    "broker-definitions": ["broker-definitions", "--clients", "c1"],
    "messages": ["messages", "docs"],
    "privacy": ["privacy", "epsilon", "--q", "0.1", "--z", "1", "--rounds", "5", "--delta", "1e-5"],
    "provision": ["provision", "--out", "{tmp}/pki-new", "--clients", "1"],
    "simulate": ["simulate", "--rounds", "1", "--direct", "--quiet", "--out", "{tmp}/sim"],
    "tui": ["tui"],
}
#: Commands that read the configuration file (``--config``).
CONFIGURED = ("status", "alerts", "clients", "revoke", "serve", "up")
#: Commands that talk to the broker, and the exit code of an unreachable one: the
#: simulator checks its --broker before anything else, as bad input.
BROKER = {"serve": 1, "up": 1, "simulate": 2, "tui": 1}

UNREACHABLE = "amqp://guest:guest@127.0.0.1:1/"
TYPO = "[services.ingest]\nmax_update_nrom = 5\n"
RULE = (
    '[[jobs]]\njob_id = "j1"\nrounds = 1\nparticipants = ["client-000", "client-001"]\n'
    'rule = "no_such_rule"\ninitial_model = "m.safetensors"\n'
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qflare.crypto import provision

    root = tmp_path_factory.mktemp("cli-pki") / "pki"
    provision(root, clients=2)
    return root


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QFLARE_")}
    env.update({"QFLARE_DATA_DIR": str(tmp / "state"), "QFLARE_CONNECT_TIMEOUT_S": "1", **extra})
    return env


def _argv(command: str, tmp: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "qflare", *(a.format(tmp=tmp) for a in COMMANDS[command]), *more]


def _one_line(proc: subprocess.CompletedProcess[str], command: str, code: int) -> str:
    """The checks every case makes; returns the line."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.returncode == code, proc.stderr
    assert lines[0].startswith(f"qflare {command}"), lines[0]
    return lines[0]


def _run(
    argv: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_table_covers_every_command() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices)
    assert set(sub.choices) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_flags_exit_2(command: str, tmp_path: Path) -> None:
    proc = _run(_argv(command, tmp_path, "--no-such-flag"), _env(tmp_path))
    line = _one_line(proc, command, 2)
    assert "--no-such-flag" in line and "--help" in line


@pytest.mark.parametrize(("text", "needle"), [(TYPO, "max_update_nrom"), (RULE, "no_such_rule")])
@pytest.mark.parametrize("command", CONFIGURED)
def test_bad_config_file_exits_2_naming_the_key(
    command: str, text: str, needle: str, tmp_path: Path, pki: Path
) -> None:
    (tmp_path / "m.safetensors").write_bytes(b"")
    (tmp_path / "bad.toml").write_text(text)
    env = _env(tmp_path, QFLARE_PKI_DIR=str(pki))
    proc = _run(_argv(command, tmp_path, "--config", str(tmp_path / "bad.toml")), env)
    line = _one_line(proc, command, 2)
    assert needle in line
    if needle == "max_update_nrom":
        assert "[services.ingest]" in line and "allowed: " in line and "max_update_norm" in line
    else:
        assert "[[jobs]]" in line and "rule" in line and "median" in line  # what is allowed


@pytest.mark.parametrize("command", CONFIGURED)
def test_missing_config_file_exits_2(command: str, tmp_path: Path) -> None:
    proc = _run(_argv(command, tmp_path, "--config", str(tmp_path / "none.toml")), _env(tmp_path))
    assert "does not exist" in _one_line(proc, command, 2)


def test_missing_config_file_from_the_environment_names_it(tmp_path: Path) -> None:
    env = _env(tmp_path, QFLARE_CONFIG=str(tmp_path / "none.toml"))
    proc = _run(_argv("status", tmp_path), env)
    assert "QFLARE_CONFIG" in _one_line(proc, "status", 2)


@pytest.mark.parametrize("command", sorted(BROKER))
def test_unreachable_broker_is_one_line(command: str, tmp_path: Path, pki: Path) -> None:
    env = _env(tmp_path, QFLARE_PKI_DIR=str(pki))
    argv = _argv(command, tmp_path, "--broker", UNREACHABLE)
    if command == "simulate":
        argv = [a for a in argv if a != "--direct"]
    proc = _run(argv, env)
    assert "cannot reach" in _one_line(proc, command, BROKER[command])


def _require_rabbitmq() -> str:
    url = os.environ.get("QFLARE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 1.0):
            pass
    except OSError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"RabbitMQ is not reachable at {url}; CI=true")
        pytest.skip(f"RabbitMQ is not reachable at {url}")
    netloc = f"{parts.username or 'guest'}:not-the-password@{parts.hostname}:{parts.port or 5672}"
    return urlunsplit((parts.scheme, netloc, parts.path or "/", "", ""))


@pytest.mark.rabbitmq
@pytest.mark.parametrize("command", sorted(BROKER))
def test_refused_login_says_so_at_once(command: str, tmp_path: Path, pki: Path) -> None:
    wrong = _require_rabbitmq()
    env = _env(tmp_path, QFLARE_PKI_DIR=str(pki), QFLARE_CONNECT_TIMEOUT_S="30")
    argv = _argv(command, tmp_path, "--broker", wrong)
    if command == "simulate":
        argv = [a for a in argv if a != "--direct"]
    started = time.monotonic()
    proc = _run(argv, env)
    line = _one_line(proc, command, 1)
    assert "login refused" in line and "not-the-password" not in line
    assert time.monotonic() - started < 15, "a refused login must not be retried"


@pytest.mark.parametrize(
    ("out", "needle"),
    [("/proc/qflare-out", "cannot create the folder"), ("{tmp}/a-file", "is a file")],
    ids=["proc", "file"],
)
def test_simulate_out_it_cannot_write_exits_2(out: str, needle: str, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    argv = [a for a in _argv("simulate", tmp_path) if "{tmp}/sim" not in a]
    argv = [*argv[: argv.index("--out")], "--out", out.format(tmp=tmp_path)]
    proc = _run(argv, _env(tmp_path))
    assert needle in _one_line(proc, "simulate", 2)


@pytest.mark.parametrize(
    ("rule", "unknown"),
    [("median+nosuch", "'nosuch'"), ("nosuch", "'nosuch'"), ("nosuch+median", "'nosuch'")],
)
def test_simulate_names_the_unknown_part_of_a_rule(rule: str, unknown: str, tmp_path: Path) -> None:
    proc = _run(_argv("simulate", tmp_path, "--rule", rule), _env(tmp_path))
    line = _one_line(proc, "simulate", 2)
    assert line.startswith(f"qflare simulate: --rule '{rule}': unknown")
    assert unknown in line and "'median'" not in line and "--attack" not in line


def test_simulate_help_says_each_default_once() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices)
    text = " ".join(sub.choices["simulate"].format_help().split())
    assert "(default: None)" not in text and "(default: False)" not in text
    for chunk in text.split("--")[1:]:
        assert chunk.count("default") <= 1, chunk


# -- interrupts ------------------------------------------------------------------------------
def _interrupt(
    argv: list[str], env: dict[str, str], started: object, command: str, timeout: float = 90
) -> str:
    """Run ``argv``, wait until ``started()`` (or fail), SIGINT it; the output that follows
    is one line and the exit code 130."""
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + timeout
        while not started():  # type: ignore[operator]
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the command did not start in time"
            time.sleep(0.1)
        before = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.monotonic() - before < 30
    assert "Traceback" not in out + err, err
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert lines and lines[-1] == f"qflare {command}: interrupted", err
    return err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(port: int) -> bool:
    from qflare.runtime.health import probe_ready

    return probe_ready(f"http://127.0.0.1:{port}", timeout=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["serve", "up"])
def test_interrupt_stops_a_running_service_with_130(
    command: str, tmp_path: Path, pki: Path
) -> None:
    port = _free_port()
    env = _env(tmp_path, QFLARE_PKI_DIR=str(pki), QFLARE_LOG_LEVEL="ERROR")
    argv = _argv(command, tmp_path, "--broker", "memory://", "--metrics-port", str(port))
    err = _interrupt(argv, env, lambda: _ready(port), command)
    if command == "serve":  # nothing else printed at ERROR
        assert err.strip() == "qflare serve: interrupted"


@pytest.mark.slow
def test_interrupt_during_simulate_exits_130(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    argv = [sys.executable, "-m", "qflare", "simulate", "--rounds", "40", "--quiet"]
    argv += ["--out", str(out)]
    err = _interrupt(argv, _env(tmp_path), lambda: (out / "services.log").exists(), "simulate")
    assert err.strip() == "qflare simulate: interrupted"


def test_simulate_protocol_names_an_unknown_defence(tmp_path: Path) -> None:
    argv = _argv("simulate", tmp_path, "--protocol", "--protocol-defences", "detect,best")
    line = _one_line(_run(argv, _env(tmp_path)), "simulate", 2)
    assert "--protocol-defences" in line and "'best'" in line
