"""Building rule chains from text specs or config data.

``"nnm+multikrum(f=3)"``: parts joined by ``+``; every part but the last is a
pre-aggregator, the last is a rule; arguments are Python literals. The config forms
build the same chain. A pre-aggregator that takes f and is given none inherits the
rule's f: ``"nnm+multikrum(f=3)"`` is ``"nnm(f=3)+multikrum(f=3)"``. Config forms: a
list of parts (strings or ``{"name": ..., **params}``), or a mapping
``{"rule": name | part, "pre": [parts], **params_of_the_rule}``.

A part may also name a plug-in: ``mypkg.rules:MyRule(f=2)`` imports the class (an
:class:`Aggregator` or :class:`PreAggregator` subclass) and registers it under its ``name``;
a name that is not registered is looked up among the installed entry points of the group
``qflare.rules``. A plug-in that cannot be used raises :class:`PluginError` with the reason.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Mapping, Sequence
from typing import Any

from . import pre as _pre  # noqa: F401  (registers pre-aggregators)
from . import rules as _rules  # noqa: F401  (registers rules)
from ._base import (
    PRE_AGGREGATORS,
    RULES,
    RULES_GROUP,
    Aggregator,
    Chain,
    PreAggregator,
    entry_point_names,
    is_reference,
    load_rule_plugin,
)

ALIASES = {
    "fedavg": "mean",
    "average": "mean",
    "trmean": "trimmed_mean",
    "multi_krum": "multikrum",
    "geometric_median": "geomed",
    "rfa": "geomed",
    "centered_clipping": "cc",
    "clipping": "clip",
    "static_clip": "clip",
}

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = rf"{_IDENT}(?:\.{_IDENT})*"
_PART = re.compile(rf"^\s*({_IDENT}|{_DOTTED}:{_DOTTED})\s*(?:\((.*)\))?\s*$", re.S)
_PLUGINS_HINT = f"plug-ins: module:Class, or an entry point of group {RULES_GROUP}"


def list_rules() -> dict[str, list[str]]:
    """Registered names, installed plug-ins (entry points of ``qflare.rules``) included:
    {"rules": [...], "pre": [...]}."""
    for name in entry_point_names(RULES_GROUP):
        if name not in RULES and name not in PRE_AGGREGATORS:
            load_rule_plugin(name)
    return {"rules": sorted(RULES), "pre": sorted(PRE_AGGREGATORS)}


def _parse_part(text: str) -> tuple[str, dict[str, Any]]:
    m = _PART.match(text)
    if not m:
        raise ValueError(f"cannot parse rule part {text!r}; expected name or name(k=v, ...)")
    name, args = m.group(1), m.group(2)
    if not is_reference(name):
        name = name.lower()
    params: dict[str, Any] = {}
    if args and args.strip():
        try:
            call = ast.parse(f"_({args})", mode="eval").body
        except SyntaxError as exc:
            raise ValueError(f"cannot parse arguments of {text!r}: {exc.msg}") from None
        assert isinstance(call, ast.Call)
        if call.args:
            raise ValueError(f"arguments of {text!r} must be named, e.g. f=2")
        for kw in call.keywords:
            try:
                params[str(kw.arg)] = ast.literal_eval(kw.value)
            except ValueError:
                raise ValueError(f"argument {kw.arg} of {text!r} must be a literal") from None
    return name, params


def _as_part(item: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(item, str):
        return _parse_part(item)
    if isinstance(item, Mapping):
        if "name" not in item:
            raise ValueError(f"rule part {dict(item)!r} has no 'name'")
        params = {k: v for k, v in item.items() if k != "name"}
        name, inline = _parse_part(str(item["name"]))
        return name, {**inline, **params}
    raise TypeError(f"rule part must be a string or mapping, got {type(item).__name__}")


Part = type[Aggregator] | type[PreAggregator]


def _accepts(cls: Part, key: str) -> bool:
    return key in inspect.signature(cls).parameters


def _build(cls: Part, name: str, params: dict[str, Any]) -> Aggregator | PreAggregator:
    for key in params:
        if not _accepts(cls, key):
            allowed = list(inspect.signature(cls).parameters)
            raise TypeError(f"{name} takes no parameter {key!r}; it takes {allowed}")
    return cls(**params)


def _resolve(name: str, *, last: bool) -> Part:
    """The class a part names: registered, or a plug-in (``module:Class``, entry point)."""
    cls: Part | None = RULES.get(name) or PRE_AGGREGATORS.get(name)
    if cls is None:
        cls = load_rule_plugin(name)  # None: no such plug-in
    kind, table = ("rule", RULES) if last else ("pre-aggregator", PRE_AGGREGATORS)
    if cls is not None and issubclass(cls, Aggregator if last else PreAggregator):
        return cls
    hint = "" if cls is None else " (rules go last, pre-aggregators before them)"
    raise ValueError(f"unknown {kind} {name!r}{hint}; known: {sorted(table)} ({_PLUGINS_HINT})")


def get_rule(spec: str | Sequence[Any] | Mapping[str, Any], **overrides: Any) -> Aggregator:
    """Build a rule or chain. ``overrides`` go to every part that takes that parameter."""
    if isinstance(spec, str):
        parts = [_parse_part(p) for p in spec.split("+")] if spec.strip() else []
    elif isinstance(spec, Mapping):
        if "rule" not in spec:
            raise ValueError(f"rule config {dict(spec)!r} has no 'rule'")
        rname, rparams = _as_part(spec["rule"])
        rparams = {**rparams, **{k: v for k, v in spec.items() if k not in ("rule", "pre")}}
        pre_parts = spec.get("pre", [])
        if isinstance(pre_parts, (str, Mapping)):
            pre_parts = [pre_parts]
        parts = [_as_part(p) for p in pre_parts] + [(rname, rparams)]
    elif isinstance(spec, Sequence):
        parts = [_as_part(p) for p in spec]
    else:
        raise TypeError(f"rule spec must be a string, list or mapping, got {type(spec).__name__}")
    if not parts:
        raise ValueError("empty rule spec; expected e.g. 'median' or 'nnm+krum(f=2)'")
    resolved: list[tuple[Part, str, dict[str, Any]]] = []
    for i, (name, params) in enumerate(parts):
        name = ALIASES.get(name, name)
        resolved.append((_resolve(name, last=i == len(parts) - 1), name, dict(params)))
    for key, value in overrides.items():
        takers = [r for r in resolved if _accepts(r[0], key)]
        if not takers:
            raise TypeError(f"no part of {spec!r} takes parameter {key!r}")
        for r in takers:
            r[2][key] = value
    # "nnm+multikrum(f=3)": a pre-aggregator that takes f and was given none inherits the
    # rule's f (NNM with f=0 would average everything into the mean).
    rule_f = resolved[-1][2].get("f")
    if rule_f is not None:
        for cls, _, params in resolved[:-1]:
            if "f" not in params and _accepts(cls, "f"):
                params["f"] = rule_f
    built = [_build(cls, name, params) for cls, name, params in resolved]
    # The tables above put a rule last and only pre-aggregators before it.
    rule = built[-1]
    assert isinstance(rule, Aggregator)
    pres = [p for p in built[:-1] if isinstance(p, PreAggregator)]
    return Chain(pres, rule) if pres else rule
