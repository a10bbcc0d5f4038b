"""`qflare tui` option checking (exit code 2 with the reason, before any screen starts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qflare.cli import main as cli
from qflare.commands.tui import load_trust_from
from qflare.crypto import provision


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--broker", "memory://"], "qflare simulate --tui"),
        (["--pki", "/nonexistent-pki"], "holds no ca.qc"),
        (["--state-dir", "/nonexistent-state"], "is not a folder"),
    ],
)
def test_bad_options_exit_2_with_the_fix(args: list[str], message: str, capsys) -> None:
    assert cli(["tui", "--broker", "amqp://127.0.0.1:9/", *args]) == 2
    assert message in capsys.readouterr().err


def test_budget_option_is_checked(capsys) -> None:
    with pytest.raises(SystemExit):
        cli(["tui", "--budget", "j=-1"])
    assert "JOB=EPSILON" in capsys.readouterr().err


def test_trust_from_a_provision_root_or_a_kit(tmp_path: Path) -> None:
    fed = provision(tmp_path / "pki", clients=1)
    root = load_trust_from(tmp_path / "pki")
    kit = load_trust_from(fed.clients["client-000"])
    assert root.ca.serial == kit.ca.serial
