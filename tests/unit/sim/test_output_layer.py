"""The job's output layer (JobSpec.output_layer): its form checked with the spec, its
names and shapes against the model, and the simulator naming its models' own."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from qflare.messages.jobs import JobSpec
from qflare.messages.tensors import Layout
from qflare.services.detector.core import OutputLayer
from qflare.sim.config import SimConfig, SimConfigError
from qflare.sim.federation import Federation
from qflare.sim.model import OUTPUT_LAYERS, build_model, get_params


def _spec(**changes: Any) -> JobSpec:
    return JobSpec(job_id="j", participants=("a", "b", "c"), rounds=1, **changes)


def test_a_job_names_its_output_layer_or_none() -> None:
    assert _spec().output_layer is None
    assert _spec(output_layer=["fc.weight", "fc.bias"]).output_layer == ("fc.weight", "fc.bias")
    assert _spec(output_layer=("w", "b")).public()["output_layer"] == ["w", "b"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["fc.weight", "fc.weight"], "two different tensors"),
        (["", "fc.bias"], "two different tensors"),
        (["fc.weight"], "Field required"),
        (["a", "b", "c"], "Tuple should have at most 2 items"),
        ("fc", "valid tuple"),
        ([1, 2], "valid string"),
    ],
    ids=["same", "empty", "one", "three", "string", "numbers"],
)
def test_an_output_layer_that_is_not_two_names_is_refused(value: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _spec(output_layer=value)


@pytest.mark.parametrize("model", sorted(OUTPUT_LAYERS))
def test_the_built_in_models_name_their_last_linear_layer(model: str) -> None:
    params = get_params(build_model(model, (64,), 10, 0))
    out = OutputLayer.of(Layout.of(params), OUTPUT_LAYERS[model])
    assert out.classes == 10 and list(params)[-2:] == list(OUTPUT_LAYERS[model])
    assert SimConfig(model=model).output_layer == OUTPUT_LAYERS[model]


def test_a_simulation_names_its_model_s_output_layer_unless_told() -> None:
    config = SimConfig()
    assert config.output_layer == OUTPUT_LAYERS["mlp"]
    assert config.with_(model="cnn").output_layer == OUTPUT_LAYERS["cnn"]
    assert config.with_(seed=3).output_layer == OUTPUT_LAYERS["mlp"]
    off = SimConfig(output_layer=None)
    assert off.output_layer is None and off.with_(seed=3).output_layer is None
    assert SimConfig(output_layer=("0.weight", "0.bias")).with_(model="cnn").output_layer == (
        "0.weight",
        "0.bias",
    )


def test_a_simulation_whose_output_layer_the_model_lacks_is_refused() -> None:
    config = SimConfig(clients=4, byzantine=1, output_layer=("3.weight", "1.bias"))
    with pytest.raises(SimConfigError, match=r"--model mlp: .* '1\.bias' \[64\]"):
        Federation.build(config)
    with pytest.raises(SimConfigError, match=r"'fc\.w', which the model does not have"):
        Federation.build(config.with_(output_layer=("fc.w", "fc.b")))
    assert np.isfinite(Federation.build(config.with_(output_layer=None)).initial["3.bias"]).all()
