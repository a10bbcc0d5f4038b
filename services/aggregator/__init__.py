"""The aggregator: round state machine, selection, robust + DP aggregation, model versions (core.py pure, store.py, service.py)."""
