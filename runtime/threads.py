"""How many threads the compute pools use by default: one definition for all engines.

ONNX Runtime's intra-op pool and llama.cpp's threads both run dense kernels that saturate a
core's vector units, so an SMT sibling adds contention, not speed: the default is one
thread per physical core, capped by the CPUs this process may run on (``taskset``, a
container's CPU set). Every engine takes an ``n_threads`` argument to override it.
"""

from __future__ import annotations

import os

import psutil


def available_cpus() -> int:
    """Logical CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity outside Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Physical cores, at most :func:`available_cpus` (psutil may not know the core count: then
    every available CPU)."""
    physical = psutil.cpu_count(logical=False)
    return max(1, min(physical or available_cpus(), available_cpus()))
