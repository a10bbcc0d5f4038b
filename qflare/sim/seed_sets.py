"""The evaluation protocol's seed sets (``qflare simulate --protocol --seed-set``), in a module
that imports nothing: the CLI offers their names and first seeds without loading the
simulator (``qflare.sim.protocol`` brings torch, about 2 s)."""

from __future__ import annotations

#: The first seed of each set (``--seeds N`` takes N consecutive ones); the sets are fixed and
#: disjoint. ``tune`` is for developing and tuning detection; the held-out sets are never run
#: while tuning and are for published tables only, each new one for the tables after changes
#: made in answer to a failure seen on the one before (``qflare.sim.protocol``).
SEED_SETS: dict[str, int] = {
    "tune": 0,
    "heldout": 1000,
    "heldout2": 2000,
    "heldout3": 3000,
    "heldout4": 4000,
    "heldout5": 5000,
    "heldout6": 6000,
    "heldout7": 7000,
    "heldout8": 8000,
    "heldout9": 9000,
    "heldout10": 10000,
    "heldout11": 11000,
    "heldout12": 12000,
    "heldout13": 13000,
    "heldout14": 14000,
    "heldout15": 15000,
    "heldout16": 16000,
}
