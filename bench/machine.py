"""The machine a benchmark runs on: what it is, its memory, and its memory bandwidth.

Figures are only comparable with the machine named beside them (see docs/benchmarks.md), and
an LM's decode speed is bounded by how fast the machine streams the weights: the bandwidth
test and the bytes a decode step reads give that ceiling.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import numpy as np
import onnxruntime
import psutil

from spiritlm_edge.runtime.cpu_buffers import cpu_model
from spiritlm_edge.runtime.gguf_file import read_gguf


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakRSS:
    """The peak resident memory between :meth:`start` and :meth:`stop` alone (also a context manager).

    The process's high-water mark also holds whatever ran before (a synthetic bundle built in
    the same process peaks at 14 GB), so at the start it is reset to the current RSS (Linux:
    ``/proc/self/clear_refs`` "5"), and ``peak.bytes`` is the mark at the stop. Where that cannot
    be done a thread samples the RSS every ``interval`` s instead (a lower bound: a spike
    shorter than the interval can be missed); ``peak.method`` says which.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.method = ""
        self.bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PeakRSS:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "high-water mark reset at the start (/proc/self/clear_refs)"
        except OSError:
            self.method = (
                f"RSS sampled every {self.interval * 1000:.0f} ms (the high-water mark cannot be reset "
                "here: a lower bound)"
            )
            self.bytes = rss_bytes()
            self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.bytes = max(self.bytes, rss_bytes())

    def stop(self) -> int:
        """Stop measuring; returns (and keeps in ``bytes``) the peak."""
        if self._thread is None:
            self.bytes = peak_rss_bytes()
            return self.bytes
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, rss_bytes())
        return self.bytes

    def __enter__(self) -> PeakRSS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def library_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (None: not installed)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _gpus() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, GPUs and the versions of every library on the timed path."""
    info = {
        "cpu": cpu_model(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpus": _gpus(),
        "versions": {
            d: library_version(d)
            for d in (
                "spiritlm-edge",
                "numpy",
                "onnxruntime",
                "onnxruntime-gpu",
                "llama_cpp_python",
                "torch",
                "transformers",
            )
        },
    }
    info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    try:
        info["llama_cpp_gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
        info["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    except AttributeError:  # an older llama-cpp-python build without these
        pass
    return info


def measure_bandwidth(megabytes: int = 1024, repeats: int = 5, n_threads: int = 1) -> dict[str, float]:
    """Memory bandwidth the machine delivers: the best of ``repeats`` copies of a
    ``megabytes`` buffer, counted as bytes read + bytes written (STREAM's "copy")
    per second, with 1 thread and with ``n_threads`` threads (numpy releases the GIL)."""
    n = megabytes * (1 << 20)
    src = np.ones(n, dtype=np.uint8)
    dst = np.zeros(n, dtype=np.uint8)
    result: dict[str, float] = {"buffer_mb": megabytes}
    for threads in sorted({1, max(1, n_threads)}):
        bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
        best = math.inf
        with ThreadPoolExecutor(threads) as pool:
            for _ in range(repeats):
                start = time.perf_counter()
                list(pool.map(lambda b: np.copyto(dst[b[0] : b[1]], src[b[0] : b[1]]), bounds))
                best = min(best, time.perf_counter() - start)
        result[f"copy_gb_per_s_{threads}_threads"] = 2 * n / best / 1e9
    result["gb_per_s"] = max(v for k, v in result.items() if k.startswith("copy_gb_per_s"))
    return result


def kv_bytes_per_value(kv_cache: str) -> float:
    """Bytes per cached key or value in a ``kv_cache`` type (f16 2, q8_0 34/32, ...)."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kv_cache.upper()]]
    return size / block


def decode_bytes_per_token(gguf_path: Path, context_tokens: float, kv_cache: str = "f16") -> dict[str, float]:
    """Bytes one decode step must read: every weight tensor except the token embedding (a
    single row of it is read), plus the K and V cache of ``context_tokens`` positions."""
    info = read_gguf(gguf_path)
    weights = embedding = 0
    for name, tensor in info.tensors.items():
        nbytes = tensor.n_bytes
        if name == "token_embd.weight":
            embedding = nbytes
        else:
            weights += nbytes
    meta = info.metadata
    layers = int(meta.get("llama.block_count", 0))
    hidden = int(meta.get("llama.embedding_length", 0))
    heads = int(meta.get("llama.attention.head_count", 1))
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    kv = 2 * layers * context_tokens * (hidden // heads * kv_heads) * kv_bytes_per_value(kv_cache)
    return {
        "weights_bytes": weights,
        "token_embd_bytes": embedding,
        "kv_cache_bytes": kv,
        "total_bytes": weights + kv,
        "gguf_tensor_bytes": weights + embedding,
    }
