"""``qflare privacy epsilon|plan``: output formats, agreement with the library, bad input."""

from __future__ import annotations

import json

import pytest

from qflare.cli import main
from qflare.privacy import epsilon


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["privacy", *argv])
    except SystemExit as exit_:  # argparse errors
        code = int(exit_.code)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_epsilon_json_and_text(capsys: pytest.CaptureFixture[str]) -> None:
    args = ("epsilon", "--q", "0.01", "--z", "1.1", "--rounds", "200", "--delta", "1e-5")
    code, out, _ = _run(capsys, *args, "--json")
    assert code == 0
    value = json.loads(out)["epsilon"]
    assert value == pytest.approx(epsilon(0.01, 1.1, 200, 1e-5))
    code, out, _ = _run(capsys, *args)
    assert code == 0 and len(out.strip().splitlines()) == 1 and f"{value:.4f}" in out


def test_plan_noise_and_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys,
        "plan",
        "--epsilon",
        "3",
        "--delta",
        "1e-5",
        "--q",
        "0.05",
        "--rounds",
        "50",
        "--json",
    )
    assert code == 0
    z = json.loads(out)["z"]
    assert epsilon(0.05, z, 50, 1e-5) <= 3.0 < epsilon(0.05, z * 0.99, 50, 1e-5)
    code, out, _ = _run(
        capsys, "plan", "--epsilon", "3", "--delta", "1e-5", "--q", "0.05", "--z", "1.5", "--json"
    )
    assert code == 0
    rounds = json.loads(out)["rounds"]
    assert epsilon(0.05, 1.5, rounds, 1e-5) <= 3.0 < epsilon(0.05, 1.5, rounds + 1, 1e-5)
    code, out, _ = _run(
        capsys, "plan", "--epsilon", "3", "--delta", "1e-5", "--q", "0.05", "--z", "1.5"
    )
    assert code == 0 and f"at most {rounds} rounds" in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["epsilon", "--q", "0", "--z", "1", "--rounds", "5", "--delta", "1e-5"], "--q"),
        (["epsilon", "--q", "1.5", "--z", "1", "--rounds", "5", "--delta", "1e-5"], "--q"),
        (["epsilon", "--q", "0.1", "--z", "0", "--rounds", "5", "--delta", "1e-5"], "--z"),
        (["epsilon", "--q", "0.1", "--z", "-2", "--rounds", "5", "--delta", "1e-5"], "--z"),
        (["epsilon", "--q", "0.1", "--z", "1", "--rounds", "5", "--delta", "1"], "--delta"),
        (["epsilon", "--q", "0.1", "--z", "1", "--rounds", "5", "--delta", "0"], "--delta"),
        (["epsilon", "--q", "0.1", "--z", "1", "--rounds", "0", "--delta", "1e-5"], "--rounds"),
        (["epsilon", "--q", "x", "--z", "1", "--rounds", "5", "--delta", "1e-5"], "--q"),
        (["epsilon", "--q", "nan", "--z", "1", "--rounds", "5", "--delta", "1e-5"], "--q"),
        (["plan", "--epsilon", "1", "--delta", "1e-5", "--q", "0.1"], "--rounds"),
        (
            [
                "plan",
                "--epsilon",
                "1",
                "--delta",
                "1e-5",
                "--q",
                "0.1",
                "--rounds",
                "5",
                "--z",
                "1",
            ],
            "not allowed",
        ),
        (["plan", "--epsilon", "0", "--delta", "1e-5", "--q", "0.1", "--rounds", "5"], "--epsilon"),
        (["plan", "--epsilon", "1", "--delta", "2", "--q", "0.1", "--z", "1"], "--delta"),
    ],
    ids=[
        "q0",
        "q>1",
        "z0",
        "z<0",
        "delta1",
        "delta0",
        "rounds0",
        "q-text",
        "q-nan",
        "neither",
        "both",
        "eps0",
        "plan-delta",
    ],
)
def test_invalid_input_exits_2_with_a_clear_message(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == "" and needle in err
