"""The argparse value types the commands share (``qflare.commands._common``): what they
accept, and an error that names the flag and the range for what they do not."""

from __future__ import annotations

import argparse
import math

import pytest

from qflare.cli import main as cli
from qflare.commands._common import key_value, number_in, whole_number_in


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
