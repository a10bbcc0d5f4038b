"""The evaluation protocol (qflare.sim.protocol): seed sets, metrics, and a small real run."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest

from qflare.robust.attacks import get_attack
from qflare.sim.config import SimConfig, SimConfigError
from qflare.sim.protocol import (
    DEFENCES,
    MAX_SEEDS,
    ProtocolPlan,
    execute_protocol,
    plan_protocol,
    protocol_seeds,
    run_metrics,
    summary_rows,
    write_protocol,
)
from qflare.sim.report import RoundRecord, RunResult
from qflare.sim.seed_sets import SEED_SETS


def _first_seed(name: str) -> int:
    """The published rule: tune starts at 0, heldout at 1000, heldoutN at N * 1000 (a table
    names its set; changing a set's seeds would change every table run on it)."""
    if name == "tune":
        return 0
    match = re.fullmatch(r"heldout(\d*)", name)
    assert match is not None, f"seed set {name!r} is neither tune nor heldoutN"
    return 1000 * int(match[1] or 1)


def test_seed_sets_are_fixed_and_disjoint() -> None:
    assert {"tune", "heldout"} <= SEED_SETS.keys()
    for name in SEED_SETS:
        first = _first_seed(name)
        assert SEED_SETS[name] == first, name
        assert protocol_seeds(name, 3) == (first, first + 1, first + 2)
    sets = [set(protocol_seeds(name, MAX_SEEDS)) for name in SEED_SETS]
    assert sum(map(len, sets)) == len(set().union(*sets))  # disjoint
    with pytest.raises(SimConfigError, match="--seed-set"):
        protocol_seeds("lucky", 3)
    with pytest.raises(SimConfigError, match="--seeds"):
        protocol_seeds("tune", 0)


def test_plan_checks_every_condition() -> None:
    plan = plan_protocol(
        SimConfig(), seeds=2, attacks="none,sign-flip", populations="20/6,12/3", alphas="0.1,1"
    )
    assert len(plan.conditions) == 2 * 2 * 2 and plan.seeds == (0, 1)
    assert {c.attack for c in plan.conditions} == {"none", "sign_flip"}
    with pytest.raises(SimConfigError, match="protocol 10/5"):
        plan_protocol(SimConfig(), attacks="sign_flip", populations="10/5", alphas="0.5")
    with pytest.raises(SimConfigError, match="CLIENTS/BYZANTINE"):
        plan_protocol(SimConfig(), populations="20-6")


def _rec(n: int, participants: tuple[str, ...], flagged: tuple[str, ...]) -> RoundRecord:
    return RoundRecord(n, 0.5, 1.0, participants, flagged, ("a",), None, 0.0)


def test_metrics_count_pairs_and_the_most_excluded_honest_client() -> None:
    rounds = [
        _rec(1, ("a", "b", "c"), ("a", "b")),
        _rec(2, ("a", "b", "c"), ("b",)),
        _rec(3, ("a", "b"), ()),
        _rec(4, ("a", "c"), ("a", "c")),
    ]
    result = RunResult({}, rounds, ("a",), "direct", None, 1.0)
    m = run_metrics(result, "sign_flip")
    assert m.recall == pytest.approx(2 / 4)
    assert m.false_positive_rate == pytest.approx(3 / 6)
    # b: excluded in 2 of its 3 rounds; c: 1 of 3
    assert m.excluded_most == "b" and m.honest_exclusion == pytest.approx(2 / 3)
    # with no attack every client is honest: a's flags are false positives
    clean = run_metrics(result, "none")
    assert clean.recall is None and clean.false_positive_rate == pytest.approx(5 / 10)
    assert clean.excluded_most == "b" and clean.honest_exclusion == pytest.approx(2 / 3)


def test_noisy_coalitions_are_not_copies() -> None:
    h = np.random.default_rng(0).normal(size=(12, 400)).astype(np.float32)
    for name, base in (("noisy_alie", "alie"), ("noisy_ipm", "ipm")):
        out = get_attack(name)(h, 5, rng=1)
        centre = get_attack(base)(h, 1)[0]
        spread = np.linalg.norm(h - h.mean(axis=0), axis=1).mean()
        gaps = [np.linalg.norm(out[i] - out[j]) for i in range(5) for j in range(i + 1, 5)]
        assert min(gaps) > 0.5 * spread  # as far apart as honest updates, not near-copies
        assert np.linalg.norm(out.mean(axis=0) - centre) < spread  # around the attack's vector
        assert np.array_equal(get_attack(name, noise=0)(h, 3, rng=1)[1], centre)


def _tiny_plan(attacks: str, seeds: int, defences: str | None = None) -> ProtocolPlan:
    """A protocol of 10 clients / 3 Byzantine at alpha 0.5, 2 rounds of 1 local epoch."""
    return plan_protocol(
        SimConfig(rounds=2, local_epochs=1),
        seed_set="tune",
        seeds=seeds,
        attacks=attacks,
        populations="10/3",
        alphas="0.5",
        defences=defences,
    )


def test_small_protocol_run(tmp_path: Path) -> None:
    """A real (direct-path) run of a tiny grid: the report's shape, and the oracle and the
    undefended rows as their definitions say."""
    plan = _tiny_plan("none,sign_flip,label_flip", seeds=2)
    runs = execute_protocol(plan)
    assert len(runs.runs) == len(plan.conditions) * len(plan.seeds) * len(DEFENCES)
    for (cond, defence, _seed), m in runs.runs.items():
        attacked = cond.attack != "none"
        if defence == "oracle":
            assert m.recall == (1.0 if attacked else None)
            assert m.false_positive_rate == 0.0 and m.honest_exclusion == 0.0
        if defence == "none":
            assert m.recall == (0.0 if attacked else None)  # no attack here is non-finite
            assert m.false_positive_rate == 0.0 and m.honest_exclusion == 0.0
    rows = summary_rows(runs)
    assert len(rows) == len(plan.conditions) * len(DEFENCES)
    oracle_rows = [r for r in rows if r["defence"] == "oracle"]
    assert all(r["gap_to_oracle_points"] == {"worst": 0.0, "median": 0.0} for r in oracle_rows)
    flip = next(r for r in rows if r["attack"] == "sign_flip" and r["defence"] == "none")
    assert flip["undefended_harm_points"]["worst"] >= flip["undefended_harm_points"]["median"]
    assert flip["accuracy"]["worst"] <= flip["accuracy"]["median"]
    written = write_protocol(tmp_path, runs, wall_s=1.0, command="qflare simulate --protocol")
    data = json.loads(written[0].read_text())
    assert data["seed_set"] == "tune" and data["seeds"] == [0, 1]
    assert len(data["runs"]) == len(runs.runs) and len(data["summary"]) == len(rows)
    md = written[1].read_text()
    assert "Reproduce: `qflare simulate --protocol`" in md
    assert "| 10/3 | 0.5 | sign_flip |" in md


def test_the_cli_offers_exactly_the_seed_sets_and_names_their_first_seeds() -> None:
    from qflare.cli import ArgumentError, build_parser

    parser = build_parser()
    for name in SEED_SETS:
        args = parser.parse_args(["simulate", "--protocol", "--seed-set", name])
        assert args.seed_set == name
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    simulate = subparsers.choices["simulate"]
    (seed_set,) = (a for a in simulate._actions if a.dest == "seed_set")
    assert seed_set.choices is not None and list(seed_set.choices) == list(SEED_SETS)
    assert seed_set.default in SEED_SETS and seed_set.help is not None
    for name, first in SEED_SETS.items():
        assert f"{name}: seeds {first}, {first + 1}, ..." in seed_set.help
    with pytest.raises(ArgumentError, match="--seed-set: invalid choice: 'lucky'"):
        parser.parse_args(["simulate", "--protocol", "--seed-set", "lucky"])


def test_a_protocol_of_some_defences(tmp_path: Path) -> None:
    """--protocol-defences runs only those asked: without none no harm, without oracle no
    gap; the oracle of a no-attack condition runs itself when none is not run."""
    plan = _tiny_plan("none,sign_flip", seeds=1, defences="oracle, detect")
    assert plan.defences == ("detect", "oracle")  # the protocol's order
    runs = execute_protocol(plan)
    assert {d for (_c, d, _s) in runs.runs} == {"detect", "oracle"}
    rows = summary_rows(runs)
    assert len(rows) == len(plan.conditions) * 2
    assert all(r["undefended_harm_points"] == {"worst": None, "median": None} for r in rows)
    assert all(r["gap_to_oracle_points"]["worst"] is not None for r in rows)
    clean = next(m for (c, d, _s), m in runs.runs.items() if c.attack == "none" and d == "oracle")
    assert clean.false_positive_rate == 0.0 and clean.recall is None
    only = execute_protocol(_tiny_plan("none", seeds=1, defences="detect"))
    rows = summary_rows(only)
    assert [r["defence"] for r in rows] == ["detect"]
    assert rows[0]["gap_to_oracle_points"] == {"worst": None, "median": None}
    written = write_protocol(tmp_path, only, wall_s=1.0, command="x")
    assert json.loads(written[0].read_text())["defences"] == ["detect"]
    assert "| detect | " in written[1].read_text() and "n/a (n/a)" in written[1].read_text()


@pytest.mark.parametrize("text", ["", " , ", "detect,best", "oracles"])
def test_protocol_defences_are_checked(text: str) -> None:
    with pytest.raises(SimConfigError, match="--protocol-defences"):
        plan_protocol(
            SimConfig(), seeds=1, attacks="none", populations="10/3", alphas="0.5", defences=text
        )
