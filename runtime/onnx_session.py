"""ONNX Runtime sessions, created once per (file, providers, threads) and reused.

Every speech engine opens its model through :func:`create_session` so that thread
counts (:func:`~spiritlm_edge.runtime.threads.default_threads`), graph optimisation,
memory and execution providers are set in one place.

Memory: memory patterns are off. They plan one block per input shape, and our inputs vary in
length with every turn and chunk (the streaming vocoder's chunks most of all): measured on the
synthetic base 7B pipeline (a 9 s turn), the peak RSS drops by 118 MB at the same speed. The
encoders hand their activations back after a run on long audio (:func:`release_activations`), and
what loading a model leaves freed in the C heap goes back to the system (:func:`return_freed_memory`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import onnxruntime as ort

from spiritlm_edge.runtime.errors import BundleError, SpiritLMEdgeError
from spiritlm_edge.runtime.providers import open_session
from spiritlm_edge.runtime.threads import default_threads

log = logging.getLogger(__name__)

_cache: dict[tuple, object] = {}
_cache_lock = threading.Lock()


def release_activations() -> ort.RunOptions:
    """Run options that return the run's activations to the system at its end (arena shrinkage).

    For the speech encoders on long audio: their activations grow with it (the release-size
    HuBERT keeps ~120 MB after a 9 s run) while the LM and the vocoder run next. Re-allocating
    them costs ~7% of the encoder's time (page faults, measured on a 9 s run), so only runs on
    long audio ask for it (:data:`~spiritlm_edge.runtime.encoder.RELEASE_AFTER_SECONDS`).
    """
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):  # another C library (musl, macOS, Windows): nothing to call
        return None


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``).

    Loading a model leaves its parse buffers freed but mapped in the heap: the release-size
    HuBERT's session holds 369 MB but leaves RSS 134-154 MB higher until this call (measured)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def create_session(
    path: str | os.PathLike,
    providers: str | Sequence[str | tuple[str, dict]] | None = None,
    n_threads: int | None = None,
):
    """A session for ``path`` (cached per process): a TensorRT engine runner or an
    ``onnxruntime.InferenceSession``, down the provider chain of
    :mod:`spiritlm_edge.runtime.providers` (None: the best this machine offers), falling
    back past providers that fail to start."""
    path = Path(path)
    if not providers:
        providers = None  # the default chain
    elif not isinstance(providers, str):
        providers = tuple(providers)
    n_threads = n_threads or default_threads()
    key = (str(path.resolve()), repr(providers), n_threads)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        options = ort.SessionOptions()
        options.intra_op_num_threads = n_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_mem_pattern = False  # see the module's docstring
        try:
            session = open_session(path, providers, options)
        except SpiritLMEdgeError:
            raise
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise BundleError(
                f"ONNX Runtime cannot load {path}: {str(exc).strip()[:300]}. The file is corrupted or "
                "was made by an incompatible exporter; rebuild the bundle."
            ) from None
        _cache[key] = session
        return_freed_memory()
        log.debug("loaded %s with %s, %d threads", path.name, session.get_providers(), n_threads)
        return session


def clear_session_cache() -> None:
    with _cache_lock:
        _cache.clear()
