"""docs/messages.md is generated from the code and must match it."""

from __future__ import annotations

from pathlib import Path

from qflare.cli import main
from qflare.messages import BODY_TYPES, Reason
from qflare.messages.docs import render_reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "messages.md"


def test_reference_lists_every_kind_field_and_reason() -> None:
    text = render_reference()
    for kind, model in BODY_TYPES.items():
        assert f"### `{kind}`" in text
        for name in model.model_fields:
            assert f"| `{name}` |" in text, (kind, name)
    for reason in Reason:
        assert f"| `{reason.value}` | {reason.doc} |" in text


def test_committed_reference_is_up_to_date() -> None:
    assert DOC.read_text() == render_reference(), (
        "docs/messages.md is stale: run `qflare messages docs --out docs/messages.md`"
    )


def test_cli_check(tmp_path: Path) -> None:
    out = tmp_path / "m.md"
    assert main(["messages", "docs", "--out", str(out)]) == 0
    assert main(["messages", "docs", "--out", str(out), "--check"]) == 0
    out.write_text("stale")
    assert main(["messages", "docs", "--out", str(out), "--check"]) == 1
