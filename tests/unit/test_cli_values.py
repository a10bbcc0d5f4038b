"""The argparse value types the commands share (``qflare.commands._common``): what they
accept, and an error that names the flag and the range for what they do not."""

from __future__ import annotations

import argparse
import math
from typing import Any

import pytest

from qflare.cli import build_parser
from qflare.cli import main as cli
from qflare.commands._common import (
    add_config_option,
    add_pki_dir_option,
    key_value,
    number_in,
    whole_number_in,
)


def test_number_in_honours_open_and_closed_ends() -> None:
    q = number_in("--q", 0.0, 1.0, low_open=True)
    assert q("1") == 1.0 and q("0.25") == 0.25
    for bad in ("0", "1.5", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="--q must be"):
            q(bad)
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \(0, 1\], got 0"):
        q("0")
    z = number_in("--z", 0.0, low_open=True, high_open=True)
    assert z("1e9") == 1e9
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \(0, inf\)"):
        z(str(math.inf))


def test_whole_number_in_bounds_both_ends_or_one() -> None:
    port = whole_number_in("--metrics-port", 0, 65535)
    assert port("0") == 0 and port("65535") == 65535
    for bad in ("-1", "65536", "1.5", "http"):
        with pytest.raises(argparse.ArgumentTypeError, match="--metrics-port must be"):
            port(bad)
    rounds = whole_number_in("--rounds", 1)
    assert rounds("100000") == 100000
    with pytest.raises(argparse.ArgumentTypeError, match="--rounds must be >= 1, got 0"):
        rounds("0")


def test_key_value_splits_at_the_first_equals_sign() -> None:
    assert key_value("a=b=c") == ("a", "b=c")
    assert key_value("k=") == ("k", "")
    for bad in ("nokey", "=v"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected JOB=EPSILON"):
            key_value(bad, "JOB=EPSILON")


def test_a_bad_metrics_port_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli(["serve", "ingest", "--metrics-port", "70000"])
    assert exited.value.code == 2
    assert "--metrics-port must be in 0..65535, got 70000" in capsys.readouterr().err


def _commands(parser: argparse.ArgumentParser, path: str = "qflare") -> dict[str, Any]:
    """Every (sub)command's parser under ``parser``, by its full name."""
    found = {path: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= _commands(sub, f"{path} {name}")
    return found


def test_config_and_pki_dir_say_the_same_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    """``--config`` and ``--pki-dir`` come from one helper each, so every command that takes
    them names the same variable the default comes from; and every --help still prints."""
    one = argparse.ArgumentParser()
    add_config_option(one)
    add_pki_dir_option(one)
    config, pki_dir = (one._option_string_actions[f].help for f in ("--config", "--pki-dir"))
    helps: dict[str, dict[str, str | None]] = {"--config": {}, "--pki-dir": {}}
    commands = _commands(build_parser())
    for name, parser in commands.items():
        for flag, seen in helps.items():
            action = parser._option_string_actions.get(flag)
            if action is not None:
                seen[name] = action.help
    assert {"qflare serve", "qflare up", "qflare revoke", "qflare status"} <= set(helps["--config"])
    assert {"qflare serve", "qflare up", "qflare revoke", "qflare clients"} <= set(
        helps["--pki-dir"]
    )
    assert set(helps["--pki-dir"].values()) == {pki_dir}
    read_for = " whose [[jobs]] name the participants"
    assert set(helps["--config"].values()) == {config, config.replace(" (", read_for + " (", 1)}
    for name in commands:
        with pytest.raises(SystemExit) as exited:
            cli([*name.split()[1:], "--help"])
        assert exited.value.code == 0, name
        assert capsys.readouterr().out.startswith(f"usage: {name}"), name
