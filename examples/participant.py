"""A QFLARE participant that trains a small MLP on its share of scikit-learn's digits.

    python examples/participant.py --kit pki/clients/client-003 \
        --broker amqp://guest:guest@127.0.0.1:5672/ --job digits

Client ``client-<i>`` of ``--clients N`` trains on every N-th training image starting at
``i`` (the same fixed split for everyone, so shares are disjoint). The lines that talk to
QFLARE are the ones README.md shows under "Writing a participant": a torch model, a
``train(model, round_info) -> (num_samples, metrics)`` function that takes its learning rate
and local epochs from the job's round config (``round_config`` in examples/federation.toml),
an ``evaluate(model, round_info) -> (loss, num_examples, metrics)`` function (the round's
global model on this client's slice of the held-out digits) and ``Participant.from_kit(...)``.
When the job ends the SDK has loaded the final global model into ``model``; the script
prints its accuracy on the held-out fifth of digits, which no participant trains on.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from qflare.cli import add_federation_flags
from qflare.client import Participant, RoundInfo

SPLIT_SEED = 1797  # one permutation for every participant: shares and test set are disjoint


def build_model() -> torch.nn.Module:
    """64 pixels -> 32 -> ReLU -> 10 classes (2410 parameters); tensor names 0.* and 2.*."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def load_share(index: int, clients: int) -> tuple[TensorDataset, TensorDataset]:
    """This client's training share and the common held-out test set (pixels scaled to [0, 1])."""
    from sklearn.datasets import load_digits

    if not 0 <= index < clients:
        raise ValueError(f"client index {index} is outside 0..{clients - 1}")
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(y)))
    n_test = len(y) // 5
    test, train = order[:n_test], order[n_test:]
    mine = train[index::clients]
    return TensorDataset(x[mine], y[mine]), TensorDataset(x[test], y[test])


def accuracy(model: torch.nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def client_index(kit: Path) -> int:
    """``client-007`` -> 7: the number `qflare provision` put at the end of the id."""
    match = re.search(r"(\d+)$", kit.resolve().name)
    if match is None:
        raise ValueError(f"cannot read a client index from {kit}; pass --index")
    return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--kit", required=True, type=Path, help="clients/<id>/ folder written by `qflare provision`"
    )
    add_federation_flags(
        p, broker_help="amqp:// URL; without user:pass the kit's broker_password is used"
    )
    p.add_argument("--job", default="digits", help="job id to follow")
    p.add_argument(
        "--clients", type=int, default=10, help="how many shares the training set is cut in"
    )
    p.add_argument(
        "--index", type=int, help="this client's share (default: the number ending the kit's name)"
    )
    p.add_argument(
        "--epochs", type=int, default=2, help="local epochs per round, unless the job says"
    )
    p.add_argument(
        "--lr", type=float, default=0.3, help="local SGD learning rate, unless the job says"
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the job to end"
    )
    args = p.parse_args(argv)
    # the SDK logs "participant <id> following <job>" when it starts reading the job's streams
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    index = client_index(args.kit) if args.index is None else args.index
    share, test = load_share(index, args.clients)
    my_loader = DataLoader(
        share, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(index)
    )
    torch.set_num_threads(1)  # ten of these share one machine in examples/run_federation.sh

    model = build_model()

    def train(model: torch.nn.Module, round_info: RoundInfo) -> tuple[int, dict[str, float]]:
        config = round_info.config  # the job's config for this round
        opt = torch.optim.SGD(model.parameters(), lr=config.get("lr", args.lr))
        for _ in range(config.get("local_epochs", args.epochs)):
            for x, y in my_loader:  # your local data
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
        return len(my_loader.dataset), {"loss": loss.item()}

    x_val, y_val = (t[index :: args.clients] for t in test.tensors)  # my slice of held-out

    def evaluate(model: torch.nn.Module, round_info: RoundInfo) -> tuple[float, int, dict]:
        with torch.no_grad():
            logits = model(x_val)
            loss = torch.nn.functional.cross_entropy(logits, y_val).item()
            accuracy = (logits.argmax(1) == y_val).float().mean().item()
        return loss, len(y_val), {"accuracy": accuracy}

    participant = Participant.from_kit(
        args.kit,
        model,
        train,
        evaluate=evaluate,
        broker=args.broker,
        prefix=args.prefix,
        jobs=[args.job],
    )
    reason = participant.run_blocking(timeout=args.timeout)
    stats = participant.stats
    print(
        json.dumps(
            {
                "client": participant.id,
                "job": args.job,
                "ended": reason,
                "samples": len(share),
                "updates_sent": stats.updates_sent,
                "final_accuracy": round(accuracy(model, test), 4),
                "test_samples": len(test),
            }
        ),
        flush=True,
    )
    return 0 if reason == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
