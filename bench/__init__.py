"""Benchmarks: ``python bench/latency.py`` / ``spiritlm-edge bench``."""
