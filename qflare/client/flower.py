"""A Flower ``NumPyClient`` as a QFLARE participant: same client code, another launcher.

    from qflare.client.flower import run_numpy_client

    # was: fl.client.start_numpy_client(server_address=..., client=FlowerClient())
    run_numpy_client(FlowerClient(), "pki/clients/client-003",
                     broker="amqp://rabbit.example/qflare", jobs=["mnist"])

Flower's ``NumPyClient`` protocol (``flwr.client.NumPyClient``; the bridge needs only the
three methods, so the class need not derive from Flower's): ``get_parameters(config) ->
list[ndarray]``, ``fit(parameters, config) -> (parameters, num_examples, metrics)``,
``evaluate(parameters, config) -> (loss, num_examples, metrics)``.

Each round that selects the participant, the signed and verified global model becomes the
list Flower expects, ``fit`` trains on it, and ``new - global`` per tensor is sent as the
update with ``num_examples`` as its sample count; everything else (signing, sealing,
streams, reconnects) is the :class:`~qflare.client.Participant`'s.

How the list maps to the job's tensors: the client's own ``get_parameters`` tells the
order and which arrays are floating point. Floating-point arrays take the job's tensors in
order: the job's names sorted (a job made with :func:`initial_tensors` names them
``p0000``, ``p0001``, ... in the client's order), or ``names`` when given (the job's names
in the client's order). Integer arrays (BatchNorm's ``num_batches_tracked`` in a
``state_dict``-based client) are not part of the job: the bridge hands the client its own
values back and sends nothing for them.

Config: ``fit`` and ``evaluate`` get the job's server-sent round config (``round.opened``'s
``config``, e.g. a learning rate) with ``server_round``, ``job``, ``model_version`` and
``clip_norm`` added, as a Flower strategy's ``on_fit_config_fn`` would send it.

Metrics: the numeric entries of ``fit``'s metrics travel with the update (the aggregator
weighs them by ``num_examples``, docs/architecture.md); with ``evaluate_rounds=True``,
``evaluate`` runs on each round's global model before ``fit`` and its result travels too, as
the participant's evaluation. Flower's metrics may also hold strings and bytes: those stay on
the participant (:attr:`FlowerParticipant.fit_metrics`, :attr:`FlowerParticipant.evaluations`),
as does ``evaluate`` on the final global model of each job when it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qflare.aio import blocking
from qflare.client.kit import Kit
from qflare.client.participant import LocalUpdate, Participant, RoundInfo
from qflare.client.tensors import delta
from qflare.messages.bodies import Evaluation
from qflare.messages.errors import MessageRejected, Reason

#: Flower's ``Scalar``: what its configs and metrics hold
Scalar = bool | bytes | float | int | str
NDArrays = list[np.ndarray]


class NumPyClientLike(Protocol):
    """The part of Flower's ``NumPyClient`` the bridge calls."""

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays: ...

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]: ...

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]: ...


@dataclass(frozen=True)
class FlowerEvaluation:
    """One ``evaluate`` of a global model: Flower's (loss, num_examples, metrics)."""

    job: str
    model_version: int
    loss: float
    num_examples: int
    metrics: dict[str, Scalar] = field(default_factory=dict)


def round_config(info: RoundInfo) -> dict[str, Scalar]:
    """The ``config`` a round's ``fit`` and ``evaluate`` get (Flower's ``server_round``)."""
    return {
        **info.config,
        "server_round": info.round,
        "job": info.job,
        "model_version": info.model_version,
        "clip_norm": info.clip_norm,
    }


def numeric(metrics: Mapping[str, Scalar]) -> dict[str, float]:
    """The entries of Flower metrics that QFLARE's metrics can carry (numbers, not bools,
    strings or bytes); ``check_metrics`` bounds them before the update is sent."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    }


def _is_float(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.floating))


def initial_tensors(
    client: NumPyClientLike,
    names: Sequence[str] | None = None,
    config: Mapping[str, Scalar] | None = None,
) -> dict[str, np.ndarray]:
    """A job's initial model from the client's ``get_parameters``: its floating-point
    arrays, named ``p0000``, ``p0001``, ... in the client's order (so that the job's sorted
    names are that order), or by ``names`` (one per floating-point array, in order)."""
    arrays = [np.asarray(a) for a in client.get_parameters(dict(config or {}))]
    floats = [a for a in arrays if _is_float(a)]
    if names is None:
        names = [f"p{i:04d}" for i in range(len(floats))]
    elif len(names) != len(floats):
        raise ValueError(
            f"{len(names)} names for the client's {len(floats)} floating-point arrays "
            f"(of {len(arrays)}); give one name per floating-point array, in the client's order"
        )
    return {n: np.array(a, copy=True) for n, a in zip(names, floats, strict=True)}


def _three(result: Any, method: str, shape: str) -> tuple[Any, Any, Any]:
    if not (isinstance(result, tuple) and len(result) == 3):
        raise TypeError(f"NumPyClient.{method} must return a tuple {shape}, got {result!r:.80}")
    return result[0], result[1], result[2]


def _count(value: Any, method: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise TypeError(f"NumPyClient.{method}: num_examples must be an int >= 1, got {value!r}")
    return int(value)


class FlowerParticipant(Participant):
    """A participant whose training is a Flower ``NumPyClient``'s ``fit``.

    ``names``: the job's tensor names in the order of the client's floating-point arrays
    (default: the job's names sorted). ``evaluate_rounds``: also ``evaluate`` each round's
    global model before ``fit``. Other keywords are the :class:`Participant`'s (``broker``,
    ``jobs``, ``local_dp``, ...)."""

    def __init__(
        self,
        kit: Kit,
        client: NumPyClientLike,
        *,
        names: Sequence[str] | None = None,
        evaluate_rounds: bool = False,
        **kwargs: Any,
    ) -> None:
        for method in ("get_parameters", "fit", "evaluate"):
            if not callable(getattr(client, method, None)):
                raise TypeError(
                    f"{type(client).__name__} has no {method}(); a Flower NumPyClient has "
                    "get_parameters, fit and evaluate"
                )
        if names is not None and len(set(names)) != len(names):
            raise ValueError(f"names must be distinct, got {list(names)}")
        super().__init__(kit, None, None, **kwargs)
        self.client = client
        self.names = None if names is None else tuple(names)
        self.evaluate_rounds = evaluate_rounds
        self.evaluations: list[FlowerEvaluation] = []
        self.fit_metrics: dict[tuple[str, int], dict[str, Scalar]] = {}

    def _parameters(
        self, global_tensors: Mapping[str, np.ndarray], config: dict[str, Scalar]
    ) -> tuple[NDArrays, list[str | None]]:
        """The list ``fit``/``evaluate`` get: the client's own arrays, with the global model
        in its floating-point slots; and the job's name of each slot (None: the client's)."""
        local = [np.asarray(a) for a in self.client.get_parameters(config)]
        slots = [i for i, a in enumerate(local) if _is_float(a)]
        names = list(self.names) if self.names is not None else sorted(global_tensors)
        if len(names) != len(slots) or set(names) != set(global_tensors):
            raise MessageRejected(
                Reason.SHAPE_MISMATCH,
                f"the Flower client has {len(slots)} floating-point arrays (of {len(local)}), "
                f"the job's model {len(global_tensors)} tensors"
                + ("" if self.names is None else f" and names gives {len(names)} other names"),
            )
        by_slot: list[str | None] = [None] * len(local)
        params = list(local)
        for i, name in zip(slots, names, strict=True):
            g = global_tensors[name]
            if local[i].shape != g.shape:
                raise MessageRejected(
                    Reason.SHAPE_MISMATCH,
                    f"array {i} of the Flower client has shape {local[i].shape}, the job's "
                    f"{name!r} {g.shape}",
                )
            by_slot[i] = name
            params[i] = np.array(g, dtype=local[i].dtype, copy=True)
        return params, by_slot

    def _evaluate(
        self, params: NDArrays, config: dict[str, Scalar], job: str, version: int
    ) -> FlowerEvaluation:
        loss, n, metrics = _three(
            self.client.evaluate(params, config), "evaluate", "(loss, num_examples, metrics)"
        )
        result = FlowerEvaluation(job, version, float(loss), _count(n, "evaluate"), dict(metrics))
        self.evaluations.append(result)
        return result

    def compute_update(
        self, global_tensors: Mapping[str, np.ndarray], info: RoundInfo
    ) -> LocalUpdate:
        config = round_config(info)
        params, slots = self._parameters(global_tensors, config)
        evaluation = None
        if self.evaluate_rounds:
            result = self._evaluate(
                [p.copy() for p in params], config, info.job, info.model_version
            )
            evaluation = Evaluation.of(
                (result.loss, result.num_examples, numeric(result.metrics)), "NumPyClient.evaluate"
            )
        new, num_examples, metrics = _three(
            self.client.fit(params, config), "fit", "(parameters, num_examples, metrics)"
        )
        new = list(new)
        if len(new) != len(slots):
            raise ValueError(
                f"NumPyClient.fit returned {len(new)} arrays, get_parameters gave {len(slots)}"
            )
        trained: dict[str, np.ndarray] = {}
        for i, name in enumerate(slots):
            if name is None:
                continue  # the client's own (integer) array: not part of the job
            a = np.asarray(new[i])
            if a.shape != global_tensors[name].shape:
                raise ValueError(
                    f"NumPyClient.fit returned shape {a.shape} for array {i} ({name!r}), "
                    f"expected {global_tensors[name].shape}"
                )
            trained[name] = a
        self.fit_metrics[(info.job, info.round)] = dict(metrics)
        return LocalUpdate(
            delta(trained, global_tensors),
            _count(num_examples, "fit"),
            numeric(metrics),
            evaluation,
        )

    def evaluate_final(self, job: str) -> FlowerEvaluation | None:
        """``evaluate`` on the newest verified global model of ``job`` (None: none yet)."""
        latest = self.latest_model(job)
        if latest is None:
            return None
        version, tensors = latest
        config: dict[str, Scalar] = {"server_round": version, "job": job, "model_version": version}
        params, _ = self._parameters(tensors, config)
        return self._evaluate(params, config, job, version)


async def serve_numpy_client(
    client: NumPyClientLike,
    kit: Kit | str | Path,
    *,
    broker: Any = "memory://",
    jobs: Iterable[str],
    timeout: float | None = None,
    passphrase: bytes | None = None,
    **kwargs: Any,
) -> FlowerParticipant:
    """Run a Flower ``NumPyClient`` as a QFLARE participant of ``jobs`` until they all end
    (or ``timeout`` seconds pass: :class:`TimeoutError`), inside a running event loop;
    then ``evaluate`` each job's final model. ``kit``: a :class:`Kit` or the kit's folder.
    Returns the participant (``ended``, ``evaluations``, ``fit_metrics``, ``stats``).
    Other keywords go to :class:`FlowerParticipant` (``names``, ``evaluate_rounds``,
    ``local_dp``, ``prefix``, ...). :func:`run_numpy_client` is the blocking form, for
    scripts."""
    if not isinstance(kit, Kit):
        kit = Kit.load(kit, passphrase)
    participant = FlowerParticipant(kit, client, broker=broker, jobs=jobs, **kwargs)
    await participant.start()
    try:
        await asyncio.wait_for(
            asyncio.gather(*(participant.ended_event(j).wait() for j in participant.jobs)),
            timeout,
        )
    finally:
        await participant.stop()
    for job in participant.jobs:
        await asyncio.to_thread(participant.evaluate_final, job)
    return participant


run_numpy_client = blocking(serve_numpy_client, "run_numpy_client")
