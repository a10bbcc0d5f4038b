"""Ingest service: verifies, unseals and validates client updates (stateless, N replicas)."""
