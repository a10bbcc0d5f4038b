"""The Flower bridge's pure part: how the global model becomes the list a ``NumPyClient``
expects and how ``fit``'s answer becomes the update. The client here follows the
``NumPyClient`` protocol by duck typing (the bridge needs nothing else); the job test
(tests/integration/test_flower_bridge_job.py) uses Flower's own class."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from qflare.client import Kit, RoundInfo
from qflare.client.flower import FlowerParticipant, initial_tensors, round_config
from qflare.crypto.testing import make_federation
from qflare.messages import MessageRejected, Reason


@pytest.fixture(scope="module")
def kit() -> Kit:
    fed = make_federation(clients=1)
    return Kit(
        fed["client-000"],
        fed.trust(),
        fed["ingest"].cert,
        aggregator_cert=fed["aggregator"].cert,
        detector_cert=fed["detector"].cert,
    )


INFO = RoundInfo("j", 4, "client-000", 3, b"\0" * 32, 1e12, 2.5, ("client-000",), "mean")


class StateDictClient:
    """A client in the style of Flower's PyTorch examples: the parameters are the model's
    state dict in its order, an int64 batch counter included; fit adds 1 to every weight
    and counts its steps."""

    def __init__(self) -> None:
        self.state: dict[str, np.ndarray] = {
            "fc.weight": np.zeros((2, 3), np.float32),
            "fc.bias": np.zeros(2, np.float32),
            "bn.running_mean": np.zeros(2, np.float32),
            "bn.num_batches_tracked": np.array(7, np.int64),
        }
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return [v.copy() for v in self.state.values()]

    def set_parameters(self, parameters: list[np.ndarray]) -> None:
        self.state = dict(zip(self.state, (np.array(p) for p in parameters), strict=True))

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        self.calls.append(("fit", config))
        self.set_parameters(parameters)
        for k in ("fc.weight", "fc.bias", "bn.running_mean"):
            self.state[k] = self.state[k] + 1.0
        self.state["bn.num_batches_tracked"] = self.state["bn.num_batches_tracked"] + 3
        return self.get_parameters({}), 42, {"train_loss": 0.5}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        self.calls.append(("evaluate", config))
        return float(np.abs(parameters[0]).sum()), 10, {"accuracy": 0.75}


def test_initial_tensors_name_the_float_arrays_in_the_clients_order() -> None:
    t = initial_tensors(StateDictClient())
    assert list(t) == ["p0000", "p0001", "p0002"]  # sorted == the client's order
    assert [v.shape for v in t.values()] == [(2, 3), (2,), (2,)]
    named = initial_tensors(StateDictClient(), names=["fc.weight", "fc.bias", "bn.mean"])
    assert list(named) == ["fc.weight", "fc.bias", "bn.mean"]
    with pytest.raises(ValueError, match="2 names for the client's 3 floating-point arrays"):
        initial_tensors(StateDictClient(), names=["a", "b"])


def test_fit_on_the_global_model_becomes_the_update(kit: Kit) -> None:
    client = StateDictClient()
    p = FlowerParticipant(kit, client, jobs=["j"], evaluate_rounds=True)
    g = {k: np.full_like(v, 2.0) for k, v in initial_tensors(client).items()}
    update = p._make_update(g, INFO)
    assert update.num_samples == 42
    assert set(update.tensors) == set(g)
    for k in g:
        np.testing.assert_array_equal(update.tensors[k], 1.0)  # new (3) - global (2)
        assert update.tensors[k].dtype == np.float32
    # fit saw the global model in its float slots and its own counter in the int slot
    assert client.state["fc.weight"].tolist() == [[3.0] * 3] * 2
    assert int(client.state["bn.num_batches_tracked"]) == 10
    assert p.fit_metrics[("j", 4)] == {"train_loss": 0.5}
    config = round_config(INFO)
    assert config == {"server_round": 4, "job": "j", "model_version": 3, "clip_norm": 2.5}
    assert client.calls == [("evaluate", config), ("fit", config)]
    (ev,) = p.evaluations
    assert (ev.job, ev.model_version, ev.loss, ev.num_examples) == ("j", 3, 12.0, 10)
    assert ev.metrics == {"accuracy": 0.75}


def test_names_map_the_jobs_tensors_to_the_clients_order(kit: Kit) -> None:
    client = StateDictClient()
    names = ["fc.weight", "fc.bias", "bn.running_mean"]  # sorted, the job's order differs
    p = FlowerParticipant(kit, client, jobs=["j"], names=names)
    g = {
        "fc.weight": np.full((2, 3), 5.0, np.float32),
        "fc.bias": np.full(2, 6.0, np.float32),
        "bn.running_mean": np.full(2, 7.0, np.float32),
    }
    update = p._make_update(g, INFO)
    assert client.state["fc.bias"].tolist() == [7.0, 7.0]  # got 6, fit added 1
    assert all((update.tensors[k] == 1.0).all() for k in g)


def test_the_final_model_is_evaluated(kit: Kit) -> None:
    client = StateDictClient()
    p = FlowerParticipant(kit, client, jobs=["j"])
    assert p.evaluate_final("j") is None  # no model yet
    g = {k: np.ones_like(v) for k, v in initial_tensors(client).items()}
    p.models["j"] = {5: (b"\0" * 32, g)}
    ev = p.evaluate_final("j")
    assert ev is not None and ev.model_version == 5 and ev.loss == 6.0
    assert client.calls[-1] == ("evaluate", {"server_round": 5, "job": "j", "model_version": 5})


class _Returns(StateDictClient):
    def __init__(self, fit_result: Any) -> None:
        super().__init__()
        self.fit_result = fit_result

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        return self.fit_result


@pytest.mark.parametrize(
    ("result", "error", "message"),
    [
        pytest.param([np.zeros(1)], TypeError, "fit must return a tuple", id="not-a-tuple"),
        pytest.param(([], 3), TypeError, "fit must return a tuple", id="two-items"),
        pytest.param(
            ([np.zeros((2, 3))], 3, {}), ValueError, "fit returned 1 arrays", id="too-few"
        ),
        pytest.param(
            ([np.zeros((3, 2)), np.zeros(2), np.zeros(2), np.array(1)], 3, {}),
            ValueError,
            "fit returned shape (3, 2) for array 0",
            id="wrong-shape",
        ),
        pytest.param(
            ([np.zeros((2, 3)), np.zeros(2), np.zeros(2), np.array(1)], 0, {}),
            TypeError,
            "num_examples must be an int >= 1, got 0",
            id="no-examples",
        ),
        pytest.param(
            ([np.zeros((2, 3)), np.zeros(2), np.zeros(2), np.array(1)], True, {}),
            TypeError,
            "num_examples must be an int >= 1, got True",
            id="bool-examples",
        ),
    ],
)
def test_a_fit_that_breaks_flowers_contract_is_named(
    kit: Kit, result: Any, error: type[Exception], message: str
) -> None:
    client = _Returns(result)
    p = FlowerParticipant(kit, client, jobs=["j"])
    g = initial_tensors(StateDictClient())
    with pytest.raises(error) as err:
        p._make_update(g, INFO)
    assert message in str(err.value)


def test_a_model_that_does_not_fit_the_client_is_rejected(kit: Kit) -> None:
    p = FlowerParticipant(kit, StateDictClient(), jobs=["j"])
    with pytest.raises(MessageRejected) as err:
        p._make_update({"p0000": np.zeros((2, 3), np.float32)}, INFO)
    assert err.value.reason is Reason.SHAPE_MISMATCH
    assert "3 floating-point arrays (of 4), the job's model 1 tensors" in err.value.detail
    g = initial_tensors(StateDictClient())
    g["p0001"] = np.zeros(5, np.float32)
    with pytest.raises(MessageRejected, match=r"array 1 of the Flower client has shape \(2,\)"):
        p._make_update(g, INFO)


def test_a_client_without_the_numpyclient_methods_is_refused(kit: Kit) -> None:
    class NoFit:
        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return []

    with pytest.raises(TypeError, match="NoFit has no fit\\(\\); a Flower NumPyClient has"):
        FlowerParticipant(kit, NoFit(), jobs=["j"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="names must be distinct"):
        FlowerParticipant(kit, StateDictClient(), jobs=["j"], names=["a", "a", "b"])
