"""Detection scoring and the report files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qflare.sim.report import RoundRecord, RunResult, comparable, score_detection, write_report


def _round(i: int, flagged: tuple[str, ...], eps: float | None = None) -> RoundRecord:
    return RoundRecord(
        round=i,
        accuracy=0.5 + i / 10,
        loss=1.0 / i,
        participants=("a", "b", "c", "d", "e"),
        flagged=flagged,
        byzantine=("a", "b"),
        epsilon=eps,
        latency_s=0.01 * i,
    )


def test_detection_counts_client_rounds() -> None:
    score = score_detection([_round(1, ("a", "b", "c")), _round(2, ("a",))])
    assert (score.true_positives, score.false_positives) == (3, 1)
    assert (score.false_negatives, score.true_negatives) == (1, 5)
    assert score.precision == pytest.approx(3 / 4)
    assert score.recall == pytest.approx(3 / 4)
    assert score.false_positive_rate == pytest.approx(1 / 6)
    assert score_detection([]).recall is None


def test_report_files(tmp_path: Path) -> None:
    config = {
        "attack": "sign_flip",
        "rule": "mean",
        "byzantine": 2,
        "clients": 5,
        "detection": True,
        "rounds": 2,
        "noise_multiplier": 1.1,
        "delta": 1e-5,
        "clip": 1.0,
        "broker": "x",
    }
    result = RunResult(
        config,
        [_round(1, ("a",), 0.5), _round(2, ("a", "b"), 0.8)],
        ("a", "b"),
        "services",
        "memory://",
        1.5,
    )
    base = RunResult(
        dict(config, attack="none"),
        [_round(1, ()), _round(2, ())],
        ("a", "b"),
        "services",
        "memory://",
        1.0,
    )
    written = write_report(tmp_path, result, base)
    assert {p.name for p in written} == {"report.json", "report.md", "accuracy.png", "epsilon.png"}
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["rounds"][1]["flagged"] == ["a", "b"] and data["rounds"][1]["epsilon"] == 0.8
    assert data["summary"]["detection"]["recall"] == pytest.approx(3 / 4)
    assert data["baseline"]["summary"]["final_accuracy"] == pytest.approx(0.7)
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| detection recall | 75.0% |" in (tmp_path / "report.md").read_text()
    # detection on: the epsilon is that of the noise added, and both files say so next to it
    assert data["summary"]["epsilon_coverage"] == "noise_only"
    assert "NOT a DP guarantee" in data["summary"]["epsilon_note"]
    md = (tmp_path / "report.md").read_text()
    assert (
        "| epsilon spent | 0.800 (noise_only: epsilon of the noise added; NOT a DP guarantee" in md
    )
    clean = RunResult(
        dict(config, detection=False), result.rounds, ("a", "b"), "services", None, 1.0
    )
    assert clean.summary()["epsilon_coverage"] == "clipped_sum"
    off = RunResult(
        dict(config, noise_multiplier=0.0), result.rounds, ("a", "b"), "services", None, 1.0
    )
    assert off.summary()["epsilon_coverage"] is None
    # Latency and broker differ between transports; nothing else may.
    other = json.loads(json.dumps(data))
    other["rounds"][0]["latency_s"] = 9.0
    other["config"]["broker"] = "amqp://"
    assert comparable(other) == comparable(data)
    other["rounds"][0]["flagged"] = []
    assert comparable(other) != comparable(data)


def test_an_update_refused_at_ingest_counts_as_stopped() -> None:
    rec = RoundRecord(1, 0.5, 1.0, ("a", "b", "c"), ("c",), ("a",), None, 0.1, rejected=("a",))
    score = score_detection([rec])
    assert (score.true_positives, score.false_positives, score.false_negatives) == (1, 1, 0)
    assert rec.to_json()["rejected"] == ["a"]
