"""Pre-aggregators, one module each; importing this package registers them by name."""

from . import arc, bucketing, clipping, nnm

__all__ = ["arc", "bucketing", "clipping", "nnm"]
