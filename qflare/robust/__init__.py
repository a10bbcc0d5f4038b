"""Pure Byzantine-robust aggregation, detection and attacks."""
