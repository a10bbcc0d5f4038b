"""The simulated world: data split among clients, who is Byzantine, what each one sends.

Threat model (documented in docs/simulate.md). The Byzantine clients act as one coalition
that is *omniscient* within a round: before choosing their updates they see every honest
update of that round (the assumption under which ALIE, IPM, min-max and min-sum are
defined and strongest; Baruch et al. 2019, Xie et al. 2020, Shejwalkar and Houmansadr
2021). They do not control the server, the noise or the other clients' data, and they hold
valid certificates (they are enrolled participants, not outsiders). Label flipping is a
data-level attack: those clients train honestly on flipped labels and send that update.

Everything here is deterministic given the seed: the split, the Byzantine set, every
client's batch order (seeded per ``(seed, round, client)``) and the coalition's randomness
(seeded per ``(seed, round)``), so the same run gives the same updates on any bus.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from qflare.messages.tensors import Layout
from qflare.services.detector.core import OutputLayer
from qflare.sim import robust_glue
from qflare.sim.config import LABEL_FLIP, NO_ATTACK, SimConfig, SimConfigError
from qflare.sim.data import (
    ArrayDataset,
    SplitData,
    dirichlet_partition,
    iid_partition,
    load_dataset,
)
from qflare.sim.model import (
    Evaluation,
    Params,
    TrainConfig,
    build_model,
    evaluate,
    get_params,
    local_update,
    set_deterministic,
)


def client_ids(count: int) -> tuple[str, ...]:
    # The same ids ``qflare provision`` issues, so kits and simulated clients line up.
    width = max(3, len(str(count - 1)))
    return tuple(f"client-{i:0{width}d}" for i in range(count))


def choose_byzantine(ids: Sequence[str], count: int, seed: int) -> tuple[str, ...]:
    """A seeded choice, so the Byzantine clients are not simply the last ids."""
    picked = np.random.default_rng([seed, 3]).choice(len(ids), size=count, replace=False)
    return tuple(sorted(ids[int(i)] for i in picked))


@dataclass
class Federation:
    config: SimConfig
    data: SplitData
    ids: tuple[str, ...]
    byzantine: tuple[str, ...]
    shards: dict[str, ArrayDataset]
    initial: Params

    @staticmethod
    def split(config: SimConfig, data: SplitData) -> list[np.ndarray]:
        """Sample indices of the training set per client (IID or label-Dirichlet)."""
        if config.alpha is None:
            return iid_partition(len(data.train), config.clients, config.seed)
        return dirichlet_partition(data.train.y, config.clients, config.alpha, config.seed)

    @classmethod
    def build(cls, config: SimConfig, data: SplitData | None = None) -> Federation:
        set_deterministic()
        data = data if data is not None else load_dataset(config.dataset)
        ids = client_ids(config.clients)
        parts = cls.split(config, data)
        byzantine = choose_byzantine(ids, config.byzantine, config.seed)
        shards: dict[str, ArrayDataset] = {}
        for cid, idx in zip(ids, parts, strict=True):
            shard = data.train.subset(idx)
            if config.attack == LABEL_FLIP and cid in byzantine:
                flip = robust_glue.label_flipper(shard.num_classes)
                shard = ArrayDataset(
                    shard.x, np.asarray(flip(shard.y), np.int64), shard.num_classes
                )
            shards[cid] = shard
        model = build_model(
            config.model, data.train.sample_shape, data.train.num_classes, config.seed
        )
        initial = get_params(model)
        if config.output_layer is not None:
            try:
                OutputLayer.of(Layout.of(initial), config.output_layer)
            except ValueError as exc:
                raise SimConfigError(f"--model {config.model}: {exc}") from None
        return cls(config, data, ids, byzantine, shards, initial)

    def new_model(self) -> nn.Module:
        """A fresh model of the run's architecture (weights are set per call that uses it)."""
        return build_model(
            self.config.model,
            self.data.train.sample_shape,
            self.data.train.num_classes,
            self.config.seed,
        )

    @property
    def names(self) -> list[str]:
        """Parameter names in the model's ``state_dict`` order."""
        return list(self.initial)

    @property
    def layout(self) -> Layout:
        """How an update maps to one flat vector: sorted names, as in the services' rows."""
        return Layout.of(self.initial)

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig(self.config.local_epochs, self.config.lr, self.config.batch_size)

    def honest_updates(
        self, round_index: int, global_params: Mapping[str, np.ndarray], participants: Sequence[str]
    ) -> dict[str, Params]:
        """Every participant's own training (a label-flipping client trains on its flipped
        labels here: that attack lives in the data)."""
        model = self.new_model()
        return {
            cid: local_update(
                model,
                global_params,
                self.shards[cid],
                self.train_config,
                self.config.seed,
                round_index,
                self.ids.index(cid),
            )
            for cid in participants
        }

    def poison(
        self, round_index: int, trained: Mapping[str, Params], participants: Sequence[str]
    ) -> dict[str, Params]:
        """The coalition's model-poisoning updates for its members in ``participants``,
        chosen after seeing every honest update of the round. Empty when the attack is
        none or data-level."""
        attackers = [c for c in participants if c in self.byzantine]
        if self.config.attack in (NO_ATTACK, LABEL_FLIP) or not attackers:
            return {}
        honest = [c for c in participants if c not in self.byzantine]
        if not honest:
            # Nothing to observe: the attacks are defined relative to honest updates.
            return {}
        layout = self.layout
        honest_matrix = np.empty((len(honest), layout.size), np.float32)
        for row, c in enumerate(honest):
            layout.flatten(trained[c], out=honest_matrix[row])
        poisoned = robust_glue.coalition_updates(
            self.config.attack,
            honest_matrix,
            f=len(attackers),
            rule_spec=self.config.rule_spec,
            seed=(self.config.seed, round_index),
            options=self.config.attack_options,
        )
        return {cid: layout.unflatten(poisoned[row]) for row, cid in enumerate(attackers)}

    def round_updates(
        self, round_index: int, global_params: Mapping[str, np.ndarray], participants: Sequence[str]
    ) -> dict[str, Params]:
        """What every participant sends in this round: its training, or the coalition's."""
        updates = self.honest_updates(round_index, global_params, participants)
        updates.update(self.poison(round_index, updates, participants))
        return updates

    def evaluate(
        self, params: Mapping[str, np.ndarray], model: nn.Module | None = None
    ) -> Evaluation:
        return evaluate(model if model is not None else self.new_model(), params, self.data.test)
