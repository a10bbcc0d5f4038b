"""Moving tensors between a torch model and the wire, without ``torch.load``.

The global model arrives as numpy arrays decoded from a signed envelope (read-only views
into the received bytes); it is copied into the model's state dict by name. The update is
the difference ``local - global`` per tensor, in the dtype the round's tensor spec names.
Nothing here unpickles anything: a model from the network is data, never code.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from qflare.messages.errors import MessageRejected, Reason


def model_tensors(model: torch.nn.Module, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The model's state (parameters and buffers) as numpy copies, optionally only ``names``."""
    state = model.state_dict()
    keys = names if names is not None else list(state)
    out: dict[str, np.ndarray] = {}
    for name in keys:
        if name not in state:
            raise KeyError(f"the model has no tensor {name!r}")
        out[name] = state[name].detach().to("cpu").numpy().copy()
    return out


def load_tensors(model: torch.nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy ``tensors`` into the model's state, in place, by name. Every name must exist
    with the same shape (the global model and the participant's model must agree)."""
    state = model.state_dict()
    missing = sorted(set(tensors) - set(state))
    if missing:
        raise MessageRejected(
            Reason.SHAPE_MISMATCH,
            f"the global model has tensors this model lacks: {missing[:5]}",
        )
    with torch.no_grad():
        for name, array in tensors.items():
            target = state[name]
            if tuple(target.shape) != tuple(array.shape):
                raise MessageRejected(
                    Reason.SHAPE_MISMATCH,
                    f"{name}: global shape {tuple(array.shape)}, model shape {tuple(target.shape)}",
                )
            # np.array copies: the source is a read-only view into the message bytes
            target.copy_(torch.from_numpy(np.array(array, copy=True)).to(target.dtype))


def delta(
    local: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``local - global`` per tensor, in the global tensor's dtype (the round's spec),
    computed in float64 so a float16 model does not lose the small differences."""
    out: dict[str, np.ndarray] = {}
    for name, g in global_.items():
        diff = np.asarray(local[name], dtype=np.float64) - np.asarray(g, dtype=np.float64)
        out[name] = np.ascontiguousarray(diff.astype(g.dtype, copy=False))
    return out
