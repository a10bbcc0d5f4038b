"""A round's metrics from its kept updates (core.weighted_means / core.round_metrics): pure."""

from __future__ import annotations

import itertools

import pytest

from qflare.messages.bodies import Evaluation
from qflare.services.aggregator.core import Report, round_metrics, weighted_means


def test_each_name_is_weighted_by_the_entries_that_report_it() -> None:
    got = weighted_means([(1.0, {"loss": 4.0, "acc": 0.5}), (3.0, {"loss": 0.0})])
    assert got == {"loss": pytest.approx(1.0), "acc": pytest.approx(0.5)}  # acc: only the first
    assert weighted_means([]) == {}
    assert weighted_means([(2.0, {})]) == {}


def test_the_names_kept_are_those_with_the_most_weight() -> None:
    entries = [(10.0, {"common": 1.0}), (1.0, {"rare_b": 2.0, "rare_a": 3.0, "zzz": 4.0})]
    assert list(weighted_means(entries, limit=2)) == ["common", "rare_a"]  # tie by name
    many = [(1.0, {f"m{i:02d}": float(i) for i in range(32)}) for _ in range(3)]
    many.append((0.5, {f"x{i:02d}": 1.0 for i in range(32)}))  # a client inventing names
    assert sorted(weighted_means(many)) == [f"m{i:02d}" for i in range(32)]


def test_round_metrics_weights_training_by_samples_and_evaluation_by_examples() -> None:
    reports = [
        Report("c-2", 30, {"loss": 1.0}, Evaluation(loss=2.0, num_examples=10)),
        Report(
            "c-1",
            10,
            {"loss": 3.0, "acc": 0.2},
            Evaluation(loss=4.0, num_examples=30, metrics={"acc": 0.6}),
        ),
        Report("c-3", 60),  # an update without metrics (an older SDK, or none reported)
    ]
    got = round_metrics(reports, base_version=4)
    assert got == {
        "train": {
            "clients": 2,
            "num_samples": 40,
            "metrics": {"acc": pytest.approx(0.2), "loss": pytest.approx((10 * 3 + 30 * 1) / 40)},
        },
        "evaluate": {
            "model_version": 4,
            "clients": 2,
            "num_examples": 40,
            "loss": pytest.approx((10 * 2 + 30 * 4) / 40),
            "metrics": {"acc": pytest.approx(0.6)},
        },
    }
    assert round_metrics([Report("c-3", 60)], base_version=0) == {}


def test_round_metrics_do_not_depend_on_the_order_of_the_reports() -> None:
    reports = [
        Report(f"c-{i}", n, {"loss": v}, Evaluation(loss=v + 1, num_examples=n + 1))
        for i, (n, v) in enumerate([(7, 0.1), (11, 0.7), (13, 1e-9), (17, 123.0)])
    ]
    first = round_metrics(reports, 0)
    for order in itertools.permutations(reports):
        assert round_metrics(list(order), 0) == first  # bit for bit (fsum in client order)
