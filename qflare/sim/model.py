"""Small torch models, deterministic local training and evaluation for simulations.

Parameters travel as ``dict[str, numpy.ndarray]`` (float32, the model's ``state_dict``
order), the shape the wire format and safetensors files use; robust rules and attacks see
the same numbers as one flat vector in sorted-name order, through the services' own
:class:`qflare.messages.tensors.Layout`.

Determinism: every client's local training draws its batch order from a generator seeded
by ``(seed, round, client)`` and torch runs on one thread, so two runs with the same seed
give bit-identical updates whichever bus carries them.

Models by name: ``linear``, ``mlp`` and ``cnn``, any builder added with :func:`register_model`, an
installed entry point of the group ``qflare.models``, or ``module:function``; a builder is
``builder(sample_shape, num_classes) -> nn.Module`` and runs after ``torch.manual_seed``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qflare.robust import PluginNames
from qflare.sim.data import ArrayDataset, callable_plugin

Params = dict[str, np.ndarray]

#: ``builder(sample_shape, num_classes) -> nn.Module``, called after ``torch.manual_seed``
ModelBuilder = Callable[[tuple[int, ...], int], nn.Module]

#: entry-point group of installed model builders
MODELS_GROUP = "qflare.models"


def set_deterministic() -> None:
    """One intra-op thread: parallel reductions may change the order of float sums."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _linear(sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """flatten -> classes: multinomial logistic regression (digits: 650 parameters). The
    fewest parameters of the built-in models, so DP's noise, whose norm grows with the
    square root of the parameter count, costs it the least (docs/privacy.md, "DP that
    learns")."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(sample_shape)), num_classes))


def _mlp(sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """flatten -> 64 -> ReLU -> classes (digits: 4810 parameters)."""
    in_features = int(np.prod(sample_shape))
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_features, 64), nn.ReLU(), nn.Linear(64, num_classes)
    )


def _cnn(sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two 3x3 conv layers (16 and 32 channels) with 2x2 max-pooling, then a linear layer;
    for image inputs ``(c, h, w)`` or square flat ones."""
    in_features = int(np.prod(sample_shape))
    if len(sample_shape) == 1:
        side = round(in_features**0.5)
        if side * side != in_features:
            raise ValueError(f"cnn needs square images; got {in_features} features")
        channels, height, width = 1, side, side
    elif len(sample_shape) == 3:
        channels, height, width = sample_shape
    else:
        raise ValueError(f"cnn needs (c, h, w) or square flat inputs, got {sample_shape}")
    flat = 32 * (height // 4) * (width // 4)
    return nn.Sequential(
        nn.Unflatten(1, (channels, height, width)),
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, num_classes),
    )


_BUILDERS: dict[str, ModelBuilder] = {"linear": _linear, "mlp": _mlp, "cnn": _cnn}

#: The built-in models' output layers, (weight, bias) as their ``state_dict`` names them: a
#: simulation's job names its model's (``JobSpec.output_layer``) so that detection scores
#: label consistency. A plug-in model's is the user's to give.
OUTPUT_LAYERS: dict[str, tuple[str, str]] = {
    "linear": ("1.weight", "1.bias"),
    "mlp": ("3.weight", "3.bias"),
    "cnn": ("8.weight", "8.bias"),
}


def _plugin_builder(name: str) -> ModelBuilder | None:
    """The builder a plug-in name stands for (``module:function`` or an entry point of
    ``qflare.models``); None when it is neither."""
    builder: ModelBuilder | None = callable_plugin(
        name, MODELS_GROUP, "--model", "builder(sample_shape, num_classes) -> torch.nn.Module"
    )
    return builder


def _builder(name: str) -> ModelBuilder | None:
    return _BUILDERS.get(name) or _plugin_builder(name)


#: Models ``--model`` takes: the listed names, and (by ``in``) any plug-in that loads.
MODEL_NAMES = PluginNames(_BUILDERS, lambda name: _plugin_builder(name) is not None)


def register_model(name: str, builder: ModelBuilder) -> None:
    """Make ``builder(sample_shape, num_classes) -> nn.Module`` available as ``--model name``."""
    if not name or name in _BUILDERS or ":" in name:
        raise ValueError(f"model name {name!r} is empty, has a ':' or is already registered")
    if not callable(builder):
        raise TypeError(f"the builder of model {name!r} must be callable, got {builder!r}")
    _BUILDERS[name] = builder
    MODEL_NAMES.append(name)


def build_model(name: str, sample_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """A classifier for ``sample_shape`` inputs, initialised from ``seed``: ``linear``
    (flatten -> classes; digits: 650 parameters), ``mlp`` (flatten -> 64 -> ReLU ->
    classes; digits: 4810 parameters), ``cnn`` (two 3x3 conv
    layers with 16 and 32 channels and 2x2 max-pooling, then a linear layer), or a
    registered or plug-in builder."""
    builder = _builder(name)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    torch.manual_seed(seed)
    model = builder(sample_shape, num_classes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def get_params(model: nn.Module) -> Params:
    return {
        k: v.detach().cpu().numpy().astype(np.float32, copy=True)
        for k, v in model.state_dict().items()
    }


def set_params(model: nn.Module, params: Mapping[str, np.ndarray]) -> None:
    state = model.state_dict()
    if set(state) != set(params):
        raise ValueError(f"parameter names differ: model {sorted(state)} vs given {sorted(params)}")
    model.load_state_dict(
        {k: torch.from_numpy(np.array(params[k], dtype=np.float32)) for k in state}
    )


@dataclass(frozen=True)
class TrainConfig:
    local_epochs: int = 1
    lr: float = 0.1
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.local_epochs < 1:
            raise ValueError(f"local epochs must be >= 1, got {self.local_epochs}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")


def local_update(
    model: nn.Module,
    global_params: Mapping[str, np.ndarray],
    data: ArrayDataset,
    config: TrainConfig,
    seed: int,
    round_index: int,
    client_index: int,
) -> Params:
    """Train a copy of the global model on ``data`` with SGD; return new minus old weights."""
    set_params(model, global_params)
    model.train()
    rng = np.random.default_rng([seed, round_index, client_index])
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    optimiser = torch.optim.SGD(model.parameters(), lr=config.lr)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(config.local_epochs):
        order = torch.from_numpy(rng.permutation(len(data)))
        for start in range(0, len(data), config.batch_size):
            batch = order[start : start + config.batch_size]
            optimiser.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimiser.step()
    trained = get_params(model)
    return {k: trained[k] - np.asarray(global_params[k], dtype=np.float32) for k in trained}


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float


def evaluate(
    model: nn.Module, params: Mapping[str, np.ndarray], data: ArrayDataset, batch: int = 4096
) -> Evaluation:
    """Accuracy and mean cross-entropy of ``params`` on ``data``; a non-finite model scores 0."""
    if not all(np.isfinite(np.asarray(v)).all() for v in params.values()):
        return Evaluation(0.0, float("inf"))
    set_params(model, params)
    model.eval()
    correct = 0
    total_loss = 0.0
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    with torch.no_grad():
        for start in range(0, len(data), batch):
            xb = torch.from_numpy(data.x[start : start + batch])
            yb = torch.from_numpy(data.y[start : start + batch])
            logits = model(xb)
            total_loss += float(loss_fn(logits, yb))
            correct += int((logits.argmax(dim=1) == yb).sum())
    n = max(len(data), 1)
    return Evaluation(correct / n, total_loss / n)
