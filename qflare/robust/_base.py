"""Aggregator and pre-aggregator interfaces and the registry by name.

Shape follows ByzFL (hyperparameters checked in the constructor, requirements such as
``n > 2f`` checked at call with the numbers in the message) and Flower (maths as plain
functions over arrays). Every rule is stateless: anything that would carry over between
rounds (centered clipping's reference, bucketing's shuffle) is an explicit call argument.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeVar

import numpy as np

from qflare.errors import QflareError

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

_N = TypeVar("_N", bound="type[_Named]")

RULES: dict[str, type[Aggregator]] = {}
PRE_AGGREGATORS: dict[str, type[PreAggregator]] = {}

#: entry-point group of installed rule and pre-aggregator plug-ins
RULES_GROUP = "qflare.rules"


class PluginError(QflareError, ValueError):
    """A plug-in (``module:name`` or an installed entry point) that cannot be used: it does
    not import, does not exist, is not of the kind asked for, or its name is taken. The
    message is one line naming the plug-in and the reason."""


_REGISTERED_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_reference(name: str) -> bool:
    """Whether ``name`` names an object by ``module:name`` (rather than a registered name)."""
    return ":" in name


def qualified_name(obj: object) -> str:
    """``module:qualname`` of a class or function, as a reference to it would be written."""
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"


def load_reference(ref: str) -> object:
    """The object ``ref`` (``package.module:attr`` or ``...:Class.attr``) names, imported.

    Raises :class:`PluginError` with the reason alone (callers put the flag or setting in
    front): ``module mypkg.rules has no attribute 'nosuch'``.
    """
    module_name, _, attr = ref.strip().partition(":")
    if not _DOTTED.match(module_name) or not _DOTTED.match(attr):
        raise PluginError(
            f"{ref!r} is not a plug-in reference; write module:name, e.g. mypkg.rules:MyRule"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise PluginError(
                f"no module named {missing}; is it installed, or on sys.path (PYTHONPATH)?"
            ) from None
        raise PluginError(f"module {module_name} does not import: {exc}") from None
    except Exception as exc:  # the plug-in's own import-time failure, named as such
        raise PluginError(
            f"module {module_name} does not import: {type(exc).__name__}: {exc}"
        ) from None
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"module {module_name} has no attribute {attr!r}") from None
    return obj


def entry_point_names(group: str) -> list[str]:
    """Names of the entry points installed in ``group`` (nothing is imported)."""
    return sorted({ep.name for ep in importlib.metadata.entry_points(group=group)})


def load_entry_point(group: str, name: str) -> object | None:
    """The object the installed entry point ``name`` of ``group`` names, or None when no
    distribution declares one; a declared one that does not load raises PluginError."""
    found = {
        f"{ep.module}:{ep.attr}": ep
        for ep in importlib.metadata.entry_points(group=group)
        if ep.name == name
    }
    if not found:
        return None
    if len(found) > 1:
        raise PluginError(
            f"entry point {name!r} of group {group} is declared more than once: "
            f"{', '.join(sorted(found))}; uninstall one"
        )
    (ref,) = found
    try:
        return load_reference(ref)
    except PluginError as exc:
        raise PluginError(f"entry point {name!r} of group {group} ({ref}): {exc}") from None


def load_plugin(name: str, group: str) -> object | None:
    """What a plug-in name stands for: ``module:name`` is imported, any other name is
    looked up among the entry points of ``group``; None when it is neither."""
    if is_reference(name):
        return load_reference(name)
    return load_entry_point(group, name)


class PluginNames(list[str]):
    """Names a table knows (what it lists), whose ``in`` also accepts plug-ins:
    ``resolve(name)`` is called for a name not in the list and answers whether it stands
    for something usable (a ``module:name`` or an installed entry point). A resolver may
    raise instead of answering False, so that ``x in names`` fails with the reason (a
    plug-in that does not import) rather than a bare "unknown"."""

    def __init__(self, names: Iterable[str], resolve: Callable[[str], bool]) -> None:
        super().__init__(names)
        self._resolve = resolve

    def __contains__(self, name: object) -> bool:
        if super().__contains__(name):
            return True
        return isinstance(name, str) and self._resolve(name)


def check_registered_name(kind: str, cls: type, name: object) -> str:
    """The ``name`` a plug-in class registers under, checked: a lowercase identifier."""
    if not isinstance(name, str) or not _REGISTERED_NAME.match(name):
        raise PluginError(
            f"{kind} {qualified_name(cls)} needs name = '<lowercase identifier>' (letters, "
            f"digits and _, e.g. 'my_rule'), got {name!r}"
        )
    return name


def register_in(
    table: dict[str, Any], kind: str, cls: type, others: Iterable[dict[str, Any]] = ()
) -> None:
    """Put ``cls`` into ``table`` under its ``name``: a second class may not take a name
    registered in ``table`` or ``others`` (the same class again, or one re-imported, may)."""
    name = check_registered_name(kind, cls, getattr(cls, "name", None))
    held = next((t[name] for t in (table, *others) if name in t), None)
    if held is not None and held is not cls and qualified_name(held) != qualified_name(cls):
        raise PluginError(
            f"{kind} name {name!r} is taken by {qualified_name(held)}; give "
            f"{qualified_name(cls)} another name"
        )
    table[name] = cls


def register_rule(cls: _N) -> _N:
    """Make a rule (an :class:`Aggregator` subclass) or a pre-aggregator (a
    :class:`PreAggregator` subclass) available to rule specs by its ``name``; usable as a
    class decorator. The class is built with the spec's parameters (``my_rule(f=2)``), so
    its constructor should check them (ByzFL's shape: check at construction, again at
    call). Raises :class:`PluginError` for a class of neither kind, a name that is not a
    lowercase identifier, or a name another class holds."""
    if isinstance(cls, type) and issubclass(cls, Aggregator) and not issubclass(cls, Chain):
        register_in(RULES, "rule", cls, [PRE_AGGREGATORS])
    elif isinstance(cls, type) and issubclass(cls, PreAggregator):
        register_in(PRE_AGGREGATORS, "pre-aggregator", cls, [RULES])
    else:
        raise PluginError(
            f"{qualified_name(cls)} is not a rule: subclass qflare.robust.Aggregator "
            "(or PreAggregator) and give it a name"
        )
    return cls


#: pre-aggregators register the same way (the class's base decides the table)
register_pre = register_rule


def load_rule_plugin(name: str) -> type[Aggregator] | type[PreAggregator] | None:
    """The rule or pre-aggregator class a plug-in name stands for (``module:Class`` or an
    entry point of ``qflare.rules``), registered under its own name; None when ``name`` is
    neither. Raises :class:`PluginError` when it is one that cannot be used."""
    obj = load_plugin(name, RULES_GROUP)
    if obj is None:
        return None
    where = name if is_reference(name) else f"entry point {name!r} ({RULES_GROUP})"
    if not (isinstance(obj, type) and issubclass(obj, (Aggregator, PreAggregator))):
        raise PluginError(
            f"{where} is not a subclass of qflare.robust.Aggregator or PreAggregator "
            f"(it is {describe(obj)})"
        )
    if not is_reference(name) and getattr(obj, "name", None) != name:
        raise PluginError(
            f"{where} loads {qualified_name(obj)}, whose name is {getattr(obj, 'name', None)!r}; "
            "the entry point's name and the class's name must agree"
        )
    register_rule(obj)
    return obj


def describe(obj: object) -> str:
    """What a plug-in reference turned out to be, for an error message."""
    if isinstance(obj, type):
        bases = ", ".join(b.__name__ for b in obj.__bases__)
        return f"a class deriving from {bases}"
    if callable(obj):
        return "a function"
    return f"a {type(obj).__name__}"


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
