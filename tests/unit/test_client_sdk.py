"""The participant SDK's pure parts: tensors in and out of torch, the kit, compute_update."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
import torch

from qflare.client import (
    Kit,
    LocalUpdate,
    Participant,
    RoundInfo,
    delta,
    load_tensors,
    model_tensors,
)
from qflare.crypto.testing import make_federation
from qflare.messages import MessageRejected, Reason, open_envelope
from qflare.messages.bodies import Evaluation


@pytest.fixture(scope="module")
def fed():
    return make_federation(clients=2)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


def full_kit(fed, client: str) -> Kit:  # type: ignore[no-untyped-def]
    """A kit as provisioned: the certificates of the three services that read updates."""
    return Kit(
        fed[client],
        fed.trust(),
        fed["ingest"].cert,
        aggregator_cert=fed["aggregator"].cert,
        detector_cert=fed["detector"].cert,
    )


def _info(client: str = "client-000", participants: tuple[str, ...] = ("client-000",)) -> RoundInfo:
    return RoundInfo(
        job="j1",
        round=1,
        client=client,
        model_version=0,
        model_digest=b"\0" * 32,
        deadline=1e12,
        clip_norm=1.0,
        participants=participants,
        rule="mean",
    )


def test_tensors_round_trip_through_the_state_dict_including_buffers() -> None:
    m = _model()
    t = model_tensors(m)
    # float state travels; an integer buffer (BatchNorm's num_batches_tracked) stays local
    assert set(t) == {k for k, v in m.state_dict().items() if v.is_floating_point()}
    zeros = {k: np.zeros_like(v) for k, v in t.items()}
    ro = {k: v.copy() for k, v in zeros.items()}
    for v in ro.values():
        v.flags.writeable = False  # as decoded from a message
    load_tensors(m, ro)
    assert all(float(v.abs().sum()) == 0 for v in m.state_dict().values())


def test_load_refuses_unknown_names_and_wrong_shapes() -> None:
    m = _model()
    with pytest.raises(MessageRejected) as e:
        load_tensors(m, {"nope": np.zeros(1, np.float32)})
    assert e.value.reason is Reason.SHAPE_MISMATCH
    with pytest.raises(MessageRejected):
        load_tensors(m, {"0.weight": np.zeros((3, 2), np.float32)})


def test_delta_is_local_minus_global_in_the_global_dtype() -> None:
    g = {"w": np.array([1.0, 2.0], np.float16)}
    d = delta({"w": np.array([1.5, 1.0], np.float32)}, g)
    assert d["w"].dtype == np.float16 and d["w"].tolist() == [0.5, -1.0]


def test_compute_update_trains_on_the_global_model_and_returns_the_delta(fed) -> None:
    kit = full_kit(fed, "client-000")
    m = torch.nn.Linear(2, 1)

    def train(model: torch.nn.Module, info: RoundInfo) -> int:
        assert info.selected
        with torch.no_grad():
            model.weight += 0.25
        return 7

    p = Participant(kit, m, train, jobs=["j"])
    g = {"weight": np.ones((1, 2), np.float32), "bias": np.zeros(1, np.float32)}
    up = p._make_update(g, _info())
    assert up.num_samples == 7
    np.testing.assert_allclose(up.tensors["weight"], 0.25)
    np.testing.assert_allclose(up.tensors["bias"], 0.0)


def test_update_transform_replaces_the_update(fed) -> None:
    kit = full_kit(fed, "client-000")

    def poison(update: dict[str, np.ndarray], info: RoundInfo) -> dict[str, np.ndarray]:
        return {k: -10.0 * v for k, v in update.items()}

    class Fixed(Participant):
        def compute_update(self, global_tensors, info):  # no torch at all
            return LocalUpdate({k: np.ones_like(v) for k, v in global_tensors.items()}, 3)

    p = Fixed(kit, None, None, update_transform=poison, jobs=["j"])
    up = p._make_update({"w": np.zeros(4, np.float32)}, _info())
    assert up.num_samples == 3 and up.tensors["w"].tolist() == [-10.0] * 4


def test_train_must_return_a_sample_count(fed) -> None:
    kit = full_kit(fed, "client-000")
    p = Participant(kit, torch.nn.Linear(1, 1), lambda model, info: None, jobs=["j"])
    with pytest.raises(TypeError, match="number of samples"):
        p._make_update({"weight": np.zeros((1, 1), np.float32)}, _info())


def test_participant_needs_train_jobs_and_the_readers_certificates_to_seal(fed) -> None:
    kit = full_kit(fed, "client-000")
    with pytest.raises(TypeError):
        Participant(kit, None, None, jobs=["j"])
    with pytest.raises(ValueError, match="name the jobs"):
        Participant(kit, None, lambda m, i: 1)
    # an update is sealed once for ingest, the aggregator and the detector: each is needed
    only_ingest = Kit(fed["client-000"], fed.trust(), fed["ingest"].cert)
    with pytest.raises(ValueError, match=r"lacks aggregator\.qc, detector\.qc"):
        Participant(only_ingest, None, lambda m, i: 1, jobs=["j"])
    assert [c.role for c in kit.readers] == ["ingest", "aggregator", "detector"]
    assert (
        Participant(
            Kit(fed["client-000"], fed.trust()), None, lambda m, i: 1, seal=False, jobs=["j"]
        ).id
        == "client-000"
    )


def test_kit_checks_roles_and_fills_broker_credentials(fed) -> None:
    with pytest.raises(ValueError, match="client identity"):
        Kit(fed["ingest"], fed.trust())
    with pytest.raises(ValueError, match="not ingest"):
        Kit(fed["client-000"], fed.trust(), fed["detector"].cert)
    with pytest.raises(ValueError, match="not aggregator"):
        Kit(fed["client-000"], fed.trust(), aggregator_cert=fed["ingest"].cert)
    kit = Kit(fed["client-000"], fed.trust(), broker_password="p@ss")
    assert kit.broker_url("amqp://h:5672/qflare") == "amqp://client-000:p%40ss@h:5672/qflare"
    assert kit.broker_url("amqp://u:x@h/") == "amqp://u:x@h/"
    assert kit.broker_url("memory://") == "memory://"


def test_kit_loads_from_a_provisioned_folder(tmp_path) -> None:
    from qflare.crypto import provision

    provision(tmp_path, clients=1)
    kit = Kit.load(tmp_path / "clients" / "client-000")
    assert kit.id == "client-000" and [c.role for c in kit.readers] == [
        "ingest",
        "aggregator",
        "detector",
    ]
    with pytest.raises(ValueError, match="not a client kit"):
        Kit.load(tmp_path)


def test_participant_follows_only_its_jobs(fed) -> None:
    kit = full_kit(fed, "client-001")
    p = Participant(kit, None, lambda m, i: 1, jobs=["b", "a", "b"])
    assert p.jobs == ("a", "b")


def test_evaluate_and_train_report_metrics_and_get_the_round_config(fed) -> None:
    kit = full_kit(fed, "client-000")
    seen: list[tuple[str, float, dict]] = []

    def evaluate(model: torch.nn.Module, info: RoundInfo) -> tuple[float, int, dict]:
        seen.append(("evaluate", model.weight.sum().item(), dict(info.config)))
        with torch.no_grad():
            model.weight += 100.0  # an evaluate that changes the model: train must not care
        return 0.5, 9, {"accuracy": np.float32(0.75)}

    def train(model: torch.nn.Module, info: RoundInfo) -> tuple[int, dict]:
        seen.append(("train", model.weight.sum().item(), dict(info.config)))
        with torch.no_grad():
            model.weight += info.config["lr"]
        return 7, {"loss": 0.25}

    p = Participant(kit, torch.nn.Linear(2, 1), train, evaluate=evaluate, jobs=["j"])
    g = {"weight": np.ones((1, 2), np.float32), "bias": np.zeros(1, np.float32)}
    info = replace(_info(), config={"lr": 0.5, "epochs": 1})
    up = p._make_update(g, info)
    assert seen == [("evaluate", 2.0, info.config), ("train", 2.0, info.config)]
    np.testing.assert_allclose(up.tensors["weight"], 0.5)
    assert (up.num_samples, up.metrics) == (7, {"loss": 0.25})
    assert up.evaluation == Evaluation(loss=0.5, num_examples=9, metrics={"accuracy": 0.75})
    # both travel in the signed update
    body = open_envelope(asyncio.run(p._encode(up, info)), fed.trust(), kem_key=fed["ingest"].kem)
    assert body.body.metrics == {"loss": 0.25} and body.body.evaluation == up.evaluation


def test_metrics_survive_update_transform_and_local_dp(fed) -> None:
    from qflare.privacy import LocalLaplace

    kit = full_kit(fed, "client-000")
    p = Participant(
        kit,
        torch.nn.Linear(2, 1),
        lambda model, info: (3, {"loss": 1.5}),
        evaluate=lambda model, info: (2.0, 4),
        update_transform=lambda update, info: {k: 2 * v for k, v in update.items()},
        local_dp=LocalLaplace(epsilon=1.0, clip=1.0, seed=1),
        jobs=["j"],
    )
    up = p._make_update(
        {"weight": np.ones((1, 2), np.float32), "bias": np.zeros(1, np.float32)}, _info()
    )
    assert up.metrics == {"loss": 1.5} and up.evaluation == Evaluation(loss=2.0, num_examples=4)


@pytest.mark.parametrize(
    ("train", "evaluate", "error"),
    [
        (lambda m, i: (3, {"loss": float("nan")}), None, "BAD_METRICS"),
        (lambda m, i: (3, {f"m{k}": 1.0 for k in range(33)}), None, "BAD_METRICS"),
        (lambda m, i: 3, lambda m, i: (float("inf"), 3, {}), "BAD_METRICS"),
        (lambda m, i: (0, {"loss": 1.0}), None, "number of samples"),
        (lambda m, i: 3, lambda m, i: {"loss": 1.0}, "must return"),
    ],
)
def test_metrics_out_of_bounds_are_refused_before_sending(fed, train, evaluate, error) -> None:
    p = Participant(
        full_kit(fed, "client-000"), torch.nn.Linear(1, 1), train, evaluate=evaluate, jobs=["j"]
    )
    with pytest.raises((MessageRejected, TypeError), match=error):
        p._make_update(
            {"weight": np.zeros((1, 1), np.float32), "bias": np.zeros(1, np.float32)}, _info()
        )


def test_the_sdk_does_not_load_torch_until_a_torch_model_needs_it() -> None:
    """A participant that computes its update without torch (numpy, a simulator) never pays
    for importing it: about 190 MB of resident memory, which counts against a participant
    of a large model (issue 12: under 2.5x the model's size)."""
    import subprocess
    import sys

    code = "import sys, qflare.client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
