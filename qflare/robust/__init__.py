"""Pure Byzantine-robust aggregation, detection and attacks (NumPy and torch only).

``get_rule("nnm+multikrum(f=3)")`` builds a stateless callable
``rule(updates [n, d], weights=None) -> [d]``; ``detect`` scores one round's updates;
``Reputation`` carries a decayed per-client score across rounds; ``get_attack`` builds
the Byzantine updates used in simulation and tests. See docs/robust.md.
"""

from ._base import PRE_AGGREGATORS, RULES, Aggregator, Chain, PreAggregator
from .spec import get_rule, list_rules

__all__ = ["Aggregator", "Chain", "PreAggregator", "PRE_AGGREGATORS", "RULES", "get_rule",
           "list_rules"]
