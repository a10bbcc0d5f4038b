"""Aggregator and pre-aggregator interfaces and the registry by name.

Shape follows ByzFL (hyperparameters checked in the constructor, requirements such as
``n > 2f`` checked at call with the numbers in the message) and Flower (maths as plain
functions over arrays). Every rule is stateless: anything that would carry over between
rounds (centered clipping's reference, bucketing's shuffle) is an explicit call argument.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, TypeVar

import numpy as np

from ._core import (
    ArrayLike,
    BoolArray,
    FloatArray,
    RngLike,
    Weights,
    as_batch,
    check_int,
    finite_rows,
    require,
)

_A = TypeVar("_A", bound="type[Aggregator]")
_P = TypeVar("_P", bound="type[PreAggregator]")

RULES: dict[str, type[Aggregator]] = {}
PRE_AGGREGATORS: dict[str, type[PreAggregator]] = {}


def register_rule(cls: _A) -> _A:
    RULES[cls.name] = cls
    return cls


def register_pre(cls: _P) -> _P:
    PRE_AGGREGATORS[cls.name] = cls
    return cls


def drop_nonfinite(
    x: FloatArray, w: Weights, f: int, rule: str, mask: BoolArray | None = None
) -> tuple[FloatArray, Weights, int]:
    """Remove rows holding NaN/Inf; each removed row uses up one of the f tolerated.

    A non-finite update is Byzantine beyond doubt, so dropping it and lowering f keeps
    the guarantee of the rule for the rest.
    """
    if mask is None:
        mask = finite_rows(x)
    bad = int(x.shape[0] - mask.sum())
    if bad == 0:
        return x, w, f
    require(bad <= f, rule, f"{bad} updates are non-finite but f={f}")
    return x[mask], (None if w is None else w[mask]), f - bad


class _Named(ABC):
    """Registered by ``name``; shown as ``name(param=value, ...)``, which parses back."""

    name: ClassVar[str]

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.name}({params})"

    def params(self) -> dict[str, Any]:
        return {}


class FParam:
    """Mixin for a rule or pre-aggregator parametrised by f, the number of Byzantine
    updates it tolerates (ByzFL's f)."""

    def __init__(self, f: int = 0) -> None:
        self.f = check_int("f", f)

    def params(self) -> dict[str, Any]:
        return {"f": self.f}


class Aggregator(_Named):
    """A robust aggregation rule: ``rule(updates [n, d], weights [n] | None) -> [d]``.

    Returns the same kind (NumPy array or CPU tensor) and dtype it was given and never
    writes to its input. ``reference`` is read only by rules that need a starting point
    (centered clipping); ``rng`` only by randomised pre-aggregators (bucketing).
    """

    #: whether the rule has a defined weighted form; others refuse unequal weights.
    weighted: ClassVar[bool] = False

    def __call__(
        self,
        updates: ArrayLike,
        weights: Any = None,
        *,
        reference: ArrayLike | None = None,
        rng: RngLike = None,
    ) -> ArrayLike:
        b = as_batch(updates, weights)
        w = b.weights
        refuse_unequal_weights(self, w, "pass weights=None or equal weights")
        ref = None if reference is None else as_reference(reference, b.x.shape[1])
        return b.back(self.aggregate(b.x, w, reference=ref, rng=rng))

    def aggregate(
        self, x: FloatArray, w: Weights, *, reference: FloatArray | None = None, rng: RngLike = None
    ) -> FloatArray:
        """The rule on a validated NumPy view; returns [d] (any float dtype).

        Rules that read ``reference`` or ``rng`` override this; the others implement
        ``apply``.
        """
        return self.apply(x, w)

    def apply(self, x: FloatArray, w: Weights) -> FloatArray:
        """The rule on validated rows and weights, for rules without call arguments."""
        raise NotImplementedError(f"{type(self).__name__} implements neither aggregate nor apply")


class PreAggregator(_Named):
    """Maps ``(updates [n, d], weights) -> (updates' [m, d], weights')`` ahead of a rule."""

    def __call__(
        self,
        updates: ArrayLike,
        weights: Any = None,
        *,
        rng: RngLike = None,
    ) -> tuple[ArrayLike, Weights]:
        b = as_batch(updates, weights)
        out, w = self.transform(b.x, b.weights, rng=rng)
        return b.back(out), w

    @abstractmethod
    def transform(
        self, x: FloatArray, w: Weights, *, rng: RngLike = None
    ) -> tuple[FloatArray, Weights]:
        """New rows (never a view that aliases the input when values change)."""


class Chain(Aggregator):
    """Pre-aggregators applied in order, then a rule: ``nnm+multikrum(f=3)``."""

    name = "chain"
    weighted = True

    def __init__(self, pres: list[PreAggregator], rule: Aggregator) -> None:
        if not isinstance(rule, Aggregator) or isinstance(rule, Chain):
            raise TypeError(f"a chain ends in one rule, got {rule!r}")
        for p in pres:
            if not isinstance(p, PreAggregator):
                raise TypeError(f"{p!r} is not a pre-aggregator")
        self.pres = list(pres)
        self.rule = rule

    def aggregate(
        self, x: FloatArray, w: Weights, *, reference: FloatArray | None = None, rng: RngLike = None
    ) -> FloatArray:
        gen = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
        for p in self.pres:
            x, w = p.transform(x, w, rng=gen)
        refuse_unequal_weights(self.rule, w, "its pre-aggregators left unequal weights")
        return self.rule.aggregate(x, w, reference=reference, rng=gen)

    def __repr__(self) -> str:
        return "+".join([repr(p) for p in self.pres] + [repr(self.rule)])


def refuse_unequal_weights(rule: Aggregator, w: Weights, fix: str) -> None:
    if w is not None and not rule.weighted and not np.all(w == w[0]):
        raise ValueError(f"{rule.name} has no weighted form; {fix}")


def as_reference(reference: ArrayLike, d: int) -> FloatArray:
    b = as_batch(reference.reshape(1, -1) if hasattr(reference, "reshape") else reference)
    require(b.x.shape == (1, d), "reference", f"reference must have {d} entries, got {b.x.size}")
    row: FloatArray = b.x[0]
    return row
