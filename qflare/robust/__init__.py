"""Pure Byzantine-robust aggregation, detection and attacks (NumPy and torch only).

``get_rule("nnm+multikrum(f=3)")`` builds a stateless callable
``rule(updates [n, d], weights=None) -> [d]``; ``detect`` scores one round's updates;
``Reputation`` carries a decayed per-client score across rounds; ``get_attack`` builds
the Byzantine updates used in simulation and tests. See docs/robust.md.
"""

from ._base import PRE_AGGREGATORS, RULES, Aggregator, Chain, PreAggregator
from .attacks import Attack, LabelFlip, flip_labels, get_attack, list_attacks
from .detection import INSUFFICIENT, OK, Thresholds, Verdict, detect
from .reputation import Reputation
from .spec import get_rule, list_rules

__all__ = [
    "INSUFFICIENT",
    "OK",
    "PRE_AGGREGATORS",
    "RULES",
    "Aggregator",
    "Attack",
    "Chain",
    "LabelFlip",
    "PreAggregator",
    "Reputation",
    "Thresholds",
    "Verdict",
    "detect",
    "flip_labels",
    "get_attack",
    "get_rule",
    "list_attacks",
    "list_rules",
]
