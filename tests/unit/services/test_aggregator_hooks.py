"""A job's plug-ins (services/aggregator/hooks.py): loaded and checked when the job is
accepted, one error line naming the key; a failure while the job runs is a HookFailed."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from qflare.messages.bodies import Evaluation
from qflare.messages.jobs import JobSpec
from qflare.robust import PluginError
from qflare.services.aggregator.hooks import HookFailed, load_hooks, reload_hooks

PLUGIN = """
import numpy as np

calls = []

def config(round_no):
    return {"lr": 0.1 / round_no, "round": round_no}

def too_big(round_no):
    return {"notes": "x" * 5000}

def late_failure(round_no):
    if round_no > 1:
        raise RuntimeError("no schedule past round 1")
    return {"lr": 0.1}

def evaluate(version, tensors, config):
    calls.append((version, dict(config)))
    return float(np.sum(tensors["w"])), 7, {"accuracy": 0.5}

def evaluate_nan(version, tensors, config):
    return float("nan"), 7, {}

def evaluate_shape(version, tensors, config):
    return {"loss": 1.0}

def one_arg(version):
    return 0.0, 1, {}

not_a_function = 3
"""


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[str]:
    name = f"qflare_test_hooks_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN))
    sys.path.insert(0, str(tmp_path))
    try:
        yield name
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def spec(**extra: object) -> JobSpec:
    return JobSpec.model_validate({"job_id": "j", "rounds": 3, "participants": ["a", "b"], **extra})


def test_a_job_without_plug_ins_sends_its_table(plugin: str) -> None:
    hooks = load_hooks(spec(round_config={"lr": 0.05}))
    assert hooks.round_config(1) == hooks.round_config(3) == {"lr": 0.05}
    assert hooks.evaluate(1, {"w": np.ones(2)}, {}) is None


def test_plug_ins_are_called_per_round(plugin: str) -> None:
    hooks = load_hooks(spec(round_config=f"{plugin}:config", evaluate_fn=f"{plugin}:evaluate"))
    assert hooks.round_config(2) == {"lr": 0.05, "round": 2}
    got = hooks.evaluate(2, {"w": np.full(3, 2.0)}, {"lr": 0.05})
    assert got == Evaluation(loss=6.0, num_examples=7, metrics={"accuracy": 0.5})
    assert sys.modules[plugin].calls == [(2, {"lr": 0.05})]


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        (
            {"evaluate_fn": "no_such_module_q:f"},
            "evaluate_fn = 'no_such_module_q:f': no module "
            "named no_such_module_q; is it installed, or on sys.path (PYTHONPATH)?",
        ),
        (
            {"evaluate_fn": "{p}:nosuch"},
            "evaluate_fn = '{p}:nosuch': module {p} has no attribute 'nosuch'",
        ),
        (
            {"evaluate_fn": "{p}:not_a_function"},
            "evaluate_fn = '{p}:not_a_function': names an object of type int, not a function",
        ),
        (
            {"evaluate_fn": "{p}:one_arg"},
            "evaluate_fn = '{p}:one_arg': cannot be called with 3 arguments",
        ),
        (
            {"round_config": "{p}:evaluate"},
            "round_config = '{p}:evaluate': cannot be called with 1 arguments",
        ),
        (
            {"round_config": "{p}:too_big"},
            "round_config = '{p}:too_big': TOO_LARGE: round 1's "
            "config['notes'] has 5000 characters, at most 1024 (for round 1, when the job was "
            "accepted)",
        ),
    ],
)
def test_a_plug_in_that_cannot_be_used_is_one_line_naming_the_key(
    plugin: str, extra: dict[str, str], error: str
) -> None:
    with pytest.raises(PluginError) as exc:
        load_hooks(spec(**{k: v.format(p=plugin) for k, v in extra.items()}))
    message = str(exc.value)
    assert message.startswith(error.format(p=plugin)) and "\n" not in message


def test_failures_while_the_job_runs_are_hook_failed(plugin: str) -> None:
    hooks = load_hooks(spec(round_config=f"{plugin}:late_failure"))
    assert hooks.round_config(1) == {"lr": 0.1}
    with pytest.raises(HookFailed, match="raised RuntimeError: no schedule past round 1"):
        hooks.round_config(2)
    for fn, words in (("evaluate_nan", "BAD_METRICS"), ("evaluate_shape", "must return")):
        hooks = load_hooks(spec(evaluate_fn=f"{plugin}:{fn}"))
        with pytest.raises(HookFailed, match=words):
            hooks.evaluate(1, {"w": np.ones(1)}, {})


def test_a_plug_in_gone_after_a_restart_fails_only_its_calls() -> None:
    hooks = reload_hooks(spec(round_config="gone_module_q:config", evaluate_fn="gone_module_q:f"))
    with pytest.raises(HookFailed, match="no module named gone_module_q"):
        hooks.round_config(1)
    with pytest.raises(HookFailed, match="no module named gone_module_q"):
        hooks.evaluate(1, {}, {})
    static = reload_hooks(spec(round_config={"lr": 1.0}, evaluate_fn="gone_module_q:f"))
    assert static.round_config(2) == {"lr": 1.0}
