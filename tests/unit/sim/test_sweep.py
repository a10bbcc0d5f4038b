"""The sweep's plan (checked before any run) and its comparison table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qflare.sim.config import SimConfig, SimConfigError
from qflare.sim.report import RoundRecord, RunResult
from qflare.sim.sweep import Cell, Defence, plan_sweep, summary_rows, write_sweep


def test_plan_puts_fedavg_first_and_checks_every_cell() -> None:
    plan = plan_sweep(SimConfig(), "none,sign-flip", "nnm+multikrum,mean")
    assert plan.attacks == ("none", "sign_flip")
    assert [d.label for d in plan.defences] == ["fedavg", "nnm+multikrum +det", "mean +det"]
    with pytest.raises(SimConfigError, match="sweep cell sign_flip x bulyan"):
        plan_sweep(SimConfig(), "sign_flip", "bulyan")
    with pytest.raises(SimConfigError, match="unknown attack"):
        plan_sweep(SimConfig(), "sign_flip,teleport", "mean")


def _result(acc: float, flagged: tuple[str, ...]) -> RunResult:
    rec = RoundRecord(1, acc, 0.5, ("a", "b", "c", "d"), flagged, ("a",), None, 0.1)
    return RunResult({}, [rec], ("a",), "direct", None, 1.0)


def test_summary_picks_the_best_defence_per_attack(tmp_path: Path) -> None:
    plan = plan_sweep(SimConfig(), "none,gaussian", "median,mean")
    fedavg, median, mean = plan.defences
    cells = [
        Cell("none", fedavg, _result(0.90, ())),
        Cell("none", median, _result(0.85, ())),
        Cell("none", mean, _result(0.88, ("b",))),
        Cell("gaussian", fedavg, _result(0.10, ())),
        Cell("gaussian", median, _result(0.80, ("a",))),
        Cell("gaussian", mean, _result(0.89, ("a", "c"))),
    ]
    rows = {r["attack"]: r for r in summary_rows(plan, cells)}
    g = rows["gaussian"]
    assert g["fedavg_accuracy"] == 0.10 and g["best_defence"] == "mean +det"
    assert g["vs_no_attack_points"] == pytest.approx(-1.0)
    assert (g["precision"], g["recall"], g["false_positive_rate"]) == (
        0.5,
        1.0,
        pytest.approx(1 / 3),
    )
    written = write_sweep(tmp_path, plan, cells, path="direct", wall_s=3.0)
    assert [p.name for p in written] == ["sweep.json", "sweep.md", "sweep_heatmap.png"]
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["defences"] == ["fedavg", "median +det", "mean +det"] and len(data["cells"]) == 6
    md = (tmp_path / "sweep.md").read_text()
    assert "| gaussian | 10.0% | mean +det | 89.0% | -1.0 | 50.0% | 100.0% | 33.3% |" in md
    assert Defence("mean", False).label == "fedavg"
