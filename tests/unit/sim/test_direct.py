"""The direct path carries the adaptive clip norm from round to round."""

from __future__ import annotations

import pytest

from qflare.sim.config import SimConfig
from qflare.sim.direct import run_direct
from qflare.sim.federation import Federation


@pytest.fixture(scope="module")
def federation() -> Federation:
    return Federation.build(_config())


def _config(**changes: object) -> SimConfig:
    base = SimConfig(
        clients=6, byzantine=0, attack="none", detection=False, rounds=3, local_epochs=1, clip=0.05
    )
    return base.with_(**changes)


def test_adaptive_clipping_moves_the_clip_from_the_second_round_on(federation: Federation) -> None:
    # every update is far above clip 0.05: the clip grows, and only later rounds see it
    fixed = run_direct(_config(), federation)
    adaptive = run_direct(_config(adaptive_clip=True), federation)
    assert fixed.rounds[0].loss == adaptive.rounds[0].loss
    assert fixed.rounds[1].loss != adaptive.rounds[1].loss
    assert [r.clip for r in fixed.rounds] == [0.05] * 3
    clips = [r.clip for r in adaptive.rounds]
    assert clips[0] == 0.05 and clips[0] < clips[1] < clips[2]  # exp(0.2 * 0.5) per round


def test_adaptive_clipping_with_dp_on_runs_and_charges_z(federation: Federation) -> None:
    config = _config(noise_multiplier=0.5, epsilon_budget=1e6, sample_rate=1.0)
    result = run_direct(config.with_(adaptive_clip=True, clip_count_noise_std=1.0), federation)
    plain = run_direct(config, federation)
    assert len(result.rounds) == 3 and result.ended == "completed"
    # the accountant charges z whatever the split: the same epsilon as without adaptive
    assert [r.epsilon for r in result.rounds] == [r.epsilon for r in plain.rounds]


def test_the_direct_path_drives_the_aggregators_round_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each round is the services' state machine fed what the services would feed it: the
    grant, each participant's update (ingest refuses the non-finite ones; the coalition's
    come after the honest ones, as an attack built from them must), the clock, the
    detector's verdict; what follows (the next round, the job's end) is the machine's."""
    import qflare.sim.direct as direct
    from qflare.services.aggregator import core

    seen: list[tuple[int, str]] = []

    def spy(spec: core.JobSpec, r: core.Round, event: core.Input, now: float) -> core.Step:
        seen.append((r.round, type(event).__name__))
        return core.step(spec, r, event, now)

    monkeypatch.setattr(direct, "step", spy)
    config = _config(rounds=2, byzantine=1, attack="inf")
    result = run_direct(config, Federation.build(config))
    assert result.ended == "completed" and len(result.rounds) == 2
    for n, record in enumerate(result.rounds, 1):
        (byz,) = record.rejected
        inputs = [kind for r, kind in seen if r == n]
        assert inputs == [
            "Granted",
            *("Accepted" for c in record.participants if c != byz),
            "Refused",
            "Tick",
            "Verdict",
        ]


def test_mimic_flags_the_copies_and_keeps_the_copied_client() -> None:
    """Mimic's coalition sends one honest client's update; the direct path sends the
    coalition's updates after the honest ones (an attack built from them must), so the
    detector keeps the original and flags only the copies, as the oracle does: the same
    model."""
    config = SimConfig(
        clients=10, byzantine=3, attack="mimic", detection=True, rounds=2, local_epochs=1
    )
    fed = Federation.build(config)
    detected = run_direct(config, fed)
    oracle = run_direct(config, fed, oracle=True)
    for record in detected.rounds:
        assert record.flagged == tuple(sorted(fed.byzantine)), record.flagged
    assert [r.loss for r in detected.rounds] == [r.loss for r in oracle.rounds]
