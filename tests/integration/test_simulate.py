"""`qflare simulate` end to end on the embedded bus: the real services, SDK participants,
the report files; and the services path against the direct path (same pure cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qflare.cli import main
from qflare.sim.config import SimConfig
from qflare.sim.direct import run_direct
from qflare.sim.federation import Federation
from qflare.sim.report import comparable
from qflare.sim.services import run_services

pytestmark = pytest.mark.slow


def test_cli_runs_a_short_job_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "simulate",
            "--clients",
            "6",
            "--byzantine",
            "1",
            "--rounds",
            "2",
            "--attack",
            "gaussian",
            "--rule",
            "median",
            "--out",
            str(out),
            "--quiet",
            "--baseline",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["path"] == "services" and report["broker"] == "memory://"
    assert (
        report["config"]["attack"] == "gaussian" and report["config"]["rule_resolved"] == "median"
    )
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    (byz,) = report["byzantine_clients"]
    for r in rounds:
        assert sorted(r["participants"]) == [f"client-{i:03d}" for i in range(6)]
        assert r["byzantine"] == [byz]
        assert byz in r["flagged"]  # N(0, 1) noise on every coordinate is far from any update
        assert r["epsilon"] is None and r["latency_s"] > 0
    assert rounds[-1]["accuracy"] > 0.5
    assert report["baseline"]["config"]["attack"] == "none"
    assert report["summary"]["detection"]["recall"] == 1.0
    assert (out / "accuracy.png").stat().st_size > 1000
    assert "| final accuracy |" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "changes",
    [
        {"attack": "label_flip", "sample_rate": 0.7, "rule": "nnm+multikrum"},
        # DP on with a budget that ends the job: the accountant denies round 3
        {"attack": "alie", "noise_multiplier": 1.0, "clip": 2.0, "epsilon_budget": 7.0},
    ],
    ids=["label_flip-sampled", "alie-dp-budget"],
)
def test_services_path_matches_the_direct_path(changes: dict) -> None:
    config = SimConfig(clients=8, byzantine=2, rounds=3, **changes)
    federation = Federation.build(config)
    direct = run_direct(config, federation)
    services = run_services(config, federation)
    assert services.path == "services" and direct.path == "direct"
    assert comparable(services.to_json()) == comparable(direct.to_json())
    assert services.ended == direct.ended
    if config.dp_on:
        assert services.ended == "budget_exhausted" and len(services.rounds) == 2
        assert 0 < services.rounds[0].epsilon < services.rounds[1].epsilon <= 7.0


def test_adaptive_clipping_moves_the_clip_alike_on_both_paths() -> None:
    """--adaptive-clip with DP: the clip each round ran at (round.opened's clip norm on the
    services path) moves from round to round, the same on both paths, and the rounds are
    charged at the job's z."""
    from qflare.privacy import epsilon

    config = SimConfig(
        clients=8,
        byzantine=2,
        rounds=3,
        attack="sign_flip",
        noise_multiplier=0.5,
        clip=0.5,
        adaptive_clip=True,
        epsilon_budget=1e6,
    )
    federation = Federation.build(config)
    direct = run_direct(config, federation)
    services = run_services(config, federation)
    assert comparable(services.to_json()) == comparable(direct.to_json())
    clips = [r.clip for r in services.rounds]
    assert clips[0] == 0.5 and len(set(clips)) == 3, clips
    assert services.rounds[-1].epsilon == pytest.approx(
        epsilon(1.0, 0.5, 3, config.delta), rel=1e-6
    )


def test_a_filter_bound_removes_at_most_k_alike_on_both_paths() -> None:
    """--dp-filter-bound 1: the detector flags both attackers, the aggregator removes only
    the higher-scored one and keeps the other (reported as kept_flagged, not stopped); the
    rounds are charged as filter_bounded (z/3, q=1) on both paths."""
    from qflare.privacy import epsilon

    config = SimConfig(
        clients=8,
        byzantine=2,
        rounds=2,
        attack="sign_flip",
        noise_multiplier=1.5,
        clip=2.0,
        dp_filter_bound=1,
    )
    federation = Federation.build(config)
    direct = run_direct(config, federation)
    services = run_services(config, federation)
    assert comparable(services.to_json()) == comparable(direct.to_json())
    for r in services.rounds:
        assert set(r.flagged) == set(federation.byzantine), r
        assert len(r.kept_flagged) == 1 and len(r.stopped) == 1, r
    assert services.epsilon_coverage == "filter_bounded"
    assert services.rounds[-1].epsilon == pytest.approx(
        epsilon(1.0, 0.5, 2, config.delta), rel=1e-6
    )


def test_tui_watches_the_run_on_the_same_bus(monkeypatch: pytest.MonkeyPatch) -> None:
    """--tui hands the bus to the operator console (here headless) until the job ends; the
    console must have seen every round of the job."""
    import qflare.tui
    from qflare.tui.console import run_console_in_process

    apps: list[object] = []

    async def headless(bus, **kwargs):  # type: ignore[no-untyped-def]
        app = await run_console_in_process(bus, headless=True, **kwargs)
        apps.append(app)
        return app

    monkeypatch.setattr(qflare.tui, "run_console_in_process", headless)
    config = SimConfig(clients=5, byzantine=1, rounds=2)
    result = run_services(config, Federation.build(config), tui=True)
    assert result.ended == "completed" and len(result.rounds) == 2
    (app,) = apps
    state = app.state  # type: ignore[attr-defined]
    assert "sim" in state.jobs
    assert sorted(r for j, r in state.rounds if j == "sim") == [1, 2]


def test_updates_refused_at_ingest_are_reported_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """+inf updates never reach the detector: ingest refuses them (NON_FINITE), the
    aggregator counts the refused client as answered and closes the round without waiting
    for its deadline, and the report counts them as stopped — the same rounds as the direct
    path, which applies ingest's finiteness check itself."""
    import qflare.sim.services as services

    monkeypatch.setattr(services, "REJECTED_ROUND_DEADLINE_S", 60.0)
    config = SimConfig(clients=6, byzantine=1, rounds=2, attack="inf", rule="median")
    federation = Federation.build(config)
    via_services = run_services(config, federation)
    direct = run_direct(config, federation)
    assert comparable(via_services.to_json()) == comparable(direct.to_json())
    (byz,) = federation.byzantine
    assert all(r.rejected == (byz,) and byz not in r.flagged for r in via_services.rounds)
    assert via_services.detection.recall == 1.0
    assert all(r.latency_s < 30.0 for r in via_services.rounds), (
        "a refusal must not make the round wait"
    )


@pytest.mark.parametrize(
    ("detection", "coverage"), [("--no-detection", "clipped_sum"), ("--detection", "noise_only")]
)
def test_printed_summary_says_what_the_epsilon_covers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], detection: str, coverage: str
) -> None:
    code = main(
        [
            "simulate",
            "--clients",
            "6",
            "--byzantine",
            "0",
            "--attack",
            "none",
            "--rounds",
            "1",
            "--noise-multiplier",
            "2.0",
            detection,
            "--out",
            str(tmp_path / "dp"),
            "--direct",
            "--quiet",
        ]
    )
    assert code == 0
    printed = " ".join(capsys.readouterr().out.split())
    report = json.loads((tmp_path / "dp" / "report.json").read_text())
    assert report["summary"]["epsilon_coverage"] == coverage
    assert "epsilon covers" in printed
    assert ("NOT a DP guarantee" in printed) == (coverage == "noise_only")
