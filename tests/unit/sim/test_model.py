"""Models, deterministic local training and evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from qflare.messages.tensors import Layout
from qflare.sim.data import load_digits
from qflare.sim.model import (
    TrainConfig,
    build_model,
    evaluate,
    get_params,
    local_update,
    set_deterministic,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_local_update_is_deterministic_per_seed_round_client(digits) -> None:
    set_deterministic()
    model = build_model("mlp", (64,), 10, seed=0)
    start = get_params(model)
    shard = digits.train.subset(np.arange(80))
    cfg = TrainConfig(local_epochs=1, lr=0.1, batch_size=16)
    a = local_update(model, start, shard, cfg, seed=0, round_index=1, client_index=2)
    b = local_update(build_model("mlp", (64,), 10, seed=0), start, shard, cfg, 0, 1, 2)
    c = local_update(model, start, shard, cfg, seed=0, round_index=2, client_index=2)
    flat = Layout.of(start).flatten
    np.testing.assert_array_equal(flat(a), flat(b))
    assert not np.array_equal(flat(a), flat(c))
    assert np.linalg.norm(flat(a)) > 0


def test_training_improves_accuracy_and_eval_is_sane(digits) -> None:
    set_deterministic()
    model = build_model("mlp", (64,), 10, seed=0)
    start = get_params(model)
    before = evaluate(model, start, digits.test)
    delta = local_update(model, start, digits.train, TrainConfig(2, 0.1, 32), 0, 1, 0)
    after = evaluate(model, {k: start[k] + delta[k] for k in start}, digits.test)
    assert after.accuracy > max(0.8, before.accuracy + 0.5)
    assert after.loss < before.loss
    broken = {k: np.full_like(v, np.nan) for k, v in start.items()}
    assert evaluate(model, broken, digits.test).accuracy == 0.0


def test_cnn_on_images_and_flat_round_trip(digits) -> None:
    model = build_model("cnn", (64,), 10, seed=0)
    params = get_params(model)
    layout = Layout.of(params)
    assert all(v.dtype == np.float32 for v in params.values())
    back = layout.unflatten(layout.flatten(params))
    for k in params:
        np.testing.assert_array_equal(back[k], params[k])
        assert back[k].shape == params[k].shape and back[k].dtype == np.float32
    assert 0.0 <= evaluate(model, params, digits.test).accuracy <= 1.0
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet", (64,), 10, seed=0)


def test_linear_is_logistic_regression_and_learns(digits) -> None:
    set_deterministic()
    model = build_model("linear", (64,), 10, seed=0)
    params = get_params(model)
    assert {k: v.shape for k, v in params.items()} == {"1.weight": (10, 64), "1.bias": (10,)}
    assert Layout.of(params).size == 650
    before = evaluate(model, params, digits.test)
    delta = local_update(model, params, digits.train, TrainConfig(2, 0.1, 32), 0, 1, 0)
    after = evaluate(model, {k: params[k] + delta[k] for k in params}, digits.test)
    assert after.accuracy > max(0.8, before.accuracy + 0.5)
