"""Flower app of benchmarks/vs_flower.py."""
