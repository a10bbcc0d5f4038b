"""A job's plug-ins: its central ``evaluate_fn`` and its ``round_config`` function.

Both are ``module:function`` references in the job spec (:class:`qflare.messages.jobs.
JobSpec`), imported with the plug-in loader the rules use (:func:`qflare.robust.
load_reference`). :func:`load_hooks` imports and checks them when the job is accepted (the
config file is loaded, or a job is submitted): each must be a function taking its
arguments, and a round-config function's answer for round 1 must be a valid round config.
A reference that does not import, names nothing or is not such a function is one
:class:`qflare.robust.PluginError` line naming the key: ``evaluate_fn = 'mypkg.ev:nosuch':
module mypkg.ev has no attribute 'nosuch'``.

While the job runs, a call that raises or answers out of bounds is a :class:`HookFailed`
(the aggregator alerts; a round config it cannot compute ends the job).

* ``round_config(round) -> dict``: the config ``round.opened`` carries for that round
  (checked by :func:`qflare.messages.values.check_round_config`); a job without a function
  sends its ``round_config`` table every round.
* ``evaluate_fn(version, tensors, config) -> (loss, num_examples, metrics)``: the
  aggregator calls it on each new model version (``tensors``: name -> numpy array,
  ``config``: the config of the round that produced it) before it publishes the version;
  the result is published as ``metrics.evaluated`` (source ``central``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from qflare.errors import QflareError
from qflare.messages.bodies import Evaluation
from qflare.messages.errors import MessageRejected
from qflare.messages.jobs import JobSpec
from qflare.messages.values import check_round_config
from qflare.robust._base import PluginError, load_reference

T = TypeVar("T")
EvaluateFn = Callable[[int, Mapping[str, np.ndarray], Mapping[str, Any]], Any]
ConfigFn = Callable[[int], Any]


class HookFailed(QflareError):
    """A job's plug-in raised, or answered something out of bounds, while the job ran."""

    reason = "HOOK_FAILED"


@dataclass(frozen=True)
class JobHooks:
    """A job's loaded plug-ins (``None``: the job names none)."""

    spec: JobSpec
    evaluate_fn: EvaluateFn | None = None
    config_fn: ConfigFn | None = None
    broken: str | None = None
    """Why the plug-ins could not be loaded again (an aggregator restarted after the
    module went away): every call then fails with it."""

    def round_config(self, round_no: int) -> dict[str, Any]:
        """The config of round ``round_no``."""
        if self.broken is not None and isinstance(self.spec.round_config, str):
            raise HookFailed(self.broken)
        fn = self.config_fn
        if fn is None:
            assert isinstance(self.spec.round_config, dict)
            return self.spec.round_config
        return _call(
            "round_config",
            self.spec.round_config,
            lambda: check_round_config(fn(round_no), f"round {round_no}'s config"),
        )

    def evaluate(
        self, version: int, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any]
    ) -> Evaluation | None:
        """``evaluate_fn`` on model ``version`` (None: the job has none)."""
        if self.spec.evaluate_fn is None:
            return None
        if self.broken is not None or self.evaluate_fn is None:
            raise HookFailed(self.broken or "evaluate_fn not loaded")
        fn = self.evaluate_fn
        return _call(
            "evaluate_fn",
            self.spec.evaluate_fn,
            lambda: Evaluation.of(fn(version, tensors, dict(config)), "evaluate_fn"),
        )


def _call(key: str, ref: object, run: Callable[[], T]) -> T:
    try:
        return run()
    except MessageRejected as exc:
        raise HookFailed(f"{key} = {ref!r}: {exc.reason.value}: {exc.detail}") from None
    except Exception as exc:  # the plug-in's own failure, named as such
        raise HookFailed(f"{key} = {ref!r} raised {type(exc).__name__}: {exc}") from None


def _function(key: str, ref: str, *args: object) -> Callable[..., Any]:
    """The function ``ref`` names, checked to accept ``args``; PluginError naming ``key``."""
    try:
        obj = load_reference(ref)
    except PluginError as exc:
        raise PluginError(f"{key} = {ref!r}: {exc}") from None
    if not callable(obj):
        raise PluginError(
            f"{key} = {ref!r}: names an object of type {type(obj).__name__}, not a function"
        )
    try:
        inspect.signature(obj).bind(*args)
    except TypeError as exc:
        raise PluginError(
            f"{key} = {ref!r}: cannot be called with {len(args)} arguments ({exc})"
        ) from None
    except ValueError:
        pass  # a builtin without a signature: the first call tells
    return obj


def load_hooks(spec: JobSpec) -> JobHooks:
    """Import and check ``spec``'s plug-ins (see the module doc); PluginError naming the
    key when one cannot be used."""
    evaluate_fn = None
    config_fn = None
    if spec.evaluate_fn is not None:
        evaluate_fn = _function("evaluate_fn", spec.evaluate_fn, 0, {}, {})
    if isinstance(spec.round_config, str):
        config_fn = _function("round_config", spec.round_config, 1)
    hooks = JobHooks(spec, evaluate_fn, config_fn)
    try:
        hooks.round_config(1)
    except HookFailed as exc:
        raise PluginError(f"{exc} (for round 1, when the job was accepted)") from None
    return hooks


def reload_hooks(spec: JobSpec) -> JobHooks:
    """:func:`load_hooks` for a job accepted earlier (an aggregator restart): a plug-in that
    no longer loads does not stop the others' jobs; its calls fail with the reason."""
    try:
        return load_hooks(spec)
    except PluginError as exc:
        return JobHooks(spec, broken=str(exc))
