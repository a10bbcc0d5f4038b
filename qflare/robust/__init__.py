"""Pure Byzantine-robust aggregation, detection and attacks (NumPy and torch only).

``get_rule("nnm+multikrum(f=3)")`` builds a stateless callable
``rule(updates [n, d], weights=None) -> [d]``; ``detect`` scores one round's updates;
``Reputation`` carries a decayed per-client score across rounds; ``get_attack`` builds
the Byzantine updates used in simulation and tests. See docs/robust.md.

Plug-ins: ``register_rule`` / ``register_attack`` add classes by name; ``module:Class``
names and the entry-point groups ``qflare.rules`` / ``qflare.attacks`` load them from
outside the package (``PluginError`` when one cannot be used).
"""

from ._base import (
    PRE_AGGREGATORS,
    RULES,
    RULES_GROUP,
    Aggregator,
    BlockwiseUnsupported,
    Chain,
    PluginError,
    PluginNames,
    PreAggregator,
    entry_point_names,
    has_blockwise_form,
    is_reference,
    load_plugin,
    register_rule,
)
from .attacks import (
    ATTACKS_GROUP,
    Attack,
    LabelFlip,
    flip_labels,
    get_attack,
    list_attacks,
    register_attack,
)
from .detection import INSUFFICIENT, OK, Thresholds, Verdict, detect
from .reputation import Reputation
from .spec import get_rule, list_rules

__all__ = [
    "ATTACKS_GROUP",
    "INSUFFICIENT",
    "OK",
    "PRE_AGGREGATORS",
    "RULES",
    "RULES_GROUP",
    "Aggregator",
    "Attack",
    "BlockwiseUnsupported",
    "Chain",
    "LabelFlip",
    "PluginError",
    "PluginNames",
    "PreAggregator",
    "Reputation",
    "Thresholds",
    "Verdict",
    "detect",
    "entry_point_names",
    "flip_labels",
    "get_attack",
    "get_rule",
    "has_blockwise_form",
    "is_reference",
    "list_attacks",
    "list_rules",
    "load_plugin",
    "register_attack",
    "register_rule",
]
