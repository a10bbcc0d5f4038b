"""Plug-ins: rules, attacks, models and data sets from outside the package.

A module written into tmp_path (on sys.path for the test) stands for the user's package;
a ``*.dist-info`` folder beside it with an ``entry_points.txt`` stands for an installed
distribution declaring entry points. Every test restores the registries it touched."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from qflare.robust import (
    PRE_AGGREGATORS,
    RULES,
    Aggregator,
    Attack,
    PluginError,
    get_attack,
    get_rule,
    list_attacks,
    list_rules,
    register_attack,
    register_rule,
)
from qflare.robust.attacks import ATTACKS
from qflare.sim import data as sim_data
from qflare.sim import model as sim_model
from qflare.sim.config import SimConfigError
from qflare.sim.robust_glue import attack_names, canonical_attack, resolve_rule_spec

PLUGIN = '''
import numpy as np
from torch import nn

from qflare.robust import Aggregator, Attack, PreAggregator
from qflare.sim.data import ArrayDataset, SplitData


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
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return (x * np.minimum(1.0, self.tau / np.maximum(norms, 1e-12))).mean(axis=0)


class Halve(PreAggregator):
    name = "{prefix}_halve"

    def transform(self, x, w, *, rng=None):
        return x * 0.5, w


class ScaledFlip(Attack):
    name = "{prefix}_flip"

    def __init__(self, scale: float = 3.0) -> None:
        self.scale = scale

    def forge(self, h, f, rng):
        return -self.scale * h.mean(axis=0)


def tiny(sample_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(sample_shape)), num_classes))


def blobs():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 3
    y = rng.integers(0, 3, 400)
    x = (centres[y] + rng.normal(size=(400, 8))).astype(np.float32)
    return SplitData("blobs", ArrayDataset(x[:300], y[:300], 3), ArrayDataset(x[300:], y[300:], 3))


def helper(x):
    return x


def not_a_model(sample_shape, num_classes):
    return 3


def not_data():
    return 3


NOT_CALLABLE = 3
'''


@dataclass
class Plugin:
    module: ModuleType
    name: str  # the module's import name
    prefix: str  # the registered names' prefix
    root: Path

    def ref(self, attr: str) -> str:
        return f"{self.name}:{attr}"

    def entry_points(self, text: str) -> None:
        """Declare entry points, as an installed distribution of this module would."""
        dist = self.root / f"{self.name}-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {self.name}\nVersion: 1.0\n")
        (dist / "entry_points.txt").write_text(textwrap.dedent(text).format(m=self.name))


@pytest.fixture
def registries() -> Iterator[None]:
    """Put the registries back as they were: plug-ins a test loads stay in its test."""
    tables = [RULES, PRE_AGGREGATORS, ATTACKS, sim_model._BUILDERS, sim_data._LOADERS]
    saved = [dict(t) for t in tables]
    names = list(sim_model.MODEL_NAMES)
    yield
    for table, copy in zip(tables, saved, strict=True):
        table.clear()
        table.update(copy)
    sim_model.MODEL_NAMES[:] = names


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registries: None) -> Iterator[Plugin]:
    tag = uuid.uuid4().hex[:8]
    name, prefix = f"qflare_plugin_{tag}", f"p{tag}"
    (tmp_path / f"{name}.py").write_text(PLUGIN.format(prefix=prefix))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    yield Plugin(module, name, prefix, tmp_path)
    sys.modules.pop(name, None)


# -- rules ----------------------------------------------------------------------------------


def test_a_rule_loads_by_module_and_class_and_registers_under_its_name(plugin: Plugin) -> None:
    x = np.array([[3.0, 4.0], [0.3, 0.4], [-6.0, 8.0]], dtype=np.float32)
    rule = get_rule(plugin.ref("NormBoundedMean(tau=1.0)"))
    expected = np.mean([[0.6, 0.8], [0.3, 0.4], [-0.6, 0.8]], axis=0)
    np.testing.assert_allclose(rule(x), expected, rtol=1e-6)
    # its repr is its registered name, which now parses back
    assert repr(rule) == f"{plugin.prefix}_nbm(tau=1.0)"
    assert repr(get_rule(repr(rule))) == repr(rule)
    assert f"{plugin.prefix}_nbm" in list_rules()["rules"]


def test_plugin_parts_chain_with_built_in_ones(plugin: Plugin) -> None:
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    chain = get_rule(f"{plugin.ref('Halve')}+median")
    np.testing.assert_allclose(chain(x), np.median(x, axis=0) * 0.5)
    chain = get_rule(f"nnm(f=1)+{plugin.ref('NormBoundedMean')}(tau=100.0)")
    assert repr(chain) == f"nnm(f=1)+{plugin.prefix}_nbm(tau=100.0)"
    # the simulator fills f only where a part takes it
    spec = resolve_rule_spec(f"nnm+{plugin.ref('NormBoundedMean')}", 2)
    assert spec == f"nnm(f=2)+{plugin.ref('NormBoundedMean')}"


def test_register_rule_is_a_public_decorator(registries: None) -> None:
    @register_rule
    class Zero(Aggregator):
        name = "test_zero_rule"

        def apply(self, x: np.ndarray, w: object) -> np.ndarray:
            return np.zeros(x.shape[1], dtype=x.dtype)

    assert (get_rule("test_zero_rule")(np.ones((3, 2), np.float32)) == 0).all()
    assert register_rule(Zero) is Zero  # again: the same class, nothing changes

    class Other(Aggregator):
        name = "test_zero_rule"

    with pytest.raises(PluginError, match=r"'test_zero_rule' is taken by .*Zero; give .*Other"):
        register_rule(Other)

    class Median(Aggregator):
        name = "median"

    with pytest.raises(PluginError, match=r"'median' is taken by qflare.robust.rules"):
        register_rule(Median)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        pytest.param("MyRule", "needs name = '<lowercase identifier>'", id="camel-case"),
        pytest.param("my-rule", "needs name = '<lowercase identifier>'", id="dash"),
        pytest.param(None, "got None", id="no-name"),
    ],
)
def test_register_rule_refuses_names_a_spec_cannot_say(registries: None, name, message) -> None:
    cls = type("Bad", (Aggregator,), {} if name is None else {"name": name})
    with pytest.raises(PluginError, match=message):
        register_rule(cls)


def test_register_rule_refuses_what_is_not_a_rule() -> None:
    with pytest.raises(PluginError, match=r"is not a rule: subclass qflare.robust.Aggregator"):
        register_rule(int)  # type: ignore[type-var]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param(
            "qflare_no_such_pkg_x:Rule",
            "no module named qflare_no_such_pkg_x; is it installed, or on sys.path",
            id="no-module",
        ),
        pytest.param("{m}:nosuch", "module {m} has no attribute 'nosuch'", id="no-attribute"),
        pytest.param(
            "{m}:helper",
            "{m}:helper is not a subclass of qflare.robust.Aggregator or PreAggregator "
            "(it is a function)",
            id="function",
        ),
        pytest.param(
            "{m}:ScaledFlip",
            "(it is a class deriving from Attack)",
            id="an-attack-as-rule",
        ),
        pytest.param(
            "{m}:NormBoundedMean+median",
            "unknown pre-aggregator '{m}:NormBoundedMean' (rules go last",
            id="rule-first",
        ),
        pytest.param("{m}:Halve", "unknown rule '{m}:Halve' (rules go last", id="pre-last"),
        pytest.param(
            "{m}:NormBoundedMean(tau=-1.0)", "tau must be > 0, got -1.0", id="its-own-check"
        ),
        pytest.param(
            "{m}:NormBoundedMean(nope=1)", "takes no parameter 'nope'", id="unknown-parameter"
        ),
    ],
)
def test_a_bad_plugin_rule_fails_with_one_line_naming_it(
    plugin: Plugin, spec: str, message: str
) -> None:
    with pytest.raises((ValueError, TypeError)) as err:
        get_rule(spec.format(m=plugin.name))
    text = str(err.value)
    assert message.format(m=plugin.name) in text
    assert "\n" not in text


def test_a_module_that_fails_to_import_is_named(tmp_path: Path, monkeypatch) -> None:
    name = f"qflare_broken_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=f"module {name} does not import: RuntimeError: boom"):
        get_rule(f"{name}:Rule")


@pytest.mark.parametrize("ref", ["mod:", ":Rule", "mod:Rule:x", "1mod:Rule", "mod:Ru-le"])
def test_malformed_references_are_refused(ref: str) -> None:
    from qflare.robust._base import load_reference

    with pytest.raises(PluginError, match=r"is not a plug-in reference; write module:name"):
        load_reference(ref)


# -- attacks --------------------------------------------------------------------------------


def test_an_attack_loads_by_module_and_class(plugin: Plugin) -> None:
    honest = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    attack = get_attack(plugin.ref("ScaledFlip"), scale=2.0)
    assert isinstance(attack, Attack)
    np.testing.assert_allclose(attack(honest, 3), np.tile([-4.0, -6.0], (3, 1)))
    assert f"{plugin.prefix}_flip" in list_attacks()
    assert get_attack(f"{plugin.prefix}_flip").name == f"{plugin.prefix}_flip"
    # the simulator keeps a reference as written and accepts it by `in`
    assert canonical_attack(f" {plugin.ref('ScaledFlip')} ") == plugin.ref("ScaledFlip")
    assert plugin.ref("ScaledFlip") in attack_names()
    assert "nope" not in attack_names()


def test_register_attack_is_a_public_decorator(registries: None) -> None:
    @register_attack
    class Zeros(Attack):
        name = "test_zeros_attack"

        def forge(self, h: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
            return np.zeros(h.shape[1])

    out = get_attack("test_zeros_attack")(np.ones((2, 3), np.float32), 2)
    assert out.shape == (2, 3) and not out.any()
    with pytest.raises(PluginError, match=r"'sign_flip' is taken by qflare.robust.attacks"):
        register_attack(type("Flip", (Attack,), {"name": "sign_flip"}))
    with pytest.raises(PluginError, match=r"'label_flip' is taken by the data-level label flip"):
        register_attack(type("Flip", (Attack,), {"name": "label_flip"}))
    with pytest.raises(PluginError, match=r"is not an attack: subclass qflare.robust.Attack"):
        register_attack(dict)  # type: ignore[type-var]


@pytest.mark.parametrize(
    ("attr", "message"),
    [
        pytest.param("nosuch", "module {m} has no attribute 'nosuch'", id="no-attribute"),
        pytest.param(
            "NormBoundedMean",
            "{m}:NormBoundedMean is not a subclass of qflare.robust.Attack "
            "(it is a class deriving from Aggregator)",
            id="a-rule-as-attack",
        ),
    ],
)
def test_a_bad_plugin_attack_fails_with_one_line_naming_it(
    plugin: Plugin, attr: str, message: str
) -> None:
    with pytest.raises(PluginError) as err:
        get_attack(plugin.ref(attr))
    assert message.format(m=plugin.name) in str(err.value)
    assert "\n" not in str(err.value)


# -- entry points ---------------------------------------------------------------------------


def test_installed_entry_points_are_found_by_name(plugin: Plugin) -> None:
    p = plugin.prefix
    plugin.entry_points(
        f"""
        [qflare.rules]
        {p}_nbm = {{m}}:NormBoundedMean
        {p}_halve = {{m}}:Halve
        [qflare.attacks]
        {p}_flip = {{m}}:ScaledFlip
        [qflare.models]
        {p}_tiny = {{m}}:tiny
        [qflare.datasets]
        {p}_blobs = {{m}}:blobs
        """
    )
    x = np.arange(6, dtype=np.float64).reshape(3, 2)
    np.testing.assert_allclose(get_rule(f"{p}_halve+{p}_nbm(tau=1e9)")(x), x.mean(axis=0) / 2)
    assert get_attack(f"{p}_flip").name == f"{p}_flip"
    assert f"{p}_tiny" in sim_model.MODEL_NAMES
    model = sim_model.build_model(f"{p}_tiny", (8,), 3, seed=0)
    assert isinstance(model, torch.nn.Module)
    names = sim_data.dataset_names()
    assert f"{p}_blobs" in names and "digits" in names
    assert sim_data.load_dataset(f"{p}_blobs").train.num_classes == 3


def test_an_entry_point_must_carry_its_class_name(plugin: Plugin) -> None:
    plugin.entry_points(
        """
        [qflare.rules]
        other_name = {m}:NormBoundedMean
        [qflare.attacks]
        broken = {m}:nosuch
        """
    )
    with pytest.raises(
        PluginError, match=r"the entry point's name and the class's name must agree"
    ):
        get_rule("other_name")
    with pytest.raises(
        PluginError,
        match=rf"entry point 'broken' of group qflare.attacks \({plugin.name}:nosuch\): "
        rf"module {plugin.name} has no attribute 'nosuch'",
    ):
        get_attack("broken")


# -- the simulator's model and data-set tables ----------------------------------------------


def test_models_and_data_sets_load_by_module_and_function(plugin: Plugin) -> None:
    assert plugin.ref("tiny") in sim_model.MODEL_NAMES
    model = sim_model.build_model(plugin.ref("tiny"), (8,), 3, seed=1)
    again = sim_model.build_model(plugin.ref("tiny"), (8,), 3, seed=1)
    assert torch.equal(model[1].weight, again[1].weight)  # seeded before the builder runs
    assert plugin.ref("blobs") in sim_data.dataset_names()
    data = sim_data.load_dataset(plugin.ref("blobs"))
    assert len(data.train) == 300 and data.test.num_classes == 3


def test_register_model_adds_a_name(registries: None) -> None:
    sim_model.register_model("test_linear", lambda shape, k: torch.nn.Linear(int(shape[0]), k))
    assert "test_linear" in sim_model.MODEL_NAMES and "test_linear" in list(sim_model.MODEL_NAMES)
    assert isinstance(sim_model.build_model("test_linear", (4,), 2, seed=0), torch.nn.Linear)
    with pytest.raises(ValueError, match=r"already registered"):
        sim_model.register_model("mlp", lambda shape, k: torch.nn.Linear(1, 1))


@pytest.mark.parametrize(
    ("table", "attr", "message"),
    [
        pytest.param("model", "nosuch", "--model {r}: module {m} has no attribute 'nosuch'"),
        pytest.param("model", "NOT_CALLABLE", "--model {r}: int is not callable"),
        pytest.param("dataset", "nosuch", "--dataset {r}: module {m} has no attribute 'nosuch'"),
        pytest.param("dataset", "NOT_CALLABLE", "--dataset {r}: int is not callable"),
    ],
)
def test_a_bad_model_or_data_set_fails_when_named(
    plugin: Plugin, table: str, attr: str, message: str
) -> None:
    ref = plugin.ref(attr)
    names = sim_model.MODEL_NAMES if table == "model" else sim_data.dataset_names()
    with pytest.raises(SimConfigError) as err:
        ref in names  # noqa: B015  (membership loads the plug-in)
    assert str(err.value).startswith(message.format(r=ref, m=plugin.name))


def test_what_a_plugin_returns_is_checked(plugin: Plugin) -> None:
    with pytest.raises(TypeError, match=r"returned int, not a torch.nn.Module"):
        sim_model.build_model(plugin.ref("not_a_model"), (3,), 2, seed=0)
    with pytest.raises(TypeError, match=r"returned int, not qflare.sim.data.SplitData"):
        sim_data.load_dataset(plugin.ref("not_data"))


def test_unknown_plain_names_stay_unknown() -> None:
    assert "resnet" not in sim_model.MODEL_NAMES
    assert "no-such-data" not in sim_data.dataset_names()
    with pytest.raises(ValueError, match=r"unknown model 'resnet'; known: linear, mlp, cnn"):
        sim_model.build_model("resnet", (4,), 2, seed=0)
    with pytest.raises(ValueError, match=r"unknown rule 'nosuch'.*plug-ins: module:Class"):
        get_rule("nosuch")
