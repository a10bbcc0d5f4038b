"""Bounded user values on the wire: metrics and round configs (pure, no I/O).

*Metrics* are what participants report (an update's training metrics, an evaluation's
metrics) and what the aggregator publishes from them: a map name -> finite float, at most
:data:`MAX_METRICS` names, each 1-64 characters of letters, digits and ``_.:/-`` starting
with a letter or ``_``. Anything else is refused with :attr:`Reason.BAD_METRICS`.

A *round config* is what a job sends its participants each round (``round.opened``'s
``config``, the SDK's ``round_info.config``): a JSON-like map (str keys; values None, bool,
int, finite float, str, lists and maps of those), at most :data:`MAX_CONFIG_DEPTH` levels,
:data:`MAX_CONFIG_ITEMS` values in all, :data:`MAX_CONFIG_STR` characters per string and
:data:`MAX_CONFIG_BYTES` as JSON. Too big: :attr:`Reason.TOO_LARGE`; another type:
:attr:`Reason.BAD_SCHEMA`.

The checks raise :class:`MessageRejected`; inside a pydantic model they are the
``PlainValidator`` of :data:`Metrics` / :data:`RoundConfig`, whose error carries the reason
code so that :func:`qflare.messages.bodies.body_from_wire` refuses the message with it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from qflare.messages.errors import MessageRejected, Reason

#: Names in one metrics map.
MAX_METRICS = 32
#: Characters in one metric name.
MAX_METRIC_NAME = 64
_METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,63}$")

#: Nesting of a round config (the top-level map is level 1).
MAX_CONFIG_DEPTH = 4
#: Values (leaves and containers, the top-level map excluded) in one round config.
MAX_CONFIG_ITEMS = 256
#: Characters in one string (key or value) of a round config.
MAX_CONFIG_STR = 1024
#: A round config as compact JSON.
MAX_CONFIG_BYTES = 16 * 1024

#: The error type a pydantic validator of this module raises (its context holds the reason).
ERROR_TYPE = "qflare_reason"


def finite(value: Any, what: str) -> float:
    """``value`` as a float: an int or float (not a bool), or a numpy number, that is
    finite; else BAD_METRICS."""
    numpy_number = getattr(value, "shape", None) == () and getattr(value, "dtype", None) is not None
    if numpy_number:
        if value.dtype.kind not in "iuf":
            raise MessageRejected(Reason.BAD_METRICS, f"{what} must be a number, got {value.dtype}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MessageRejected(
            Reason.BAD_METRICS, f"{what} must be a number, got {type(value).__name__}"
        )
    number = float(value)
    if not math.isfinite(number):
        raise MessageRejected(Reason.BAD_METRICS, f"{what} is {number}, not a finite number")
    return number


def check_metrics(value: Any, what: str = "metrics") -> dict[str, float]:
    """``value`` as metrics (name -> finite float), checked; MessageRejected(BAD_METRICS)
    naming the first thing wrong."""
    if not isinstance(value, Mapping):
        raise MessageRejected(
            Reason.BAD_METRICS,
            f"{what} must be a map of name -> number, got {type(value).__name__}",
        )
    if len(value) > MAX_METRICS:
        raise MessageRejected(
            Reason.BAD_METRICS, f"{what} has {len(value)} names, at most {MAX_METRICS} allowed"
        )
    out: dict[str, float] = {}
    for name, number in value.items():
        if not isinstance(name, str) or not _METRIC_NAME.match(name):
            shown = repr(name)[:80]
            raise MessageRejected(
                Reason.BAD_METRICS,
                f"{what}: name {shown} is not 1-{MAX_METRIC_NAME} characters of letters, "
                "digits and _.:/- starting with a letter or _",
            )
        out[name] = finite(number, f"{what}[{name!r}]")
    return out


def check_round_config(value: Any, what: str = "round config") -> dict[str, Any]:
    """``value`` as a round config (a bounded JSON-like map), checked; MessageRejected
    (TOO_LARGE for a bound, BAD_SCHEMA for a type) naming the first thing wrong. Returns a
    plain copy (dicts and lists, floats finite)."""
    if not isinstance(value, Mapping):
        raise MessageRejected(
            Reason.BAD_SCHEMA, f"{what} must be a map (str -> value), got {type(value).__name__}"
        )
    count = [0]
    out = _config_map(value, what, 1, count)
    size = len(json.dumps(out, separators=(",", ":")))
    if size > MAX_CONFIG_BYTES:
        raise MessageRejected(
            Reason.TOO_LARGE, f"{what} takes {size} bytes as JSON, at most {MAX_CONFIG_BYTES}"
        )
    return out


def _config_map(
    value: Mapping[Any, Any], where: str, depth: int, count: list[int]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise MessageRejected(Reason.BAD_SCHEMA, f"{where}: key {key!r:.40} is not a string")
        _config_str(key, f"{where}: key")
        out[key] = _config_value(item, f"{where}[{key[:40]!r}]", depth, count)
    return out


def _config_str(text: str, where: str) -> None:
    if len(text) > MAX_CONFIG_STR:
        raise MessageRejected(
            Reason.TOO_LARGE, f"{where} has {len(text)} characters, at most {MAX_CONFIG_STR}"
        )


def _config_value(value: Any, where: str, depth: int, count: list[int]) -> Any:
    count[0] += 1
    if count[0] > MAX_CONFIG_ITEMS:
        raise MessageRejected(
            Reason.TOO_LARGE, f"{where}: more than {MAX_CONFIG_ITEMS} values in the config"
        )
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MessageRejected(Reason.BAD_SCHEMA, f"{where} is {value}, not a finite number")
        return value
    if isinstance(value, str):
        _config_str(value, where)
        return value
    if isinstance(value, (Mapping, list, tuple)):
        if depth >= MAX_CONFIG_DEPTH:
            raise MessageRejected(
                Reason.TOO_LARGE, f"{where} nests deeper than {MAX_CONFIG_DEPTH} levels"
            )
        if isinstance(value, Mapping):
            return _config_map(value, where, depth + 1, count)
        return [_config_value(v, f"{where}[{i}]", depth + 1, count) for i, v in enumerate(value)]
    raise MessageRejected(
        Reason.BAD_SCHEMA,
        f"{where} is a {type(value).__name__}; a round config holds None, bool, int, float, "
        "str, lists and maps",
    )


def _pydantic(check: Any) -> Any:
    def validate(value: Any) -> Any:
        try:
            return check(value)
        except MessageRejected as exc:
            raise PydanticCustomError(
                ERROR_TYPE, "{detail}", {"reason": exc.reason.value, "detail": exc.detail}
            ) from None

    return PlainValidator(validate)


Metrics = Annotated[
    dict[str, float],
    _pydantic(check_metrics),
    WithJsonSchema(
        {
            "type": "object",
            "maxProperties": MAX_METRICS,
            "additionalProperties": {"type": "number"},
            "description": "metric name -> finite number",
        }
    ),
]
"""A metrics map as a body field (checked by :func:`check_metrics`)."""

Finite = Annotated[
    float,
    _pydantic(lambda value: finite(value, "value")),
    WithJsonSchema({"type": "number", "description": "a finite number"}),
]
"""A finite number as a body field (BAD_METRICS otherwise)."""

RoundConfig = Annotated[
    dict[str, Any],
    _pydantic(check_round_config),
    WithJsonSchema({"type": "object", "description": "bounded JSON-like map"}),
]
"""A round config as a body or job field (checked by :func:`check_round_config`)."""


def reason_of(errors: Iterable[Mapping[str, Any]]) -> Reason | None:
    """The reason code a validator of this module put into the first error of a pydantic
    error list (None: the first error is another schema fault)."""
    for error in errors:
        if error.get("type") != ERROR_TYPE:
            return None
        try:
            return Reason((error.get("ctx") or {}).get("reason", ""))
        except ValueError:
            return None
    return None
