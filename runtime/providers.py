"""Which hardware runs each engine: the execution-provider chain, its options, and the
LM's GPU settings.

Every speech engine is opened down this chain, best first, keeping those the machine offers::

    TensorRTEngine            a serialized TensorRT engine built by `spiritlm-edge export tensorrt`
    TensorrtExecutionProvider ONNX Runtime's TensorRT EP (builds and caches its own engines)
    CUDAExecutionProvider     ONNX Runtime's CUDA kernels
    CPUExecutionProvider      always last

A provider that fails to start (missing CUDA / cuDNN / TensorRT libraries, a stale engine,
out of memory) is logged with its reason and the next one is tried; one INFO line per
engine says what runs it. The chain is overridable: ``providers=["cuda", "cpu"]`` in the
API, ``--providers cuda,cpu`` on the command line (names or short aliases: tensorrt, trt,
cuda, cpu; ONNX Runtime's ``(name, options)`` tuples also work).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from spiritlm_edge.runtime.errors import ModelError, SpiritLMEdgeError
from spiritlm_edge.runtime.trt_engine import (
    ENGINE_PROVIDER,
    NoEngine,
    component_of,
    cuda_device_info,
    engine_dir,
    load_engine,
    onnx_io,
    profile_shapes,
)

log = logging.getLogger(__name__)

TRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
PREFERENCE = (ENGINE_PROVIDER, TRT_EP, CUDA_EP, CPU_EP)
GPU_PROVIDERS = (ENGINE_PROVIDER, TRT_EP, CUDA_EP)

ALIASES = {
    "tensorrt": ENGINE_PROVIDER, "engine": ENGINE_PROVIDER, "trt-engine": ENGINE_PROVIDER,
    "trt": TRT_EP, "tensorrt-ep": TRT_EP, "trt-ep": TRT_EP,
    "cuda": CUDA_EP, "gpu": CUDA_EP,
    "cpu": CPU_EP,
}

_INSTALL_HINT = {
    ENGINE_PROVIDER: "needs the tensorrt module and a CUDA GPU (pip install 'spiritlm-edge[gpu]'; on Jetson "
                     "JetPack's python3-libnvinfer)",
    TRT_EP: "this onnxruntime has no TensorRT EP (install onnxruntime-gpu; on Jetson the Jetson AI Lab wheel)",
    CUDA_EP: "this onnxruntime has no CUDA EP (install onnxruntime-gpu; on Jetson the Jetson AI Lab wheel)",
}

ProviderSpec = str | tuple[str, Mapping[str, Any]]


# ----------------------------------------------------------------------------- the chain


def parse_providers(providers: str | Sequence[ProviderSpec] | None) -> list[tuple[str, dict]] | None:
    """``"cuda,cpu"``, ``["trt", "CPUExecutionProvider"]`` or ``[(name, options), ...]`` as
    ``[(ONNX Runtime name, options), ...]``; None stays None (the default chain)."""
    if providers is None:
        return None
    if isinstance(providers, str):
        providers = [p for p in (part.strip() for part in providers.split(",")) if p]
    chain = []
    for spec in providers:
        name, options = (spec, {}) if isinstance(spec, str) else (spec[0], dict(spec[1] or {}))
        chain.append((ALIASES.get(name.lower(), name), options))
    if not chain:
        raise SpiritLMEdgeError("The providers list is empty; give e.g. 'cuda,cpu' or leave it out.")
    return chain


def tensorrt_engine_available(device_id: int = 0) -> bool:
    """Whether serialized TensorRT engines can run here: the module and a CUDA GPU."""
    return find_spec("tensorrt") is not None and cuda_device_info(device_id) is not None


def available_providers(device_id: int = 0) -> list[str]:
    """What this machine offers, in ONNX Runtime's names plus ``TensorRTEngine``."""
    import onnxruntime as ort

    offered = list(ort.get_available_providers())
    return ([ENGINE_PROVIDER] if tensorrt_engine_available(device_id) else []) + offered


def default_providers(device_id: int = 0) -> list[str]:
    """The chain used when none is given: the preferred providers this machine offers."""
    offered = set(available_providers(device_id))
    return [name for name in PREFERENCE if name in offered or name == CPU_EP]


def provider_chain(providers: str | Sequence[ProviderSpec] | None = None, device_id: int = 0) -> list[tuple[str, dict]]:
    """The chain to try, with CPU appended as the last resort."""
    chain = parse_providers(providers)
    if chain is None:
        chain = [(name, {}) for name in default_providers(device_id)]
    if all(name != CPU_EP for name, _ in chain):
        chain.append((CPU_EP, {}))
    return chain


# ----------------------------------------------------------------------------- provider options


def cuda_provider_options(
    device_id: int = 0,
    conv_algo_search: str = "HEURISTIC",
    cuda_graph: bool = False,
    gpu_mem_limit: int | None = None,
) -> dict[str, str]:
    """Options of ONNX Runtime's CUDA EP.

    ``HEURISTIC`` convolution algorithm search because audio lengths vary: ``EXHAUSTIVE``
    (ORT's default) benchmarks cuDNN algorithms again for every new input shape.
    CUDA graphs replay a captured run and only apply to runs with the same shapes and
    bound input/output addresses (see :func:`run_with_io_binding`), so they are off by
    default. ``kSameAsRequested`` keeps the arena small, which matters on an 8 GB Jetson.
    """
    if conv_algo_search not in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
        raise SpiritLMEdgeError(f"conv_algo_search must be EXHAUSTIVE, HEURISTIC or DEFAULT, not {conv_algo_search!r}.")
    options = {
        "device_id": str(device_id),
        "cudnn_conv_algo_search": conv_algo_search,
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1",
        "enable_cuda_graph": "1" if cuda_graph else "0",
    }
    if gpu_mem_limit:
        options["gpu_mem_limit"] = str(int(gpu_mem_limit))
    return options


def _shape_list(profile: Mapping[str, Mapping[str, list]], bound: str) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, dims[bound]))}" for name, dims in profile.items())


def tensorrt_provider_options(
    cache_dir: str | os.PathLike,
    fp16: bool = True,
    device_id: int = 0,
    profile: Mapping[str, Mapping[str, list]] | None = None,
    workspace_bytes: int | None = None,
    cuda_graph: bool = False,
) -> dict[str, str]:
    """Options of ONNX Runtime's TensorRT EP: fp16, engine and timing caches in
    ``cache_dir`` (engines are built on first use, then loaded), and explicit optimization
    profiles (``profile`` as from :func:`~spiritlm_edge.runtime.trt_engine.profile_shapes`)
    so that variable audio lengths do not trigger rebuilds."""
    cache_dir = str(cache_dir)
    options = {
        "device_id": str(device_id),
        "trt_fp16_enable": "1" if fp16 else "0",
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": cache_dir,
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": cache_dir,
        "trt_cuda_graph_enable": "1" if cuda_graph else "0",
    }
    if workspace_bytes:
        options["trt_max_workspace_size"] = str(int(workspace_bytes))
    if profile:
        for bound in ("min", "opt", "max"):
            options[f"trt_profile_{bound}_shapes"] = _shape_list(profile, bound)
    return options


def _writable_cache_dir(path: Path) -> Path:
    """``<bundle>/tensorrt/ort-cache``, or a per-bundle user cache if the bundle is read-only."""
    preferred = engine_dir(path.parent) / "ort-cache"
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    import hashlib

    from platformdirs import user_cache_dir

    key = hashlib.sha1(str(path.parent.resolve()).encode()).hexdigest()[:12]
    fallback = Path(user_cache_dir("spiritlm-edge")) / "trt-ep" / key
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def default_provider_options(name: str, path: str | os.PathLike, device_id: int = 0) -> dict[str, str]:
    """The options this runtime gives provider ``name`` for the model at ``path``."""
    if name == CUDA_EP:
        return cuda_provider_options(device_id)
    if name == TRT_EP:
        path = Path(path)
        profile = None
        found = component_of(path)
        if found is not None:
            profile = profile_shapes(found[1], onnx_io(path)[0], found[0])
        cache_dir = _writable_cache_dir(path)
        if not any(cache_dir.glob("*.engine")):
            log.info("%s: the TensorRT EP builds its engines on first use (minutes for the large models; cached "
                     "in %s)", path.name, cache_dir)
        return tensorrt_provider_options(cache_dir, fp16=True, device_id=device_id, profile=profile)
    return {}


# ----------------------------------------------------------------------------- opening a model


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(exc).__name__


def _ort_fallback_reason(printed: str) -> str | None:
    """The error ONNX Runtime printed when it fell back to another provider by itself."""
    match = re.search(r"EP Error (.*?) when using", printed, flags=re.S)
    return " ".join(match.group(1).split())[:300] if match else None


_preloaded = False


def _preload_cuda_libraries(ort) -> None:
    """Let onnxruntime-gpu find CUDA / cuDNN from NVIDIA's pip wheels
    (``onnxruntime-gpu[cuda,cudnn]``) as well as the system's; once per process."""
    global _preloaded
    if _preloaded:
        return
    _preloaded = True
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            preload()
    except Exception as exc:  # missing libraries show up, with their names, when the EP starts
        log.debug("onnxruntime.preload_dlls: %s", exc)
    if printed.getvalue().strip():
        log.debug("onnxruntime.preload_dlls: %s", " ".join(printed.getvalue().split()))


def open_session(
    path: str | os.PathLike,
    providers: str | Sequence[ProviderSpec] | None = None,
    sess_options=None,
    device_id: int = 0,
):
    """The first session of the chain that starts for the model at ``path`` (a TensorRT
    engine runner or an ``onnxruntime.InferenceSession``). Failures are logged with their
    reason and the next provider is tried; CPU's own failure is raised."""
    import onnxruntime as ort

    path = Path(path)
    chain = provider_chain(providers, device_id)
    offered = set(ort.get_available_providers())
    explicit = providers is not None
    skipped: list[str] = []

    def warn_fallback(name: str, reason: str, index: int) -> None:
        following = next((n for n, _ in chain[index + 1:]), CPU_EP)
        log.warning("%s: %s failed to start (%s); falling back to %s", path.name, name, reason, following)

    for index, (name, options) in enumerate(chain):
        rest = chain[index + 1:]
        if name == ENGINE_PROVIDER:
            try:
                session = load_engine(
                    path, fallback=lambda rest=rest: open_session(path, rest, sess_options, device_id),
                    device_id=device_id,
                )
            except NoEngine as exc:
                if explicit:
                    log.warning("%s: no TensorRT engine to load (%s); falling back", path.name, exc)
                skipped.append(f"TensorRT engine: {exc}")
                continue
            except Exception as exc:  # a stale engine, TensorRT / CUDA errors
                warn_fallback("TensorRT engine", _one_line(exc), index)
                skipped.append("TensorRT engine failed")
                continue
            record = session.record
            log.info("%s runs on TensorRT engine %s (%s, %s, TensorRT %s)%s", path.name, record["file"],
                     record.get("precision"), record.get("gpu"), record.get("tensorrt"), _notes(skipped))
            return session
        if name not in offered:
            if explicit:
                log.warning("%s: %s is not available (%s); falling back", path.name, name,
                            _INSTALL_HINT.get(name, f"onnxruntime offers {sorted(offered)}"))
            skipped.append(f"{name} not available")
            continue
        ort_chain = [(n, o) for n, o in [(name, options), *rest] if n in offered]
        if name in GPU_PROVIDERS:
            _preload_cuda_libraries(ort)
        printed = io.StringIO()
        try:
            providers_with_options = [
                (n, {**default_provider_options(n, path, device_id), **o}) for n, o in ort_chain
            ]
            # ONNX Runtime may fall back to CPU by itself, printing (not raising) the error.
            with contextlib.redirect_stdout(printed):
                session = ort.InferenceSession(str(path), sess_options=sess_options, providers=providers_with_options)
        except Exception as exc:
            if name == CPU_EP:
                raise
            warn_fallback(name, _one_line(exc), index)
            skipped.append(f"{name} failed")
            continue
        running = session.get_providers()[0]
        if running != name:
            reason = _ort_fallback_reason(printed.getvalue()) or f"ONNX Runtime put the model on {running}"
            warn_fallback(name, reason, index)
            skipped.append(f"{name} failed")
            following = next((n for n, _ in rest if n in offered), CPU_EP)
            if not (running == CPU_EP and following == CPU_EP):
                continue  # ORT's own fallback dropped our options: try the next one ourselves
        detail = ""
        if running == CPU_EP and sess_options is not None:
            detail = f", {sess_options.intra_op_num_threads} threads"
        log.info("%s runs on %s%s%s", path.name, running, detail, _notes(skipped))
        return session
    raise SpiritLMEdgeError(f"No execution provider could open {path}.")  # unreachable: CPU is last


def _notes(skipped: list[str]) -> str:
    return f" ({'; '.join(skipped)})" if skipped else ""


def session_device(session) -> str:
    """``"cuda"`` if ONNX Runtime runs ``session`` on the GPU, else ``"cpu"`` (TensorRT engine
    runners take and return host arrays)."""
    providers = session.get_providers()
    return "cuda" if providers and providers[0] in (TRT_EP, CUDA_EP) else "cpu"


# ----------------------------------------------------------------------------- I/O binding


def run_with_io_binding(
    session,
    feeds: Mapping[str, Any],
    output_names: Sequence[str] | None = None,
    device: str = "cuda",
    device_id: int = 0,
    keep_on_device: bool = False,
) -> list:
    """``session.run`` with inputs and outputs bound on ``device``.

    Feeds are NumPy arrays (copied to the device once) or ``onnxruntime.OrtValue``s already
    there, e.g. outputs of a previous stage run with ``keep_on_device=True``: that is how
    features go from one engine to the next without a round trip through host memory.
    Returns NumPy arrays, or the device-side ``OrtValue``s with ``keep_on_device``.
    """
    import onnxruntime as ort

    binding = session.io_binding()
    keep_alive = []  # host arrays bound by pointer must outlive the run
    for name, value in feeds.items():
        if isinstance(value, ort.OrtValue):
            binding.bind_ortvalue_input(name, value)
            continue
        array = np.ascontiguousarray(value)
        keep_alive.append(array)
        if device == "cpu":
            binding.bind_cpu_input(name, array)
        else:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, device_id))
    names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    for name in names:
        binding.bind_output(name, device, device_id)
    session.run_with_iobinding(binding)
    values = binding.get_outputs()
    return list(values) if keep_on_device else [value.numpy() for value in values]


# ----------------------------------------------------------------------------- the LM on GPU

# llama-cpp-python's high-level API uses the same value for "every layer": llama.cpp
# clamps it to the model's layer count (+1 for the output layer).
ALL_LAYERS = 0x7FFFFFFF

# ggml_type ids (stable in ggml's ABI) of the KV-cache types worth using.
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}


def llama_gpu_available() -> bool:
    """Whether the installed llama-cpp-python was built with a GPU backend (CUDA, Metal, ...)."""
    try:
        import llama_cpp
    except ImportError:
        return False
    try:
        return bool(llama_cpp.llama_supports_gpu_offload())
    except (AttributeError, OSError):
        return False


def default_n_gpu_layers() -> int:
    """All layers on the GPU when llama.cpp can offload, none otherwise."""
    return ALL_LAYERS if llama_gpu_available() else 0


def kv_cache_type(name: str) -> int:
    """ggml type id of a KV-cache type name (f16, q8_0, q4_0, ...)."""
    try:
        return KV_CACHE_TYPES[name.lower()]
    except KeyError:
        raise ModelError(f"KV-cache type {name!r} is not one of {', '.join(KV_CACHE_TYPES)}.") from None


def lm_gpu_settings(
    n_gpu_layers: int | None = None,
    kv_cache: str = "f16",
    flash_attn: bool | None = None,
) -> dict[str, int]:
    """llama.cpp parameters for the LM: ``n_gpu_layers`` (model params) and ``type_k``,
    ``type_v``, ``flash_attn_type`` (context params).

    ``n_gpu_layers`` None means all layers when a GPU backend exists (-1 also means all).
    ``flash_attn`` None lets llama.cpp decide; a quantized V cache needs flash attention.
    """
    if n_gpu_layers is None:
        n_gpu_layers = default_n_gpu_layers()
    elif n_gpu_layers < 0:
        n_gpu_layers = ALL_LAYERS
    elif n_gpu_layers > 0 and not llama_gpu_available():
        log.warning("n_gpu_layers=%d asked, but this llama-cpp-python has no GPU backend: the LM runs on the "
                    "CPU (reinstall it with CMAKE_ARGS=-DGGML_CUDA=on, see the README)", n_gpu_layers)
    type_kv = kv_cache_type(kv_cache)
    if type_kv not in (KV_CACHE_TYPES["f32"], KV_CACHE_TYPES["f16"], KV_CACHE_TYPES["bf16"]) and flash_attn is False:
        raise ModelError(f"A {kv_cache} KV cache needs flash attention in llama.cpp: drop flash_attn=False "
                         "or use kv_cache='f16'.")
    flash = -1 if flash_attn is None else int(bool(flash_attn))  # LLAMA_FLASH_ATTN_TYPE_AUTO / DISABLED / ENABLED
    return {"n_gpu_layers": int(n_gpu_layers), "type_k": type_kv, "type_v": type_kv, "flash_attn_type": flash}
