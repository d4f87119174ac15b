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
import functools
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import llama_cpp
import onnxruntime as ort
from platformdirs import user_cache_dir

from spiritlm_edge.runtime.errors import ModelError, SpiritLMEdgeError
from spiritlm_edge.runtime.trt_engine import (
    ENGINE_PROVIDER,
    FallbackRouter,
    NoEngine,
    component_of,
    cuda_device_info,
    engine_dir,
    import_tensorrt,
    load_engine,
    onnx_io,
    outside_profile,
    profile_shapes,
)

log = logging.getLogger(__name__)

TRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
PREFERENCE = (ENGINE_PROVIDER, TRT_EP, CUDA_EP, CPU_EP)
GPU_PROVIDERS = (ENGINE_PROVIDER, TRT_EP, CUDA_EP)

ALIASES = {
    "tensorrt": ENGINE_PROVIDER,
    "engine": ENGINE_PROVIDER,
    "trt-engine": ENGINE_PROVIDER,
    "trt": TRT_EP,
    "tensorrt-ep": TRT_EP,
    "trt-ep": TRT_EP,
    "cuda": CUDA_EP,
    "gpu": CUDA_EP,
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
    gpu_mem_limit: int | None = None,
) -> dict[str, str]:
    """Options of ONNX Runtime's CUDA EP.

    ``HEURISTIC`` convolution algorithm search because audio lengths vary: ``EXHAUSTIVE``
    (ORT's default) benchmarks cuDNN algorithms again for every new input shape.
    ``kSameAsRequested`` keeps the arena small, which matters on an 8 GB Jetson. No CUDA
    graphs: they replay one captured run and need every run's shapes and I/O addresses fixed
    (I/O binding), while our inputs change length from one run to the next.
    """
    if conv_algo_search not in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
        raise SpiritLMEdgeError(f"conv_algo_search must be EXHAUSTIVE, HEURISTIC or DEFAULT, not {conv_algo_search!r}.")
    options = {
        "device_id": str(device_id),
        "cudnn_conv_algo_search": conv_algo_search,
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1",
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
    key = hashlib.sha1(str(path.parent.resolve()).encode()).hexdigest()[:12]
    fallback = Path(user_cache_dir("spiritlm-edge")) / "trt-ep" / key
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def tensorrt_ep_profile(path: str | os.PathLike, cache_dir: Path) -> dict[str, dict[str, list[int]]] | None:
    """The TensorRT EP's optimization profile for a bundle's model (None outside a bundle).

    It needs the model's input dimensions, which only loading the model tells; they are read
    once per model file (keyed by its sha256 in bundle.json) and kept beside the EP's engine
    cache, so later sessions do not load the model a second time on the CPU.
    """
    path = Path(path)
    found = component_of(path)
    if found is None:
        return None
    component, entry = found
    record = cache_dir / f"{path.stem}.inputs.json"
    shapes = None
    if record.is_file():
        with contextlib.suppress(ValueError, OSError, KeyError):
            saved = json.loads(record.read_text())
            shapes = saved["inputs"] if saved.get("sha256") == entry.get("sha256") else None
    if shapes is None:
        shapes = onnx_io(path)[0]
        with contextlib.suppress(OSError):
            record.write_text(json.dumps({"sha256": entry.get("sha256"), "inputs": shapes}))
    return profile_shapes(entry, shapes, component)


def default_provider_options(name: str, path: str | os.PathLike, device_id: int = 0) -> dict[str, str]:
    """The options this runtime gives provider ``name`` for the model at ``path``."""
    if name == CUDA_EP:
        return cuda_provider_options(device_id)
    if name == TRT_EP:
        path = Path(path)
        cache_dir = _writable_cache_dir(path)
        if not any(cache_dir.glob("*.engine")):
            log.info(
                "%s: the TensorRT EP builds its engines on first use (minutes for the large models; cached in %s)",
                path.name,
                cache_dir,
            )
        profile = tensorrt_ep_profile(path, cache_dir)
        return tensorrt_provider_options(cache_dir, fp16=True, device_id=device_id, profile=profile)
    return {}


class ProfiledSession:
    """An ONNX Runtime session on the TensorRT EP, made to behave like our engine runner.

    The EP builds its engine for the profile it was given, on the first run: inputs outside
    that profile (longer than 30 s, see :mod:`~spiritlm_edge.runtime.limits`) run on the next
    provider of the chain, and a failed run (the engine build ran out of memory beside the
    LM, TensorRT refused the graph) hands this model to the next provider for good, with the
    reason logged, instead of escaping the fallback chain on the first turn.
    """

    def __init__(self, session, path: Path, profile: Mapping[str, Mapping[str, list]], fallback: Callable[[], Any]):
        self.session = session
        self.profile = profile
        self.router = FallbackRouter(path.name, fallback)

    def _current(self):
        return self.router.fallback() if self.router.failed else self.session

    def get_providers(self) -> list[str]:
        return self._current().get_providers()

    def get_inputs(self):
        return self._current().get_inputs()

    def get_outputs(self):
        return self._current().get_outputs()

    def run(self, output_names, feeds, run_options=None):
        if self.router.failed:
            return self.router.fallback().run(output_names, feeds, run_options)
        why = outside_profile(self.profile, {name: tuple(getattr(v, "shape", ())) for name, v in feeds.items()})
        if why:
            return self.router.run_elsewhere(output_names, feeds, why, run_options)
        try:
            return self.session.run(output_names, feeds, run_options)
        except Exception as exc:  # ORT raises its own types (Fail, RuntimeException, EPFail)
            self.router.give_up(_one_line(exc))
            self.session = None  # release its GPU memory
            return self.router.fallback().run(output_names, feeds, run_options)


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
    path = Path(path)
    chain = provider_chain(providers, device_id)
    offered = set(ort.get_available_providers())
    explicit = providers is not None
    skipped: list[str] = []

    def warn_fallback(name: str, reason: str, index: int) -> None:
        following = next((n for n, _ in chain[index + 1 :]), CPU_EP)
        log.warning("%s: %s failed to start (%s); falling back to %s", path.name, name, reason, following)

    for index, (name, options) in enumerate(chain):
        rest = chain[index + 1 :]
        if name == ENGINE_PROVIDER:
            try:
                # What the engine cannot run exceeds its profile, which the TensorRT EP shares: skip it.
                beyond = [(n, o) for n, o in rest if n != TRT_EP]
                session = load_engine(
                    path,
                    fallback=functools.partial(open_session, path, beyond, sess_options, device_id),
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
            log.info(
                "%s runs on TensorRT engine %s (%s, %s, TensorRT %s)%s",
                path.name,
                record["file"],
                record.get("precision"),
                record.get("gpu"),
                record.get("tensorrt"),
                _notes(skipped),
            )
            return session
        if name not in offered:
            if explicit:
                log.warning(
                    "%s: %s is not available (%s); falling back",
                    path.name,
                    name,
                    _INSTALL_HINT.get(name, f"onnxruntime offers {sorted(offered)}"),
                )
            skipped.append(f"{name} not available")
            continue
        ort_chain = [(n, o) for n, o in [(name, options), *rest] if n in offered]
        if name in GPU_PROVIDERS:
            _preload_cuda_libraries(ort)
        if name == TRT_EP:
            import_tensorrt()  # puts pip's libnvinfer in the process; see trt_engine.import_tensorrt
        printed = io.StringIO()
        try:
            providers_with_options = [(n, {**default_provider_options(n, path, device_id), **o}) for n, o in ort_chain]
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
        trt_options = dict(providers_with_options).get(TRT_EP, {})
        if running == TRT_EP and "trt_profile_max_shapes" in trt_options:
            profile = tensorrt_ep_profile(path, Path(trt_options["trt_engine_cache_path"])) or {}
            after_trt = [(n, o) for n, o in rest if n != TRT_EP]
            return ProfiledSession(
                session,
                path,
                profile,
                fallback=functools.partial(open_session, path, after_trt, sess_options, device_id),
            )
        return session
    raise SpiritLMEdgeError(f"No execution provider could open {path}.")  # unreachable: CPU is last


def _notes(skipped: list[str]) -> str:
    return f" ({'; '.join(skipped)})" if skipped else ""


def session_device(session) -> str:
    """``"cuda"`` if ONNX Runtime runs ``session`` on the GPU, else ``"cpu"`` (TensorRT engine
    runners take and return host arrays)."""
    providers = session.get_providers()
    return "cuda" if providers and providers[0] in (TRT_EP, CUDA_EP) else "cpu"


# ----------------------------------------------------------------------------- the LM on GPU

# llama-cpp-python's high-level API uses the same value for "every layer": llama.cpp
# clamps it to the model's layer count (+1 for the output layer).
ALL_LAYERS = 0x7FFFFFFF

# The KV-cache types llama.cpp takes (its --cache-type-k/v choices that llama-cpp-python
# names), as ggml type ids. The quantized ones need flash attention for the V cache.
KV_CACHE_TYPES = {
    "f32": llama_cpp.GGML_TYPE_F32,
    "f16": llama_cpp.GGML_TYPE_F16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q5_1": llama_cpp.GGML_TYPE_Q5_1,
    "q5_0": llama_cpp.GGML_TYPE_Q5_0,
    "q4_1": llama_cpp.GGML_TYPE_Q4_1,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}
_UNQUANTIZED_KV = (llama_cpp.GGML_TYPE_F32, llama_cpp.GGML_TYPE_F16)


def llama_gpu_available() -> bool:
    """Whether the installed llama-cpp-python was built with a GPU backend (CUDA, Metal, ...)."""
    return bool(llama_cpp.llama_supports_gpu_offload())


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
        log.warning(
            "n_gpu_layers=%d asked, but this llama-cpp-python has no GPU backend: the LM runs on the "
            "CPU (reinstall it with CMAKE_ARGS=-DGGML_CUDA=on, see the README)",
            n_gpu_layers,
        )
    type_kv = kv_cache_type(kv_cache)
    if type_kv not in _UNQUANTIZED_KV and flash_attn is False:
        raise ModelError(
            f"A {kv_cache} KV cache needs flash attention in llama.cpp: drop flash_attn=False or use kv_cache='f16'."
        )
    flash = {
        None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
        False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    }[None if flash_attn is None else bool(flash_attn)]
    return {"n_gpu_layers": int(n_gpu_layers), "type_k": type_kv, "type_v": type_kv, "flash_attn_type": flash}


# What llama.cpp logs when a GPU allocation fails (ggml-cuda, ggml-alloc, llama-model):
#   ggml_backend_cuda_buffer_type_alloc_buffer: allocating 3648.00 MiB on device 0: cudaMalloc failed: out of memory
#   alloc_tensor_range: failed to allocate CUDA0 buffer of size 3825205248
_CUDA_ALLOC = re.compile(r"allocating ([\d.]+) MiB on device (\d+): cudaMalloc failed: ([^\n]+)")
_BUFFER_ALLOC = re.compile(r"failed to allocate (\w+) buffer of size (\d+)")


def lm_gpu_memory_error(log_lines: Sequence[str], stage: str, n_gpu_layers: int) -> ModelError | None:
    """A :class:`ModelError` saying that llama.cpp ran out of GPU memory while ``stage``
    (loading the weights, creating the context), how much it asked for and what to try; None
    if ``log_lines`` (llama.cpp's log of that stage) show no failed GPU allocation."""
    text = "".join(log_lines)
    cuda = _CUDA_ALLOC.search(text)
    buffer = next((m for m in _BUFFER_ALLOC.finditer(text) if not m.group(1).upper().startswith("CPU")), None)
    if cuda is None and buffer is None:
        return None
    asked = ""
    if cuda is not None:
        asked = f"{float(cuda.group(1)):.0f} MiB on CUDA device {cuda.group(2)} ({cuda.group(3).strip()})"
    elif buffer is not None:
        asked = f"{int(buffer.group(2)) / 2**20:.0f} MiB for its {buffer.group(1)} buffer"
    layers = "every layer" if n_gpu_layers >= ALL_LAYERS else f"{n_gpu_layers} layers"
    return ModelError(
        f"The GPU ran out of memory while llama.cpp was {stage} with {layers} offloaded: it asked for {asked}. "
        "Put fewer layers on the GPU (--n-gpu-layers, e.g. 20), quantize the KV cache (--kv-cache q8_0), "
        "shorten the context (--n-ctx 1024), or free the GPU (other processes, TensorRT engines)."
    )
