"""ServerApp: FedAvg over every node each round, no evaluation; the time of each round
(from configure_train, when the model is about to go out, to the end of aggregate_train,
when the new global model exists) is appended as a JSON line to ``run_config["out"]``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from vsflower.task import initial_model

app = ServerApp()


class TimedFedAvg(FedAvg):
    def __init__(self, out: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.out = out
        self.started: dict[int, float] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.started[server_round] = time.time()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        result = super().aggregate_train(server_round, replies)
        end = time.time()
        if self.out:
            record = {
                "round": server_round,
                "start": self.started[server_round],
                "end": end,
                "replies": len(replies),
                "errors": sum(1 for r in replies if r.has_error()),
            }
            with open(self.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    nodes = int(cfg["num-nodes"])
    strategy = TimedFedAvg(
        str(cfg["out"]),
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=nodes,
        min_available_nodes=nodes,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([initial_model(int(cfg["params"]))]),
        num_rounds=int(cfg["num-server-rounds"]),
        timeout=float(cfg["round-timeout"]),
    )
