"""Benchmarks: ``python -m spiritlm_edge.bench.latency`` / ``spiritlm-edge bench``."""
