"""ONNX Runtime sessions, created once per (file, providers, threads) and reused.

Every speech engine opens its model through :func:`create_session` so that thread
counts (:func:`~spiritlm_edge.runtime.threads.default_threads`), graph optimisation and
execution providers are set in one place.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from spiritlm_edge.runtime.errors import BundleError, SpiritLMEdgeError
from spiritlm_edge.runtime.providers import open_session
from spiritlm_edge.runtime.threads import default_threads

log = logging.getLogger(__name__)

_cache: dict[tuple, object] = {}
_cache_lock = threading.Lock()


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
        log.debug("loaded %s with %s, %d threads", path.name, session.get_providers(), n_threads)
        return session


def clear_session_cache() -> None:
    with _cache_lock:
        _cache.clear()
