"""Option validation: impossible settings fail before anything starts, with exit code 2."""

from __future__ import annotations

import pytest

from qflare.cli import main
from qflare.privacy.policy import charge_of
from qflare.sim.config import SimConfig, SimConfigError, validate
from qflare.sim.robust_glue import resolve_rule_spec


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"rule": "krum", "clients": 10, "byzantine": 5, "detection": False},
            "needs n > 2f, got n=10, f=5",
        ),
        ({"rule": "bulyan", "clients": 20, "byzantine": 5}, r"n >= 4f \+ 3, got n=20, f=5"),
        ({"byzantine": 21}, "must be smaller than --clients"),
        ({"attack": "teleport"}, "unknown attack 'teleport'"),
        ({"rule": "nnm+wishful"}, "unknown rule 'wishful'"),
        ({"rule": "median+mean"}, "unknown pre-aggregator 'median'"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -0.5}, "alpha"),
        ({"byzantine": 0}, "needs --byzantine >= 1"),
        ({"rounds": 0}, "--rounds: Input should be greater than or equal to 1"),
        ({"lr": 0.0}, "--lr: Input should be greater than 0"),
        ({"clip": -1.0}, "--clip: Input should be greater than 0"),
        ({"clip": float("inf")}, "--clip: Input should be a finite number"),
        ({"delta": 1.0}, "--delta: Input should be less than 1"),
        ({"dataset": "imagenet"}, "unknown data set 'imagenet'"),
        ({"attack": "gaussian", "attack_options": {"sigma": -1.0}}, "sigma"),
        ({"byzantine": 10, "clients": 20, "rule": "mean"}, "detection needs 2f < n"),
        (
            {"clients": 4, "byzantine": 1, "sample_rate": 0.05, "rounds": 5},
            "selects nobody in round",
        ),
        ({"dp_filter_bound": 1}, "only applies with DP on"),
        ({"dp_filter_bound": 1, "noise_multiplier": 1.0, "detection": False}, "detection is off"),
        (
            {"dp_filter_bound": -1, "noise_multiplier": 1.0},
            "--dp-filter-bound: Input should be greater than or equal to 0",
        ),
        (
            {"dp_filter_bound": 1.5, "noise_multiplier": 1.0},
            "--dp-filter-bound: Input should be a valid integer",
        ),
        ({"clients": 1}, "--clients: Input should be greater than or equal to 2"),
        ({"sample_rate": 1.5}, "--sample-rate: Input should be less than or equal to 1"),
    ],
)
def test_impossible_settings_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(SimConfigError, match=message):
        validate(SimConfig(**changes))


def test_the_job_settings_are_the_job_specs() -> None:
    """A simulation is built on the job's settings: same fields, same checks (one home)."""
    from qflare.messages.jobs import JobSettings, JobSpec

    assert set(JobSettings.model_fields) <= set(SimConfig.model_fields)
    assert set(JobSettings.model_fields) <= set(JobSpec.model_fields)
    assert SimConfig().noise_multiplier == 0.0 and SimConfig().epsilon_budget is None
    for name in ("delta", "sample_rate", "dp_filter_bound", "seed"):
        assert SimConfig.model_fields[name].metadata == JobSettings.model_fields[name].metadata


def test_defaults_and_crude_attack_aliases_are_valid() -> None:
    validate(SimConfig())
    assert SimConfig(attack="sign-flip").attack == "sign_flip"
    assert SimConfig(attack="large-deviation").attack == "large"
    assert SimConfig(attack="min-max").attack == "minmax"
    validate(SimConfig(attack="optimal-alie", rule="nnm+multikrum"))


def test_rule_spec_gets_f_only_where_missing() -> None:
    assert resolve_rule_spec("nnm+multikrum", 6) == "nnm(f=6)+multikrum(f=6)"
    assert resolve_rule_spec("krum(f=2)", 6) == "krum(f=2)"
    assert resolve_rule_spec("mean", 6) == "mean"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rule", "krum", "--clients", "8", "--byzantine", "4", "--no-detection"], "n > 2f"),
        (["--byzantine", "30"], "smaller than --clients"),
        (["--attack", "nope"], "unknown attack"),
        (["--alpha", "0"], "alpha"),
        (["--broker", "http://x"], "--broker must start with"),
        (["--broker", "amqp://guest:guest@127.0.0.1:1/"], "cannot reach the broker at 127.0.0.1:1"),
        (
            ["--broker", "amqp://guest:guest@127.0.0.1:1/,amqp://guest:guest@127.0.0.1:2/"],
            "cannot reach the broker at 127.0.0.1:1 (Connection refused), 127.0.0.1:2",
        ),
        (["--broker", "amqp://g:g@127.0.0.1:1/,http://x/"], "each must be an amqp://"),
        (["--dataset", "fashion-mnist-typo"], "unknown data set"),
        (["--dp-filter-bound", "1"], "--dp-filter-bound 1 only applies with DP on"),
        (
            ["--dp-filter-bound", "2", "--noise-multiplier", "1", "--no-detection"],
            "detection is off",
        ),
        (
            ["--dp-filter-bound", "-1", "--noise-multiplier", "1"],
            "--dp-filter-bound: Input should be greater than or equal to 0",
        ),
    ],
)
def test_cli_exits_2_before_starting(argv: list[str], message: str, capsys, tmp_path) -> None:
    out = tmp_path / "out"
    code = main(["simulate", "--out", str(out), *argv])
    captured = capsys.readouterr()
    assert code == 2
    assert message in " ".join((captured.out + captured.err).split())
    assert not out.exists()


def test_cli_refuses_both_noise_and_target_epsilon(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--noise-multiplier", "1", "--target-epsilon", "3"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_names_the_debian_package_when_fashion_mnist_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path, capsys
) -> None:
    import qflare.sim.data as data

    monkeypatch.setitem(
        data._LOADERS, "fashion-mnist", lambda: data.load_fashion_mnist(tmp_path / "absent")
    )
    code = main(["simulate", "--dataset", "fashion-mnist", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "apt-get install dataset-fashion-mnist" in " ".join(capsys.readouterr().err.split())


def test_cli_lists_the_choices(capsys) -> None:
    assert main(["simulate", "--list"]) == 0
    out = capsys.readouterr().out
    assert "sign_flip" in out and "label_flip" in out and "multikrum" in out and "digits" in out


def test_tui_does_not_combine_with_the_direct_path(capsys) -> None:
    assert main(["simulate", "--tui", "--direct"]) == 2
    assert "--tui" in capsys.readouterr().err


def test_cli_refuses_a_filter_bound_that_is_not_an_integer(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--dp-filter-bound", "1.5", "--noise-multiplier", "1"])
    assert exc.value.code == 2
    assert "invalid int value: '1.5'" in capsys.readouterr().err


def test_a_filter_bound_with_dp_and_detection_is_valid_and_reaches_the_job() -> None:
    from qflare.sim.federation import client_ids
    from qflare.sim.services import job_spec

    config = SimConfig(noise_multiplier=1.0, dp_filter_bound=0)
    validate(config)
    spec = job_spec(config, client_ids(config.clients))
    assert spec.dp_filter_bound == 0 and charge_of(spec).coverage == "clipped_sum"
    spec = job_spec(config.with_(dp_filter_bound=2), client_ids(config.clients))
    assert spec.dp_filter_bound == 2 and charge_of(spec).coverage == "filter_bounded"


def test_a_target_epsilon_with_a_filter_bound_is_planned_at_the_charged_noise() -> None:
    """filter_bounded rounds are charged at z/(2k+1) with q=1: the planned z must keep the
    run at the target under that charge, not under (q, z)."""
    from qflare.privacy import epsilon
    from qflare.sim.run import plan_noise

    config = plan_noise(
        SimConfig(
            target_epsilon=8.0,
            dp_filter_bound=1,
            rounds=5,
            sample_rate=0.5,
            clients=40,
            byzantine=4,
        )
    )
    charged = config.noise_multiplier / 3
    spent = epsilon(1.0, charged, 5, config.delta)
    assert spent <= 8.0 and spent > 7.5, (config.noise_multiplier, spent)
    assert config.epsilon_budget == 8.0


def test_one_answering_node_of_a_cluster_list_is_enough() -> None:
    import socket

    from qflare.sim.run import check_broker_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        check_broker_reachable(f"amqp://g:g@127.0.0.1:1/,amqp://g:g@127.0.0.1:{port}/")
