"""Bounded metrics and round configs (qflare.messages.values): the checks, the reason codes a
message carrying them is refused with, and the job spec's round_config / evaluate_fn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from qflare.messages import MessageRejected, Reason, Update
from qflare.messages.bodies import Evaluation, body_from_wire, body_to_wire
from qflare.messages.jobs import JobSpec
from qflare.messages.values import (
    MAX_CONFIG_BYTES,
    MAX_METRICS,
    check_metrics,
    check_round_config,
)

T = {"w": np.ones(2, np.float32)}


def reason(call, *args):  # type: ignore[no-untyped-def]
    with pytest.raises(MessageRejected) as exc:
        call(*args)
    return exc.value.reason


def test_metrics_are_finite_floats_by_bounded_names() -> None:
    got = check_metrics({"loss": 1, "acc": np.float32(0.5), "val/top-1": np.int64(3)})
    assert got == {"loss": 1.0, "acc": 0.5, "val/top-1": 3.0}
    assert all(type(v) is float for v in got.values())
    assert check_metrics({f"m{i}": 0.0 for i in range(MAX_METRICS)})


@pytest.mark.parametrize(
    "bad",
    [
        {"loss": math.nan},
        {"loss": math.inf},
        {"loss": -math.inf},
        {"loss": "0.5"},
        {"loss": True},
        {"loss": None},
        {"loss": [1.0]},
        {"x" * 65: 1.0},
        {"": 1.0},
        {"a b": 1.0},
        {"1st": 1.0},
        {f"m{i}": 1.0 for i in range(MAX_METRICS + 1)},
        [("loss", 1.0)],
    ],
)
def test_metrics_out_of_bounds_are_bad_metrics(bad: object) -> None:
    assert reason(check_metrics, bad) is Reason.BAD_METRICS


def test_an_update_with_bad_metrics_is_refused_with_bad_metrics() -> None:
    wire = body_to_wire(Update(base_version=0, num_samples=1, tensors=T, metrics={"loss": 0.1}))
    assert body_from_wire("update", wire).metrics == {"loss": 0.1}
    for bad in ({"loss": math.nan}, {f"m{i}": 1.0 for i in range(40)}):
        with pytest.raises(MessageRejected) as exc:
            body_from_wire("update", {**wire, "metrics": bad})
        assert exc.value.reason is Reason.BAD_METRICS and "metrics" in exc.value.detail
    evaluation = {"loss": math.inf, "num_examples": 3, "metrics": {}}
    with pytest.raises(MessageRejected) as exc:
        body_from_wire("update", {**wire, "evaluation": evaluation})
    assert exc.value.reason is Reason.BAD_METRICS and "evaluation.loss" in exc.value.detail
    # other schema faults keep their code
    with pytest.raises(MessageRejected) as exc:
        body_from_wire("update", {**wire, "evaluation": {"loss": 1.0, "num_examples": 0}})
    assert exc.value.reason is Reason.BAD_SCHEMA


def test_evaluation_of_what_an_evaluate_function_returns() -> None:
    assert Evaluation.of((0.5, 10, {"accuracy": 0.9})) == Evaluation(
        loss=0.5, num_examples=10, metrics={"accuracy": 0.9}
    )
    assert Evaluation.of((np.float32(2), np.int64(3))) == Evaluation(loss=2.0, num_examples=3)
    done = Evaluation(loss=1.0, num_examples=1)
    assert Evaluation.of(done) is done
    for shape in (0.5, (0.5,), [0.5, 10, {}], (0.5, 0), (0.5, 2.0), (0.5, True)):
        with pytest.raises(TypeError, match="evaluate"):
            Evaluation.of(shape, "evaluate()")
    for values in ((math.nan, 3), (0.5, 3, {"acc": math.inf}), (0.5, 3, {"a b": 1.0})):
        assert reason(Evaluation.of, values) is Reason.BAD_METRICS


def test_round_configs_are_bounded_json_like_maps() -> None:
    config = {"lr": 0.05, "epochs": 2, "on": True, "name": "sgd", "none": None}
    config |= {"milestones": [10, 20], "opt": {"momentum": 0.9, "betas": [0.9, 0.99]}}
    assert check_round_config(config) == config
    assert check_round_config({"t": (1, 2)}) == {"t": [1, 2]}
    too_large = [
        {"s": "x" * 1025},
        {"k" * 1025: 1},
        {"a": {"b": {"c": {"d": {"e": 1}}}}},
        {"a": list(range(300))},
        {f"k{i}": "x" * 1000 for i in range(20)},  # each fine, together > 16 KiB
    ]
    for bad in too_large:
        assert reason(check_round_config, bad) is Reason.TOO_LARGE, bad
    for bad in ({"lr": math.nan}, {"b": b"bytes"}, {1: "x"}, {"s": {1, 2}}, ["lr", 0.1]):
        assert reason(check_round_config, bad) is Reason.BAD_SCHEMA, bad
    assert MAX_CONFIG_BYTES == 16 * 1024


def test_round_opened_carries_a_checked_config() -> None:
    from qflare.messages import RoundOpened

    body = RoundOpened(
        model_version=0,
        model_digest=bytes(32),
        participants=["c-1"],
        deadline=1.0,
        min_updates=1,
        clip_norm=1.0,
        tensor_spec=[],
        rule="mean",
        model_offset=0,
        updates_from=0,
        config={"lr": 0.1},
    )
    wire = body_to_wire(body)
    assert body_from_wire("round.opened", wire).config == {"lr": 0.1}
    with pytest.raises(MessageRejected) as exc:
        body_from_wire("round.opened", {**wire, "config": {"s": "x" * 5000}})
    assert exc.value.reason is Reason.TOO_LARGE


def spec(**extra: object) -> JobSpec:
    return JobSpec.model_validate({"job_id": "j", "rounds": 2, "participants": ["a", "b"], **extra})


def test_a_job_declares_its_round_config_and_evaluate_fn() -> None:
    assert spec().round_config == {} and spec().evaluate_fn is None
    s = spec(round_config={"lr": 0.1, "sched": [1, 2]}, evaluate_fn="pkg.mod:evaluate")
    assert JobSpec.model_validate_json(s.model_dump_json()) == s
    assert s.public()["round_config"] == {"lr": 0.1, "sched": [1, 2]}
    assert spec(round_config="pkg.sched:config").round_config == "pkg.sched:config"


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"round_config": {"notes": "x" * 2000}}, "TOO_LARGE: round_config['notes'] has 2000"),
        ({"round_config": {"lr": math.inf}}, "BAD_SCHEMA: round_config['lr'] is inf"),
        ({"round_config": "no_colon"}, "round_config must be a module:function reference"),
        ({"evaluate_fn": "two words:f"}, "evaluate_fn must be a module:function reference"),
        ({"evaluate_fn": "mod:"}, "evaluate_fn must be a module:function reference"),
    ],
)
def test_a_bad_round_config_or_evaluate_fn_fails_the_job_spec(extra: dict, words: str) -> None:
    with pytest.raises(ValidationError) as exc:
        spec(**extra)
    assert words in str(exc.value)
