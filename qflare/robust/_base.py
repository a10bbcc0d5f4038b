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
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, TypeVar

import numpy as np

from qflare.errors import QflareError

from ._core import (
    F64,
    ArrayLike,
    BoolArray,
    FloatArray,
    IntArray,
    RngLike,
    Weights,
    as_batch,
    check_int,
    finite_from_gram,
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
    f_left = lowered_f(mask, f, rule)
    if f_left == f:
        return x, w, f
    return x[mask], (None if w is None else w[mask]), f_left


def lowered_f(mask: BoolArray, f: int, rule: str) -> int:
    """f less the rows ``mask`` leaves out, refused when more than f are left out."""
    bad = int(mask.size - mask.sum())
    require(bad <= f, rule, f"{bad} updates are non-finite but f={f}")
    return f - bad


class BlockwiseUnsupported(QflareError, TypeError):
    """A rule or pre-aggregator that has no block-wise form (no ``plan``): it can only run
    on the whole n x d matrix in memory. The message names it and what to implement."""


class GramView:
    """Rows known only by their geometry, as a rule sees them when the n x d matrix is read
    one column block at a time: the float64 Gram matrix of the rows and, when a reference
    vector was given, their inner products with it (the reference is row n of ``aug``).

    ``load`` is called at most once, on first use of the geometry: a coordinate-wise rule
    with no pre-aggregator never needs it, so its round is one pass over the blocks.
    ``dtype`` is the rows' dtype: a row whose squared norm overflows it counts as
    non-finite, as :func:`finite_rows` counts it in memory.
    """

    def __init__(
        self, n: int, dtype: np.dtype[Any], load: Callable[[], F64], *, has_ref: bool = False
    ) -> None:
        self.n = n
        self.dtype = dtype
        self.has_ref = has_ref
        self._load = load

    @cached_property
    def aug(self) -> F64:
        """Gram matrix of the rows, then the reference ([n + 1, n + 1] with one)."""
        g = self._load()
        size = self.n + int(self.has_ref)
        if g.shape != (size, size):
            raise ValueError(f"Gram matrix of shape {g.shape} for {size} rows")
        return g

    @property
    def g(self) -> F64:
        out: F64 = self.aug[: self.n, : self.n]
        return out

    @property
    def ref_dots(self) -> F64 | None:
        """x_i . reference for every row, None without a reference."""
        return self.aug[: self.n, self.n] if self.has_ref else None

    @cached_property
    def finite(self) -> BoolArray:
        """Rows the geometry can use: finite, squared norm representable in ``dtype``."""
        return finite_from_gram(self.g, self.dtype)

    def sub(self, idx: IntArray) -> F64:
        """Gram matrix of the rows ``idx``."""
        out: F64 = self.g[np.ix_(idx, idx)]
        return out

    def mapped(self, t: F64) -> GramView:
        """The view of the rows ``t @ X`` ([m, n] coefficients; the reference is kept).

        Non-finite rows enter only where ``t`` reads them (:func:`reads`): 0 * NaN must
        not poison the rows that leave them out, and a row that does read one is
        non-finite.
        """
        ok = self.finite
        has_ref = self.has_ref

        def load() -> F64:
            m = t.shape[0]
            ext = np.zeros((m + int(has_ref), self.n + int(has_ref)))
            ext[:m, : self.n][:, ok] = t[:, ok]
            if has_ref:
                ext[m, self.n] = 1.0
            cols = np.flatnonzero(np.concatenate([ok, [True] * int(has_ref)]))
            e = ext[:, cols]
            out: F64 = e @ self.aug[np.ix_(cols, cols)] @ e.T
            tainted = np.any(reads(t)[:, ~ok], axis=1)
            out[:m][tainted] = np.nan
            out[:, :m][:, tainted] = np.nan
            return (out + out.T) * 0.5

        return GramView(t.shape[0], self.dtype, load, has_ref=has_ref)


def is_scaling(t: F64) -> bool:
    """Whether a pre-aggregator's map only scales each row (clipping, ARC)."""
    n = t.shape[0]
    return t.shape == (n, n) and not np.any(t[~np.eye(n, dtype=bool)])


def reads(t: F64) -> BoolArray:
    """Which input rows each row of a pre-aggregator's map reads: those with a nonzero
    coefficient (NNM's neighbours, a bucket's members), and for a row scaling its own
    row even at scale 0 (clipping an Inf row: 0 * Inf is NaN in memory too)."""
    r: BoolArray = t != 0
    if is_scaling(t):
        np.fill_diagonal(r, True)
    return r


@dataclass(frozen=True)
class RowPlan:
    """How a rule's result is built from rows it saw only through a :class:`GramView`:
    the rows ``coef @ X`` ([m, n] coefficients, plus ``ref_coef`` [m] times the reference
    when given) are formed one column block at a time, and ``per_block`` maps each block
    of them ([m, b]) to the result's block [b]; None means m == 1 and that row is the
    result. Coordinate-wise rules are ``per_block`` over the rows they keep; distance-
    based ones are one row of coefficients. In a chain, X is first replaced by
    ``maps[-1] @ ... @ maps[0] @ X`` (the pre-aggregators' maps, each applied to the
    block as the pre-aggregator would: :func:`reads`), which ``coef`` then reads."""

    coef: F64
    per_block: Callable[[FloatArray], FloatArray] | None = None
    ref_coef: F64 | None = None
    maps: tuple[F64, ...] = ()


def linear_plan(n: int, idx: IntArray, coef: F64) -> RowPlan:
    """The plan whose result is ``sum_j coef_j x_idx[j]``: coefficients over the rows
    ``idx`` of n (the finite ones a rule kept) spread back over all n."""
    full: F64 = np.zeros((1, n))
    full[0, idx] = coef
    return RowPlan(full)


def rows_plan(n: int, idx: IntArray, per_block: Callable[[FloatArray], FloatArray]) -> RowPlan:
    """The plan that hands the rows ``idx`` of n (in that order) to ``per_block``."""
    sel: F64 = np.zeros((len(idx), n))
    sel[np.arange(len(idx)), idx] = 1.0
    return RowPlan(sel, per_block)


def as_generator(rng: RngLike) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


class _Named(ABC):
    """Registered by ``name``; shown as ``name(param=value, ...)``, which parses back."""

    name: ClassVar[str]
    #: the constructor's arguments that ``repr`` shows, each read back from the attribute
    #: of the same name
    param_names: ClassVar[tuple[str, ...]] = ()

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.name}({params})"

    def params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.param_names}


class FParam:
    """Mixin for a rule or pre-aggregator parametrised by f, the number of Byzantine
    updates it tolerates (ByzFL's f)."""

    param_names: ClassVar[tuple[str, ...]] = ("f",)

    def __init__(self, f: int = 0) -> None:
        self.f = check_int("f", f)


class Aggregator(_Named):
    """A robust aggregation rule: ``rule(updates [n, d], weights [n] | None) -> [d]``.

    Returns the same kind (NumPy array or CPU tensor) and dtype it was given and never
    writes to its input. ``reference`` is read only by rules that need a starting point
    (centered clipping); ``rng`` only by randomised pre-aggregators (bucketing).
    """

    #: whether the rule has a defined weighted form; others refuse unequal weights.
    weighted: ClassVar[bool] = False
    #: whether ``apply`` works coordinate by coordinate on all rows, so that it runs on
    #: column blocks as it is (mean, median, trimmed mean)
    coordinatewise: ClassVar[bool] = False

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

    def plan(self, view: GramView, w: Weights, *, rng: RngLike = None) -> RowPlan:
        """The rule on rows known by their Gram matrix (``qflare.robust.blocks``): what to
        form from them block by block. Must give what ``aggregate`` gives on the rows."""
        if type(self).coordinatewise:
            return rows_plan(view.n, np.arange(view.n), lambda xb: self.apply(xb, w))
        raise BlockwiseUnsupported(
            f"rule {self.name} ({qualified_name(type(self))}) has no block-wise form; "
            "implement plan(view, w, rng=) or set coordinatewise = True if apply works "
            "column by column"
        )


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

    def plan(self, view: GramView, w: Weights, *, rng: RngLike = None) -> tuple[F64, Weights]:
        """``transform`` as a linear map of rows known by their Gram matrix: the new rows
        are ``t @ X`` for the returned t [m, n], with the new weights."""
        raise BlockwiseUnsupported(
            f"pre-aggregator {self.name} ({qualified_name(type(self))}) has no block-wise "
            "form; implement plan(view, w, rng=) returning its rows as coefficients"
        )


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

    def plan(self, view: GramView, w: Weights, *, rng: RngLike = None) -> RowPlan:
        """The pre-aggregators' maps in order, the rule's plan on the rows they give."""
        gen = as_generator(rng)
        maps = []
        for p in self.pres:
            t, w = p.plan(view, w, rng=gen)
            view = view.mapped(t)
            maps.append(t)
        refuse_unequal_weights(self.rule, w, "its pre-aggregators left unequal weights")
        out = self.rule.plan(view, w, rng=gen)
        return RowPlan(out.coef, out.per_block, out.ref_coef, (*maps, *out.maps))

    def __repr__(self) -> str:
        return "+".join([repr(p) for p in self.pres] + [repr(self.rule)])


def has_blockwise_form(agg: Aggregator | PreAggregator) -> bool:
    """Whether ``agg`` (a chain: each of its parts) runs on column blocks: it overrides
    ``plan``, or is a coordinate-wise rule. A plug-in without one runs in memory only."""
    if isinstance(agg, Chain):
        return all(has_blockwise_form(p) for p in agg.pres) and has_blockwise_form(agg.rule)
    base = PreAggregator if isinstance(agg, PreAggregator) else Aggregator
    if type(agg).plan is not base.plan:
        return True
    return isinstance(agg, Aggregator) and type(agg).coordinatewise


def refuse_unequal_weights(rule: Aggregator, w: Weights, fix: str) -> None:
    if w is not None and not rule.weighted and not np.all(w == w[0]):
        raise ValueError(f"{rule.name} has no weighted form; {fix}")


def as_reference(reference: ArrayLike, d: int) -> FloatArray:
    b = as_batch(reference.reshape(1, -1) if hasattr(reference, "reshape") else reference)
    require(b.x.shape == (1, d), "reference", f"reference must have {d} entries, got {b.x.size}")
    row: FloatArray = b.x[0]
    return row
