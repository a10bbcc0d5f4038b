"""The participant SDK (``qflare.client``): a kit, a torch model and a training function.

    from qflare.client import Participant

    def train(model, round_info):              # a few local epochs
        lr = round_info.config.get("lr", 0.05)  # the job's config for this round
        ...
        return num_samples, {"loss": loss}      # or just num_samples

    def evaluate(model, round_info):           # optional: the round's global model
        ...
        return loss, num_examples, {"accuracy": accuracy}

    Participant.from_kit("pki/clients/client-003", model, train, evaluate=evaluate,
                         broker="amqp://rabbit.example/qflare", jobs=["mnist"]).run_blocking()

See :mod:`qflare.client.participant` for what happens each round, and docs/CONTRACTS.md
("qflare.client") for the hooks simulations use (``compute_update``, ``update_transform``).
A Flower ``NumPyClient`` runs as a participant through :func:`qflare.client.flower.run_numpy_client`;
local DP: ``Participant(..., local_dp=qflare.privacy.LocalLaplace(epsilon=..., clip=...))``.
"""

from qflare.client.kit import Kit
from qflare.client.participant import (
    EvaluateFn,
    LocalUpdate,
    Participant,
    RoundInfo,
    Stats,
    TrainFn,
    UpdateTransform,
    run_participants,
)
from qflare.client.tensors import delta, load_tensors, model_tensors, plain_name
from qflare.messages.bodies import Evaluation

__all__ = [
    "EvaluateFn",
    "Evaluation",
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
