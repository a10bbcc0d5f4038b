"""QFLARE: federated learning with post-quantum signed envelopes, Byzantine-robust
aggregation and differential privacy."""

__version__ = "0.1.0"
