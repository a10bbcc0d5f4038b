"""Moving tensors between a torch model and the wire, without ``torch.load``.

The global model arrives as numpy arrays decoded from a signed envelope (read-only views
into the received bytes); it is copied into the model's state dict by name. The update is
the difference ``local - global`` per tensor, in the dtype the round's tensor spec names.
Nothing here unpickles anything: a model from the network is data, never code.

Any torch model: the job's names are matched to the model's state-dict names as they are,
else with the prefixes wrappers add taken off both (Opacus' ``GradSampleModule``:
``_module.``; ``DistributedDataParallel`` and ``DataParallel``: ``module.``;
``torch.compile``: ``_orig_mod.``), so a wrapped and a plain copy of one model take part in
the same job. Only floating-point state travels: parameters and float buffers (BatchNorm's
``running_mean``/``running_var``) when the job's model has them; integer and boolean buffers
(BatchNorm's ``num_batches_tracked``) stay on the participant, never sent and never
overwritten.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from qflare.messages.errors import MessageRejected, Reason

if TYPE_CHECKING:  # imported where used: a participant without a torch model never loads it
    import torch

#: what wrappers put in front of the wrapped module's names: Opacus (``_module.``), DDP and
#: DataParallel (``module.``), torch.compile (``_orig_mod.``)
WRAPPER_PREFIXES = ("_module.", "module.", "_orig_mod.")


def plain_name(name: str) -> str:
    """``name`` without the wrapper prefixes in front of it (any number, in any order:
    ``_orig_mod.module.fc.weight`` -> ``fc.weight``)."""
    while True:
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                name = name[len(prefix) :]
                break
        else:
            return name


def travels(tensor: torch.Tensor) -> bool:
    """Whether a state entry is part of what a job exchanges: floating-point ones only."""
    return tensor.is_floating_point()


def _keys_for(state: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, str | None]:
    """For each of the job's ``names``, the model's state-dict key that holds it: the same
    name, else the one with the same :func:`plain_name` (None: the model has none)."""
    by_plain: dict[str, list[str]] = {}
    for key in state:
        by_plain.setdefault(plain_name(key), []).append(key)
    out: dict[str, str | None] = {}
    for name in names:
        if name in state:
            out[name] = name
            continue
        keys = by_plain.get(plain_name(name), [])
        if len(keys) > 1:
            raise ValueError(
                f"the job's tensor {name!r} matches {sorted(keys)} of the model once wrapper "
                f"prefixes ({', '.join(WRAPPER_PREFIXES)}) are taken off; rename one"
            )
        out[name] = keys[0] if keys else None
    return out


def model_tensors(model: torch.nn.Module, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The model's state as numpy copies, by the job's names.

    Without ``names``: every floating-point entry (parameters, float buffers) under its
    :func:`plain_name`, which is what a job's initial model is made of (integer buffers
    stay local). With ``names`` (the job's): exactly those, each found by its own or its
    plain name; ``KeyError`` for one the model lacks."""
    state = model.state_dict()
    if names is None:
        out: dict[str, np.ndarray] = {}
        for key, tensor in state.items():
            if not travels(tensor):
                continue
            name = plain_name(key)
            if name in out:
                raise ValueError(
                    f"two tensors of the model are named {name!r} once wrapper prefixes are "
                    "taken off; rename one"
                )
            out[name] = tensor.detach().to("cpu").numpy().copy()
        return out
    keys = _keys_for(state, names)
    result: dict[str, np.ndarray] = {}
    for name, found in keys.items():
        if found is None:
            raise KeyError(f"the model has no tensor {name!r}")
        result[name] = state[found].detach().to("cpu").numpy().copy()
    return result


def load_tensors(model: torch.nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy ``tensors`` into the model's state, in place, by name (its own or its plain
    name). Every name must exist with the same shape (the global model and the
    participant's model must agree); an integer or boolean buffer the job names anyway is
    left as the participant has it."""
    state = model.state_dict()
    keys = _keys_for(state, tensors)
    missing = sorted(name for name, key in keys.items() if key is None)
    if missing:
        raise MessageRejected(
            Reason.SHAPE_MISMATCH,
            f"the global model has tensors this model lacks: {missing[:5]}",
        )
    import torch

    with torch.no_grad():
        for name, array in tensors.items():
            key = keys[name]
            assert key is not None
            target = state[key]
            if tuple(target.shape) != tuple(array.shape):
                raise MessageRejected(
                    Reason.SHAPE_MISMATCH,
                    f"{name}: global shape {tuple(array.shape)}, model shape {tuple(target.shape)}",
                )
            if not travels(target):
                continue  # a counter (num_batches_tracked) is the participant's own
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
