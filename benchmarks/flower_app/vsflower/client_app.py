"""ClientApp: the global model in, one training step (vsflower.task), the local model out."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from vsflower.task import train_step

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    (w,) = msg.content["arrays"].to_numpy_ndarrays()
    index = int(context.node_config.get("partition-id", 0))
    local = train_step(w, index, float(context.run_config["lr"]))
    content = RecordDict(
        {"arrays": ArrayRecord([local]), "metrics": MetricRecord({"num-examples": 10})}
    )
    return Message(content=content, reply_to=msg)
