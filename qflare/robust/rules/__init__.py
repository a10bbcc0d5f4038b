"""Aggregation rules, one module each; importing this package registers them by name."""

from . import bulyan, caf, cc, geomed, krum, mda, meamed, mean, median, monna, smea, trimmed_mean

__all__ = [
    "bulyan",
    "caf",
    "cc",
    "geomed",
    "krum",
    "mda",
    "meamed",
    "mean",
    "median",
    "monna",
    "smea",
    "trimmed_mean",
]
