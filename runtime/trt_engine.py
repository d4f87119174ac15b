"""Serialized TensorRT engines of a bundle: their records, their shape profiles, and a
runner with ONNX Runtime's ``session.run`` interface.

Engines live beside the ONNX models they come from, in ``<bundle>/tensorrt/``, with a
record per component in ``tensorrt/engines.json``::

    {"format": "spiritlm-edge-tensorrt", "format_version": 1,
     "engines": {"hubert": {"file": "tensorrt/hubert.fp16.engine", "bytes": ..., "onnx": "hubert.onnx",
                            "onnx_sha256": "...", "precision": "fp16", "gpu": "NVIDIA GeForce RTX 4090",
                            "compute_capability": "8.9", "tensorrt": "10.3.0",
                            "profile": {"audio": {"min": [1, 1280], "opt": [1, 160000], "max": [1, 1600000]}},
                            "inputs": {"audio": "float32"}, "outputs": {"units": "int64", ...}}}}

An engine only runs on the GPU model and TensorRT version it was built for, so
``bundle.json`` (which travels between machines) does not list them; the record says
what each was built for and :func:`engine_mismatch` refuses anything else.

The runner talks to the GPU through the CUDA driver library (``libcuda``, part of every
NVIDIA driver, JetPack included) with ctypes, so it needs no pycuda / cuda-python.
``tensorrt`` is imported only where it is used (:func:`import_tensorrt`). Never torch.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from spiritlm_edge.runtime.audio import MIN_SAMPLES
from spiritlm_edge.runtime.bundle import MANIFEST
from spiritlm_edge.runtime.errors import BundleError
from spiritlm_edge.runtime.limits import GPU_MAX_SAMPLES, GPU_OPT_SAMPLES, MAX_WINDOW_FRAMES

log = logging.getLogger(__name__)

ENGINE_DIR = "tensorrt"
RECORD_FILE = "engines.json"
RECORD_FORMAT = "spiritlm-edge-tensorrt"
RECORD_VERSION = 1
# What a TensorRT engine is called in provider lists, beside ONNX Runtime's provider names.
ENGINE_PROVIDER = "TensorRTEngine"


_ORT_TO_NUMPY = {"float": "float32", "double": "float64"}
_NUMPY_TO_ORT = {v: k for k, v in _ORT_TO_NUMPY.items()}


class EngineUnavailable(BundleError):
    """No usable TensorRT engine for a model; the message says why (callers fall back)."""


class NoEngine(EngineUnavailable):
    """None was built for this model: the normal case until `export tensorrt` runs."""


# ----------------------------------------------------------------------------- CUDA driver


def _load_libcuda():
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


class CudaDriver:
    """The few CUDA driver calls the engine runner needs, on the device's primary context
    (the one the CUDA runtime inside TensorRT uses too)."""

    def __init__(self, device_id: int = 0, lib=None):
        lib = lib or _load_libcuda()
        if lib is None:
            raise EngineUnavailable("no CUDA driver (libcuda.so.1) on this machine")
        c_int, c_uint, c_void_p, c_size_t, c_uint64 = (
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint64,
        )
        signatures = {
            "cuInit": [c_uint],
            "cuDeviceGetCount": [ctypes.POINTER(c_int)],
            "cuDeviceGet": [ctypes.POINTER(c_int), c_int],
            "cuDeviceGetName": [ctypes.c_char_p, c_int, c_int],
            "cuDeviceGetAttribute": [ctypes.POINTER(c_int), c_int, c_int],
            "cuDevicePrimaryCtxRetain": [ctypes.POINTER(c_void_p), c_int],
            "cuCtxSetCurrent": [c_void_p],
            "cuStreamCreate": [ctypes.POINTER(c_void_p), c_uint],
            "cuStreamSynchronize": [c_void_p],
            "cuMemAlloc_v2": [ctypes.POINTER(c_uint64), c_size_t],
            "cuMemFree_v2": [c_uint64],
            "cuMemcpyHtoDAsync_v2": [c_uint64, c_void_p, c_size_t, c_void_p],
            "cuMemcpyDtoHAsync_v2": [c_void_p, c_uint64, c_size_t, c_void_p],
            "cuGetErrorString": [c_int, ctypes.POINTER(ctypes.c_char_p)],
        }
        for name, argtypes in signatures.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, c_int
        self.lib = lib
        self._check(lib.cuInit(0), "cuInit")
        count = c_int()
        self._check(lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        if device_id >= count.value:
            raise EngineUnavailable(f"CUDA device {device_id} does not exist ({count.value} visible)")
        self.device = c_int()
        self._check(lib.cuDeviceGet(ctypes.byref(self.device), device_id), "cuDeviceGet")
        self.context = c_void_p()
        self._check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.context), self.device), "cuDevicePrimaryCtxRetain")
        self.activate()
        self.stream = c_void_p()
        self._check(lib.cuStreamCreate(ctypes.byref(self.stream), 0), "cuStreamCreate")

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(status, ctypes.byref(text))
            message = text.value.decode() if text.value else f"error {status}"
            raise EngineUnavailable(f"CUDA {what} failed: {message}")

    def activate(self) -> None:
        self._check(self.lib.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def name(self) -> str:
        buffer = ctypes.create_string_buffer(256)
        self._check(self.lib.cuDeviceGetName(buffer, 256, self.device), "cuDeviceGetName")
        return buffer.value.decode()

    def compute_capability(self) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
        self._check(self.lib.cuDeviceGetAttribute(ctypes.byref(major), 75, self.device), "cuDeviceGetAttribute")
        self._check(self.lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, self.device), "cuDeviceGetAttribute")
        return f"{major.value}.{minor.value}"

    def alloc(self, nbytes: int) -> int:
        pointer = ctypes.c_uint64()
        self._check(self.lib.cuMemAlloc_v2(ctypes.byref(pointer), max(int(nbytes), 256)), "cuMemAlloc")
        return pointer.value

    def free(self, pointer: int) -> None:
        self.lib.cuMemFree_v2(pointer)

    def to_device(self, pointer: int, array: np.ndarray) -> None:
        if array.nbytes:
            self._check(
                self.lib.cuMemcpyHtoDAsync_v2(pointer, array.ctypes.data, array.nbytes, self.stream),
                "cuMemcpyHtoDAsync",
            )

    def to_host(self, array: np.ndarray, pointer: int) -> None:
        if array.nbytes:
            self._check(
                self.lib.cuMemcpyDtoHAsync_v2(array.ctypes.data, pointer, array.nbytes, self.stream),
                "cuMemcpyDtoHAsync",
            )

    def synchronize(self) -> None:
        self._check(self.lib.cuStreamSynchronize(self.stream), "cuStreamSynchronize")


@dataclass(frozen=True)
class DeviceInfo:
    """What an engine is built for: the GPU's name and compute capability."""

    name: str
    compute_capability: str
    device_id: int = 0


@cache
def cuda_device_info(device_id: int = 0) -> DeviceInfo | None:
    """The GPU ``device_id`` as the CUDA driver reports it, or None without a driver / GPU."""
    try:
        driver = CudaDriver(device_id)
        return DeviceInfo(driver.name(), driver.compute_capability(), device_id)
    except (EngineUnavailable, AttributeError) as exc:
        log.debug("no CUDA device %d: %s", device_id, exc)
        return None


def import_tensorrt():
    """The ``tensorrt`` module, or None where it cannot be imported.

    Importing it also loads pip's TensorRT libraries (the ``tensorrt_libs`` package) into the
    process, which ONNX Runtime's TensorRT EP needs before its session opens: its
    ``preload_dlls`` covers CUDA and cuDNN only, so without this the EP fails with
    "libnvinfer.so.10: cannot open shared object file".
    """
    try:
        import tensorrt  # optional heavy dependency (the gpu extra, or JetPack's python3-libnvinfer)
    except (ImportError, OSError) as exc:  # OSError: the module is there, its libraries are not
        log.debug("tensorrt cannot be imported: %s", exc)
        return None
    return tensorrt


def tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None if the ``tensorrt`` module is absent."""
    trt = import_tensorrt()
    return None if trt is None else str(trt.__version__)


# ----------------------------------------------------------------------------- records


def engine_dir(bundle_dir: str | os.PathLike) -> Path:
    return Path(bundle_dir) / ENGINE_DIR


def read_engine_records(bundle_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Component name -> engine record, from ``<bundle>/tensorrt/engines.json`` ({} if none)."""
    path = engine_dir(bundle_dir) / RECORD_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(
            f"{path} is not valid JSON ({exc}); delete it and rebuild the engines with "
            f"`spiritlm-edge export tensorrt --bundle {bundle_dir}`."
        ) from None
    if data.get("format") != RECORD_FORMAT or data.get("format_version", 0) > RECORD_VERSION:
        raise BundleError(
            f"{path} is not an engine record this spiritlm-edge reads; delete it and rebuild "
            f"the engines with `spiritlm-edge export tensorrt --bundle {bundle_dir}`."
        )
    return dict(data.get("engines", {}))


def write_engine_records(bundle_dir: str | os.PathLike, records: Mapping[str, dict]) -> None:
    directory = engine_dir(bundle_dir)
    directory.mkdir(parents=True, exist_ok=True)
    data = {"format": RECORD_FORMAT, "format_version": RECORD_VERSION, "engines": dict(records)}
    tmp = directory / (RECORD_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / RECORD_FILE)


def engine_mismatch(
    record: Mapping[str, Any],
    device: DeviceInfo | None,
    trt_version: str | None,
    onnx_sha256: str | None = None,
    bundle_dir: str | os.PathLike | None = None,
) -> str | None:
    """Why the engine of ``record`` must not run here (None if it may): another GPU, compute
    capability or TensorRT version, another ONNX file, or a missing / truncated engine file."""
    reasons = []
    if device is None:
        reasons.append("there is no CUDA GPU here")
    elif (record.get("gpu"), record.get("compute_capability")) != (device.name, device.compute_capability):
        reasons.append(
            f"it was built for {record.get('gpu')} (compute {record.get('compute_capability')}), "
            f"this is {device.name} (compute {device.compute_capability})"
        )
    if trt_version is None:
        reasons.append("TensorRT is not installed")
    elif record.get("tensorrt") != trt_version:
        reasons.append(f"it was built with TensorRT {record.get('tensorrt')}, this is TensorRT {trt_version}")
    if onnx_sha256 is not None and record.get("onnx_sha256") != onnx_sha256:
        reasons.append(f"{record.get('onnx')} changed since (the bundle was re-exported)")
    if bundle_dir is not None:
        path = Path(bundle_dir) / str(record.get("file", ""))
        if not path.is_file():
            reasons.append(f"{record.get('file')} is missing")
        elif path.stat().st_size != record.get("bytes"):
            reasons.append(
                f"{record.get('file')} has {path.stat().st_size} bytes, the record says {record.get('bytes')}"
            )
    return "; ".join(reasons) or None


def component_of(onnx_path: str | os.PathLike) -> tuple[str, dict[str, Any]] | None:
    """(component name, bundle.json entry) of a bundle's ONNX file, or None if ``onnx_path``
    is not listed in the ``bundle.json`` beside it (e.g. the VAD model)."""
    onnx_path = Path(onnx_path)
    manifest = onnx_path.parent / MANIFEST
    if not manifest.is_file():
        return None
    try:
        components = json.loads(manifest.read_text()).get("components", {})
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    for name, entry in components.items():
        if entry.get("file") == onnx_path.name:
            return name, entry
    return None


# ----------------------------------------------------------------------------- shape profiles


def onnx_io(onnx_path: str | os.PathLike) -> tuple[dict[str, list], dict[str, str], dict[str, str]]:
    """(input name -> dims, input name -> dtype, output name -> dtype) of an ONNX model, read
    with ONNX Runtime on the CPU. Dims are ints, or dimension names for dynamic axes."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])

    def dtype(arg) -> str:  # "tensor(float)" -> "float32"
        name = arg.type[len("tensor(") : -1]
        return _ORT_TO_NUMPY.get(name, name)

    shapes = {arg.name: list(arg.shape) for arg in session.get_inputs()}
    return shapes, {a.name: dtype(a) for a in session.get_inputs()}, {a.name: dtype(a) for a in session.get_outputs()}


def _default_range(entry: Mapping[str, Any], dim: str) -> tuple[int, int, int] | None:
    """Built-in range of a dynamic dimension named ``dim`` in a component like ``entry``,
    matching what the runtime feeds it, up to the GPU maximum (:mod:`~spiritlm_edge.runtime.limits`)."""
    if dim == "batch":
        return 1, 1, 1
    if dim == "samples":  # audio in: chunks of MIN_SAMPLES .. 100 s (audio.chunks); longer than 30 s falls back
        low = int(entry.get("min_samples", MIN_SAMPLES))
        high = max(low, int(entry.get("max_samples", GPU_MAX_SAMPLES)))
        return low, min(max(low, GPU_OPT_SAMPLES), high), high
    if dim == "frames":
        if "hop_length" in entry and "context_frames" in entry:  # vocoder generator: windows + context
            context = entry["context_frames"]
            return 1, 250, MAX_WINDOW_FRAMES + int(context["left"]) + int(context["right"])
        if "context_units" in entry:  # vocoder duration predictor: the 25 Hz units of one decode
            return 1, 250, 1500
        if "frame_hop" in entry and "frames_per_code" in entry:  # pitch VQ-VAE: F0 frames of a chunk
            hop = int(entry["frame_hop"])
            return MIN_SAMPLES // hop + 1, GPU_OPT_SAMPLES // hop + 1, GPU_MAX_SAMPLES // hop + 1
    return None


def profile_shapes(
    entry: Mapping[str, Any], input_shapes: Mapping[str, list], component: str = "?"
) -> dict[str, dict[str, list[int]]]:
    """min / opt / max shape of every input, for a TensorRT optimization profile.

    Each dynamic axis takes its range from, in order:

    1. ``entry["dynamic_axes"][input][str(axis)] = [min, opt, max]``;
    2. ``entry["min_<dim>"]``, ``entry["opt_<dim>"]``, ``entry["max_<dim>"]`` where ``<dim>`` is
       the axis' ONNX dimension name (e.g. ``min_samples`` / ``max_samples``), each one
       falling back to
    3. the built-in range of that dimension name (batch, samples, frames; see
       :func:`_default_range`).
    """
    explicit = entry.get("dynamic_axes") or {}
    profile = {}
    for name, dims in input_shapes.items():
        low: list[int] = []
        opt: list[int] = []
        high: list[int] = []
        for axis, dim in enumerate(dims):
            if isinstance(dim, int) and dim > 0:
                for bound in (low, opt, high):
                    bound.append(dim)
                continue
            given = (explicit.get(name) or {}).get(str(axis))
            if given is None:
                dim_name = dim if isinstance(dim, str) else ""
                default = _default_range(entry, dim_name)
                keys = [f"{bound}_{dim_name}" for bound in ("min", "opt", "max")]
                if default is None and not all(k in entry for k in keys):
                    raise BundleError(
                        f"Component {component!r}: input {name!r} axis {axis} (dimension {dim!r}) is dynamic and "
                        f'bundle.json gives no range for it. Add "dynamic_axes": {{"{name}": {{"{axis}": '
                        "[min, opt, max]}} to the component's entry (the exporter should write it)."
                    )
                given = [entry.get(k, default[i] if default else None) for i, k in enumerate(keys)]
            try:
                a, b, c = (int(v) for v in given)
            except (TypeError, ValueError):
                raise BundleError(
                    f"Component {component!r}: the range of input {name!r} axis {axis} is {given!r}; "
                    "expected three integers [min, opt, max]."
                ) from None
            if not 0 < a <= b <= c:
                raise BundleError(
                    f"Component {component!r}: the range of input {name!r} axis {axis} is "
                    f"[{a}, {b}, {c}]; expected 0 < min <= opt <= max."
                )
            low.append(a)
            opt.append(b)
            high.append(c)
        profile[name] = {"min": low, "opt": opt, "max": high}
    return profile


def outside_profile(profile: Mapping[str, Mapping[str, list]], shapes: Mapping[str, tuple]) -> str | None:
    """Why input ``shapes`` fall outside ``profile`` (None if they fit)."""
    for name, shape in shapes.items():
        bounds = profile.get(name)
        if bounds is None:
            continue
        if len(shape) != len(bounds["min"]) or any(
            not lo <= s <= hi for s, lo, hi in zip(shape, bounds["min"], bounds["max"], strict=True)
        ):
            return f"input {name!r} has shape {list(shape)}, the engine takes {bounds['min']} .. {bounds['max']}"
    return None


# ----------------------------------------------------------------------------- the runner


@dataclass
class IOArg:
    """Like ONNX Runtime's NodeArg: name, shape, type."""

    name: str
    shape: list
    type: str


class FallbackRouter:
    """What a GPU session does with work it cannot do: hand it to ``fallback()``, a session on
    the next provider of the chain, made on first need.

    * Inputs outside the optimization profile (:meth:`run_elsewhere`): that run only, one
      warning for the first.
    * A failure of the GPU session itself (:meth:`give_up`: an engine the TensorRT EP could not
      build on its first run, out of GPU memory): this run and every later one, with the reason.
    """

    def __init__(self, name: str, fallback: Callable[[], Any] | None):
        self.name = name
        self._fallback_factory = fallback
        self._fallback = None
        self._warned = False
        self.failed: str | None = None

    def fallback(self):
        if self._fallback_factory is None:
            raise EngineUnavailable(
                f"{self.name}: {self.failed or 'the GPU session cannot run it'}, and there is no fallback session"
            )
        if self._fallback is None:
            self._fallback = self._fallback_factory()
        return self._fallback

    def run_elsewhere(self, output_names, feeds, why: str, run_options=None):
        if self._fallback_factory is None:
            raise EngineUnavailable(f"{self.name}: {why}, and there is no fallback session")
        session = self.fallback()
        if not self._warned:
            log.warning("%s: %s; running such inputs on %s", self.name, why, session.get_providers()[0])
            self._warned = True
        return session.run(output_names, feeds, run_options)

    def give_up(self, reason: str) -> None:
        self.failed = reason
        following = self.fallback().get_providers()[0]
        log.warning(
            "%s: the GPU session failed (%s); running this model on %s from now on", self.name, reason, following
        )


class TensorRTSession:
    """A serialized TensorRT engine behind ONNX Runtime's ``run(output_names, feeds)``.

    Inputs whose shapes fall outside the engine's optimization profile (or outputs whose
    shape depends on the data) go to ``fallback()``, an ONNX Runtime session made on first
    need, with one warning.
    """

    def __init__(
        self,
        engine_path: str | os.PathLike,
        record: Mapping[str, Any],
        fallback: Callable[[], Any] | None = None,
        device_id: int = 0,
    ):
        trt = import_tensorrt()
        if trt is None:
            raise EngineUnavailable("the tensorrt module cannot be imported (pip install 'spiritlm-edge[gpu]')")
        self.path = Path(engine_path)
        self.record = dict(record)
        self.router = FallbackRouter(self.path.name, fallback)
        self._trt = trt
        self._cuda = CudaDriver(device_id)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineUnavailable(f"TensorRT could not deserialize {self.path} (see its log above)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineUnavailable(
                f"TensorRT could not create an execution context for {self.path} (out of GPU memory?)"
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        # Shape tensors (and outputs computed from shapes only) may live in host memory: they
        # are bound to NumPy arrays, not device buffers.
        self._on_host = {n for n in names if self.engine.get_tensor_location(n) == trt.TensorLocation.HOST}
        # What callers get back: the ONNX model's dtypes (TensorRT 8 turns int64 into int32).
        self._onnx_dtypes = {**record.get("inputs", {}), **record.get("outputs", {})}
        self.profile = {
            n: dict(zip(("min", "opt", "max"), map(list, self.engine.get_tensor_profile_shape(n, 0)), strict=True))
            for n in self.input_names
        }
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity)
        # One execution context and one set of buffers: runs from several threads take turns
        # (ONNX Runtime sessions allow concurrent runs, and callers may rely on it).
        self._lock = threading.Lock()

    def get_providers(self) -> list[str]:
        return [ENGINE_PROVIDER]

    def get_inputs(self) -> list[IOArg]:
        return [IOArg(n, list(self.engine.get_tensor_shape(n)), self._onnx_type(n)) for n in self.input_names]

    def get_outputs(self) -> list[IOArg]:
        return [IOArg(n, list(self.engine.get_tensor_shape(n)), self._onnx_type(n)) for n in self.output_names]

    def _onnx_type(self, name: str) -> str:
        dtype = self._onnx_dtypes.get(name, self._dtypes[name].name)
        return f"tensor({_NUMPY_TO_ORT.get(dtype, dtype)})"

    def _buffer(self, name: str, nbytes: int) -> int:
        pointer, capacity = self._buffers.get(name, (0, 0))
        if capacity < nbytes:
            if pointer:
                self._cuda.free(pointer)
            capacity = max(nbytes, 2 * capacity)
            pointer = self._cuda.alloc(capacity)
            self._buffers[name] = (pointer, capacity)
        return pointer

    def run(self, output_names, feeds: Mapping[str, np.ndarray], run_options=None) -> list[np.ndarray]:
        if self.router.failed:
            return self.router.fallback().run(output_names, feeds, run_options)
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BundleError(f"{self.path.name} needs inputs {missing}; got {sorted(feeds)}.")
        arrays = {n: np.ascontiguousarray(np.asarray(feeds[n]), dtype=self._dtypes[n]) for n in self.input_names}
        why = outside_profile(self.profile, {n: a.shape for n, a in arrays.items()})
        if why:
            return self.router.run_elsewhere(output_names, feeds, why, run_options)
        try:
            with self._lock:
                results = self._execute(arrays)
        except (AttributeError, TypeError, RuntimeError) as exc:  # a TensorRT whose API moved, or refused
            self.router.give_up(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            return self.router.fallback().run(output_names, feeds, run_options)
        if isinstance(results, str):
            return self.router.run_elsewhere(output_names, feeds, results, run_options)
        wanted = output_names or self.output_names
        return [results[n].astype(self._onnx_dtypes.get(n, results[n].dtype), copy=False) for n in wanted]

    def _execute(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray] | str:
        """The engine's outputs, or why it cannot give them."""
        self._cuda.activate()
        for name, array in arrays.items():
            self.context.set_input_shape(name, array.shape)
        shapes = {n: tuple(self.context.get_tensor_shape(n)) for n in self.output_names}
        if any(d < 0 for shape in shapes.values() for d in shape):
            return "an output's shape depends on the data"
        for name, array in arrays.items():
            if name in self._on_host:
                self.context.set_tensor_address(name, array.ctypes.data)
                continue
            pointer = self._buffer(name, array.nbytes)
            self._cuda.to_device(pointer, array)
            self.context.set_tensor_address(name, pointer)
        results = {}
        for name, shape in shapes.items():
            results[name] = np.empty(shape, dtype=self._dtypes[name])
            on_host = name in self._on_host
            pointer = results[name].ctypes.data if on_host else self._buffer(name, results[name].nbytes)
            self.context.set_tensor_address(name, pointer)
        if not self.context.execute_async_v3(self._cuda.stream.value or 0):
            self._cuda.synchronize()
            return "TensorRT failed to run it (see its log above)"
        for name, array in results.items():
            if name not in self._on_host:
                self._cuda.to_host(array, self._buffers[name][0])
        self._cuda.synchronize()
        return results

    def __del__(self):
        cuda = getattr(self, "_cuda", None)
        for pointer, _ in getattr(self, "_buffers", {}).values():
            try:
                cuda.free(pointer)
            except Exception:  # interpreter shutdown: the driver may be gone
                pass


def load_engine(
    onnx_path: str | os.PathLike,
    fallback: Callable[[], Any] | None = None,
    device_id: int = 0,
    device: DeviceInfo | None = None,
    trt_version: str | None = None,
) -> TensorRTSession:
    """The TensorRT engine built from the bundle's ``onnx_path``, if one was built for this
    GPU and TensorRT version; raises :class:`EngineUnavailable` saying why not."""
    onnx_path = Path(onnx_path)
    found = component_of(onnx_path)
    if found is None:
        raise NoEngine(f"{onnx_path.name} is not a component of a bundle")
    name, entry = found
    bundle_dir = onnx_path.parent
    record = read_engine_records(bundle_dir).get(name)
    if record is None:
        raise NoEngine(f"none built (`spiritlm-edge export tensorrt --bundle {bundle_dir}`)")
    device = device or cuda_device_info(device_id)
    trt_version = trt_version or tensorrt_version()
    why = engine_mismatch(record, device, trt_version, entry.get("sha256"), bundle_dir)
    if why:
        raise EngineUnavailable(
            f"{record['file']} is stale: {why}. Rebuild it with `spiritlm-edge export tensorrt --bundle {bundle_dir}`"
        )
    return TensorRTSession(bundle_dir / record["file"], record, fallback=fallback, device_id=device_id)
