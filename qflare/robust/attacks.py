"""Byzantine attacks for simulation and tests: ``attack(honest [h, d], f) -> [f, d]``.

Threat model (as ByzFL's): the f Byzantine clients collude and see every honest update
of the round before sending theirs (omniscient, the strongest usual assumption); the
"optimal" variants also know the server's rule. Label flipping is data-level: a function
the Byzantine client applies to its labels before training.

- sign flip: Allen-Zhu et al., "Byzantine-Resilient Non-Convex SGD", ICLR 2021.
- IPM: Xie, Koyejo and Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner
  Product Manipulation", UAI 2019 (-tau * mean).
- ALIE: Baruch, Baruch and Goldberg, "A Little Is Enough", NeurIPS 2019 (mean + tau * std;
  ByzFL's sign convention).
- Mimic: Karimireddy, He and Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets
  via Bucketing", ICLR 2022 (copy one honest update).
- min-max / min-sum: Shejwalkar and Houmansadr, "Manipulating the Byzantine: Optimizing
  Model Poisoning Attacks and Defenses for Federated Learning", NDSS 2021. The largest
  gamma with max_i ||m - gamma p - x_i|| <= max_ij ||x_i - x_j|| (min-max) or
  sum_i ||m - gamma p - x_i||^2 <= max_j sum_i ||x_j - x_i||^2 (min-sum) is found in closed
  form: each side is a quadratic in gamma, so no bisection is needed.
- optimal IPM/ALIE: Allouah et al., "Fixing by Mixing", AISTATS 2023 (ByzFL's search of
  the scale that moves the rule's output furthest from the honest mean).
- noisy IPM/ALIE: the IPM/ALIE vector plus independent per-attacker noise scaled by the
  honest per-coordinate spread, so the coalition's updates are not near-copies.

Plug-ins: :func:`register_attack` adds an :class:`Attack` subclass by its ``name``;
``get_attack("mypkg.attacks:MyAttack")`` imports one, and a name not registered is looked up
among the installed entry points of the group ``qflare.attacks``.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from ._base import (
    Aggregator,
    PluginError,
    describe,
    entry_point_names,
    is_reference,
    load_plugin,
    qualified_name,
    register_in,
)
from ._core import (
    F64,
    ArrayLike,
    FloatArray,
    RngLike,
    as_batch,
    check_float,
    check_int,
    pairwise_sq_dists,
)

ATTACKS: dict[str, type[Attack]] = {}

#: entry-point group of installed attack plug-ins
ATTACKS_GROUP = "qflare.attacks"
_LABEL_FLIP = "label_flip"  # LabelFlip.name: data-level, not in ATTACKS

_AT = TypeVar("_AT", bound="type[Attack]")


def register_attack(cls: _AT) -> _AT:
    """Make an :class:`Attack` subclass available to :func:`get_attack` (and the
    simulator's ``--attack``) by its ``name``; usable as a class decorator. It implements
    ``forge(honest [h, d], f, rng) -> [f, d]`` (or the one [d] update all f send) and checks
    its parameters in the constructor. Raises :class:`PluginError` for anything else, a name
    that is not a lowercase identifier, or a name another attack holds."""
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise PluginError(
            f"{qualified_name(cls)} is not an attack: subclass qflare.robust.Attack, give it a "
            "name and implement forge(honest, f, rng)"
        )
    if getattr(cls, "name", None) == _LABEL_FLIP:
        raise PluginError(f"attack name {_LABEL_FLIP!r} is taken by the data-level label flip")
    register_in(ATTACKS, "attack", cls)
    return cls


_register = register_attack


class Attack:
    """Callable ``attack(honest [h, d], f, rng=None) -> [f, d]`` of the input's kind."""

    name: ClassVar[str]

    def __call__(self, honest: ArrayLike, f: int, *, rng: RngLike = None) -> ArrayLike:
        b = as_batch(honest)
        f = check_int("f", f)
        if f == 0:
            return b.back(np.zeros((0, b.x.shape[1]), dtype=b.x.dtype))
        out = np.broadcast_to(self.forge(b.x, f, np.random.default_rng(rng)), (f, b.x.shape[1]))
        return b.back(out)

    def forge(self, h: FloatArray, f: int, rng: np.random.Generator) -> FloatArray:
        """The f Byzantine updates [f, d], or the one [d] update all f of them send."""
        raise NotImplementedError


def _mean(h: FloatArray) -> F64:
    out: F64 = h.mean(axis=0, dtype=np.float64)
    return out


@_register
class SignFlip(Attack):
    name = "sign_flip"

    def forge(self, h: FloatArray, f: int, rng: np.random.Generator) -> FloatArray:
        return -_mean(h)


@_register
class Gaussian(Attack):
    name = "gaussian"

    def __init__(self, mu: float = 0.0, sigma: float = 1.0) -> None:
        self.mu = check_float("mu", mu, minimum=-np.inf)
        self.sigma = check_float("sigma", sigma)

    def forge(self, h: FloatArray, f: int, rng: np.random.Generator) -> FloatArray:
        return rng.normal(self.mu, self.sigma, size=(f, h.shape[1]))


@_register
class Inf(Attack):
    """Every coordinate +inf: the degenerate large-deviation attack."""

    name = "inf"

    def forge(self, h: FloatArray, f: int, rng: np.random.Generator) -> FloatArray:
        return np.full(h.shape[1], np.inf)


class _Scaled(Attack):
    """An attack with one real scale ``tau`` (either sign): what the optimal variants
    search over."""

    default_tau: ClassVar[float]

    def __init__(self, tau: float | None = None) -> None:
        self.tau = check_float("tau", self.default_tau if tau is None else tau, minimum=-np.inf)


@_register
class IPM(_Scaled):
    name = "ipm"
    default_tau = 2.0

    def forge(self, h: FloatArray, f: int, rng: np.random.Generator) -> FloatArray:
        return -self.tau * _mean(h)


@_register
class LargeDeviation(IPM):
    """A finite update far away: -scale times the honest mean (IPM with a huge scale)."""

    name = "large"

    def __init__(self, scale: float = 1e6) -> None:
        self.scale = check_float("scale", scale)
        super().__init__(self.scale)


@_register
class ALIE(_Scaled):
    name = "alie"
    default_tau = 1.5

    def forge(self, h: FloatArray, f: int, rng: np.random.Generator) -> FloatArray:
        mean = _mean(h)
        std = h.std(axis=0, ddof=1, dtype=np.float64) if h.shape[0] > 1 else np.zeros_like(mean)
        return mean + self.tau * std


@_register
class Mimic(Attack):
    name = "mimic"

    def __init__(self, idx: int = 0) -> None:
        self.idx = check_int("idx", idx)

    def forge(self, h: FloatArray, f: int, rng: np.random.Generator) -> FloatArray:
        if self.idx >= h.shape[0]:
            raise ValueError(f"mimic: idx={self.idx} but only {h.shape[0]} honest updates")
        row: FloatArray = h[self.idx]
        return row


def _direction(h: FloatArray, kind: str) -> F64:
    mean = _mean(h)
    if kind == "std":
        std: F64 = h.std(axis=0, dtype=np.float64)
        return std
    if kind == "sign":
        return np.sign(mean)
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm > 0 else mean


def _root(a: float, b: float, c: float, limit: float) -> float:
    """Largest g >= 0 with a g^2 - 2 b g + c <= limit (inf when a == 0)."""
    if a <= 0:
        return 0.0 if c > limit else float("inf")
    disc = b * b - a * (c - limit)
    return max(0.0, (b + float(np.sqrt(max(disc, 0.0)))) / a)


class _MinMaxBase(Attack):
    """m - gamma * p with the largest gamma passing the distance test (closed form).

    ||m - g p - x_i||^2 = a g^2 - 2 b_i g + c_i with a = |p|^2, b_i = (m - x_i) . p and
    c_i = |m - x_i|^2; ``gamma`` gets a, b, c and the honest squared distances.
    """

    def __init__(self, direction: str = "std") -> None:
        if direction not in ("std", "sign", "unit"):
            raise ValueError(f"direction must be 'std', 'sign' or 'unit', got {direction!r}")
        self.direction = direction

    def forge(self, h: FloatArray, f: int, rng: np.random.Generator) -> FloatArray:
        m = _mean(h)
        p = _direction(h, self.direction)
        diff = m[None, :] - h
        b: F64 = diff @ p
        c: F64 = np.einsum("ij,ij->i", diff, diff)
        gamma = self.gamma(float(p @ p), b, c, pairwise_sq_dists(h))
        return m - gamma * p

    def gamma(self, a: float, b: F64, c: F64, d2: F64) -> float:
        raise NotImplementedError


@_register
class MinMax(_MinMaxBase):
    name = "minmax"

    def gamma(self, a: float, b: F64, c: F64, d2: F64) -> float:
        limit = float(d2.max())
        return min(_root(a, float(bi), float(ci), limit) for bi, ci in zip(b, c, strict=True))


@_register
class MinSum(_MinMaxBase):
    name = "minsum"

    def gamma(self, a: float, b: F64, c: F64, d2: F64) -> float:
        limit = float(d2.sum(axis=1).max())
        return _root(a * len(b), float(b.sum()), float(c.sum()), limit)


class _Optimal(Attack):
    """ByzFL's search over the attack scale tau against a known rule."""

    base: ClassVar[type[_Scaled]]

    def __init__(
        self,
        rule: Aggregator | str = "mean",
        evals: int = 20,
        start: float = 0.0,
        delta: float = 10.0,
        ratio: float = 0.8,
    ) -> None:
        from .spec import get_rule

        self.rule = get_rule(rule) if isinstance(rule, str) else rule
        if not isinstance(self.rule, Aggregator):
            raise TypeError(f"rule must be a rule spec or Aggregator, got {rule!r}")
        self.evals = check_int("evals", evals, minimum=1)
        self.start = check_float("start", start, minimum=-np.inf)
        self.delta = check_float("delta", delta, minimum=-np.inf)
        if self.delta == 0:
            raise ValueError("delta must be non-zero")
        self.ratio = check_float("ratio", ratio)
        if not 0.5 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0.5, 1), got {ratio!r}")

    def _damage(
        self, h: FloatArray, f: int, tau: float, mean: F64, rng: np.random.Generator
    ) -> float:
        byz = np.broadcast_to(self.base(tau).forge(h, f, rng), (f, h.shape[1]))
        agg = self.rule.aggregate(np.concatenate([h, byz.astype(h.dtype)]), None, rng=rng)
        return float(np.linalg.norm(np.asarray(agg, np.float64) - mean))

    def search(self, h: FloatArray, f: int, rng: np.random.Generator) -> float:
        mean = _mean(h)
        best_x, delta = self.start, self.delta
        best_y = self._damage(h, f, best_x, mean, rng)
        left = self.evals - 1
        while left > 0:  # expand while it helps
            y = self._damage(h, f, best_x + delta, mean, rng)
            left -= 1
            if y > best_y:
                best_x, best_y, delta = best_x + delta, y, delta * 2
            else:
                delta *= self.ratio
                break
        while left > 0:  # then contract around the best
            y = self._damage(h, f, best_x + delta, mean, rng)
            left -= 1
            if y > best_y:
                best_x, best_y = best_x + delta, y
            delta *= self.ratio
        return best_x

    def forge(self, h: FloatArray, f: int, rng: np.random.Generator) -> FloatArray:
        return self.base(self.search(h, f, rng)).forge(h, f, rng)


@_register
class OptimalIPM(_Optimal):
    name = "optimal_ipm"
    base = IPM


@_register
class OptimalALIE(_Optimal):
    name = "optimal_alie"
    base = ALIE


class _Noisy(Attack):
    """A coalition that adds independent noise per attacker to its one vector, so its
    members are not copies of each other (a duplicate check does not group them): each
    attacker sends ``base + noise * s * e`` with ``e ~ N(0, I)`` of its own and ``s`` the
    honest updates' per-coordinate standard deviation (``noise`` = 1 spreads the attackers
    about as the honest updates spread)."""

    base: ClassVar[type[_Scaled]]

    def __init__(self, tau: float | None = None, noise: float = 1.0) -> None:
        self.inner = self.base(tau)
        self.tau = self.inner.tau
        self.noise = check_float("noise", noise)

    def forge(self, h: FloatArray, f: int, rng: np.random.Generator) -> FloatArray:
        centre = np.asarray(self.inner.forge(h, f, rng), np.float64)
        std = h.std(axis=0, ddof=1, dtype=np.float64) if h.shape[0] > 1 else np.zeros(h.shape[1])
        out: F64 = centre + self.noise * std * rng.standard_normal((f, h.shape[1]))
        return out


@_register
class NoisyIPM(_Noisy):
    name = "noisy_ipm"
    base = IPM


@_register
class NoisyALIE(_Noisy):
    name = "noisy_alie"
    base = ALIE


def flip_labels(labels: Any, num_classes: int) -> Any:
    """Label flipping (data-level): y -> num_classes - 1 - y, as ByzFL's LabelFlipping."""
    num_classes = check_int("num_classes", num_classes, minimum=1)
    if isinstance(labels, torch.Tensor):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes})")
        return num_classes - 1 - labels
    y = np.asarray(labels)
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"labels must be integers, got {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return num_classes - 1 - y


class LabelFlip:
    """``get_attack("label_flip", num_classes=10)``: a function on labels, not updates."""

    name = _LABEL_FLIP
    data_level = True

    def __init__(self, num_classes: int = 10) -> None:
        self.num_classes = check_int("num_classes", num_classes, minimum=1)

    def __call__(self, labels: Any) -> Any:
        return flip_labels(labels, self.num_classes)


def list_attacks() -> list[str]:
    """Registered attacks, installed plug-ins (entry points of ``qflare.attacks``) included."""
    for name in entry_point_names(ATTACKS_GROUP):
        if name not in ATTACKS:
            load_attack_plugin(name)
    return sorted([*ATTACKS, LabelFlip.name])


def load_attack_plugin(name: str) -> type[Attack] | None:
    """The attack class a plug-in name stands for (``module:Class`` or an entry point of
    ``qflare.attacks``), registered under its own name; None when ``name`` is neither.
    Raises :class:`PluginError` when it is one that cannot be used."""
    obj = load_plugin(name, ATTACKS_GROUP)
    if obj is None:
        return None
    where = name if is_reference(name) else f"entry point {name!r} ({ATTACKS_GROUP})"
    if not (isinstance(obj, type) and issubclass(obj, Attack)):
        raise PluginError(
            f"{where} is not a subclass of qflare.robust.Attack (it is {describe(obj)})"
        )
    if not is_reference(name) and getattr(obj, "name", None) != name:
        raise PluginError(
            f"{where} loads {qualified_name(obj)}, whose name is {getattr(obj, 'name', None)!r}; "
            "the entry point's name and the class's name must agree"
        )
    return register_attack(obj)


def get_attack(name: str, **kwargs: Any) -> Attack | LabelFlip:
    """An attack by name (see ``list_attacks()``) or plug-in (``module:Class``, an entry
    point of ``qflare.attacks``), constructed with ``kwargs``."""
    key = name.strip()
    if not is_reference(key):
        key = key.lower()
    if key == LabelFlip.name:
        return LabelFlip(**kwargs)
    cls = ATTACKS.get(key) or load_attack_plugin(key)
    if cls is None:
        raise ValueError(
            f"unknown attack {name!r}; known: {list_attacks()} (plug-ins: module:Class, or an "
            f"entry point of group {ATTACKS_GROUP})"
        )
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise TypeError(f"attack {key}: {exc}") from None
