"""The participant SDK (``qflare.client``): a kit, a torch model and a training function.

    from qflare.client import Participant

    def train(model, round_info) -> int:       # a few local epochs; returns #samples
        ...
    Participant.from_kit("pki/clients/client-003", model, train,
                         broker="amqp://rabbit.example/qflare", jobs=["mnist"]).run_blocking()

See :mod:`qflare.client.participant` for what happens each round, and docs/CONTRACTS.md
("qflare.client") for the hooks simulations use (``compute_update``, ``update_transform``).
A Flower ``NumPyClient`` runs as a participant through :func:`qflare.client.flower.run_numpy_client`;
local DP: ``Participant(..., local_dp=qflare.privacy.LocalLaplace(epsilon=..., clip=...))``.
"""

from qflare.client.kit import Kit
from qflare.client.participant import (
    LocalUpdate,
    Participant,
    RoundInfo,
    Stats,
    TrainFn,
    UpdateTransform,
    run_participants,
)
from qflare.client.tensors import delta, load_tensors, model_tensors, plain_name

__all__ = [
    "Kit",
    "LocalUpdate",
    "Participant",
    "RoundInfo",
    "Stats",
    "TrainFn",
    "UpdateTransform",
    "delta",
    "load_tensors",
    "model_tensors",
    "plain_name",
    "run_participants",
]
