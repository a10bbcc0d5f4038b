"""A simulated job whose rule, attack, model and data set come from a module outside the
package (``module:name``), by the Python API and by ``qflare simulate``; and a bad plug-in
name at the command line: one line, exit code 2, before anything runs."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from qflare.cli import main
from qflare.robust import PRE_AGGREGATORS, RULES
from qflare.robust.attacks import ATTACKS
from qflare.sim.config import SimConfig
from qflare.sim.direct import run_direct
from qflare.sim.run import prepare

pytestmark = pytest.mark.slow

PLUGIN = '''
import numpy as np
from torch import nn

from qflare.robust import Aggregator, Attack
from qflare.sim.data import ArrayDataset, SplitData

CALLS = []


class NormBoundedMean(Aggregator):
    """The mean after scaling each update to L2 norm at most tau."""

    name = "{prefix}_nbm"

    def __init__(self, tau: float = 1.0) -> None:
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {{tau!r}}")
        self.tau = tau

    def params(self):
        return {{"tau": self.tau}}

    def apply(self, x, w):
        CALLS.append(("rule", x.shape[0]))
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return (x * np.minimum(1.0, self.tau / np.maximum(norms, 1e-12))).mean(axis=0)


class ScaledFlip(Attack):
    name = "{prefix}_flip"

    def __init__(self, scale: float = 3.0) -> None:
        self.scale = scale

    def forge(self, h, f, rng):
        CALLS.append(("attack", f))
        return -self.scale * h.mean(axis=0)


def tiny(sample_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(sample_shape)), num_classes))


def blobs():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 3
    y = rng.integers(0, 3, 400)
    x = (centres[y] + rng.normal(size=(400, 8))).astype(np.float32)
    return SplitData("blobs", ArrayDataset(x[:300], y[:300], 3), ArrayDataset(x[300:], y[300:], 3))
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    tables = [RULES, PRE_AGGREGATORS, ATTACKS]
    saved = [dict(t) for t in tables]
    tag = uuid.uuid4().hex[:8]
    name = f"qflare_simplugin_{tag}"
    (tmp_path / f"{name}.py").write_text(PLUGIN.format(prefix=f"p{tag}"))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield __import__(name)
    sys.modules.pop(name, None)
    for table, copy in zip(tables, saved, strict=True):
        table.clear()
        table.update(copy)


def test_a_simulated_job_runs_a_custom_rule_attack_model_and_data_set(plugin: ModuleType) -> None:
    m = plugin.__name__
    config = prepare(
        SimConfig(
            dataset=f"{m}:blobs",
            model=f"{m}:tiny",
            rule=f"{m}:NormBoundedMean(tau=5.0)",
            attack=f"{m}:ScaledFlip",
            attack_options={"scale": 4.0},
            clients=6,
            byzantine=1,
            rounds=3,
            detection=False,
        )
    )
    plugin.CALLS.clear()  # prepare() asked the rule once whether it can run
    result = run_direct(config)
    # the coalition's one update per round came from the attack, and the rule aggregated
    # all six updates of every round
    assert plugin.CALLS == [("attack", 1), ("rule", 6)] * 3
    assert [r.round for r in result.rounds] == [1, 2, 3]
    assert result.final_accuracy is not None and result.final_accuracy > 0.6


def test_qflare_simulate_takes_plugins_by_module_and_name(plugin: ModuleType, tmp_path) -> None:
    m = plugin.__name__
    out = tmp_path / "run"
    argv = ["simulate", "--direct", "--quiet", "--clients", "6", "--byzantine", "1"]
    argv += ["--rounds", "2", "--out", str(out), "--dataset", f"{m}:blobs"]
    argv += ["--rule", f"{m}:NormBoundedMean", "--attack", f"{m}:ScaledFlip"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["rule_resolved"] == f"{m}:NormBoundedMean"
    assert report["config"]["attack"] == f"{m}:ScaledFlip"
    assert report["config"]["dataset"] == f"{m}:blobs"
    assert ("attack", 1) in plugin.CALLS


@pytest.mark.parametrize(
    ("flag", "attr", "message"),
    [
        pytest.param(
            "--attack", "nosuch", "--attack {r}: module {m} has no attribute 'nosuch'", id="attack"
        ),
        pytest.param(
            "--dataset",
            "nosuch",
            "--dataset {r}: module {m} has no attribute 'nosuch'",
            id="dataset",
        ),
        pytest.param(
            "--attack",
            "NormBoundedMean",
            "--attack {r}: {r} is not a subclass of qflare.robust.Attack",
            id="a-rule-as-attack",
        ),
        # --rule's message is get_rule's own: it names the module and the missing attribute
        pytest.param(
            "--rule", "nosuch", "--rule '{r}': module {m} has no attribute 'nosuch'", id="rule"
        ),
    ],
)
def test_a_bad_plugin_name_is_one_line_and_exit_2(
    plugin: ModuleType, flag: str, attr: str, message: str, tmp_path: Path, capsys
) -> None:
    ref = f"{plugin.__name__}:{attr}"
    out = tmp_path / "run"
    code = main(["simulate", "--direct", "--quiet", "--out", str(out), flag, ref])
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1
    assert message.format(r=ref, m=plugin.__name__) in lines[0]
    assert not out.exists()  # refused before anything ran


def test_a_missing_plugin_module_is_named(tmp_path: Path, capsys) -> None:
    code = main(["simulate", "--direct", "--out", str(tmp_path / "o"), "--attack", "nopkg_q:X"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (
        "qflare simulate: --attack nopkg_q:X: no module named nopkg_q; is it installed, or on "
        "sys.path (PYTHONPATH)?"
    )
