"""The detector: per-round verdicts over exactly the closed set, reputation (core.py pure, store.py, service.py)."""
