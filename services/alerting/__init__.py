"""Alerting service: stores, deduplicates, rate-limits, escalates and republishes alerts."""
