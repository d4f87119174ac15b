"""``spiritlm-edge export tensorrt``: serialized TensorRT engines from a bundle's ONNX models.

Run on the machine that will use them (an engine is tied to its GPU model and TensorRT
version): fp16 by default (``precision="fp32"`` for full precision, TF32 off too), one
optimization profile per engine covering the lengths the runtime feeds it (from
``bundle.json``, see :func:`~spiritlm_edge.runtime.trt_engine.profile_shapes`), and a
timing cache per GPU + TensorRT version in ``<bundle>/tensorrt/`` so rebuilds skip
kernel timing. Each engine's record says what it was built for; engines that are up to
date are kept, stale ones are rebuilt, saying why.

How fp16 is asked for depends on TensorRT's major version (see :func:`build_engine`):

* 8.6 (JetPack 6.0) and 10.x (the ``gpu`` extra, JetPack 6.1+): the ``FP16`` builder flag
  lets TensorRT pick fp16 kernels for the fp32 graph (8.x also needs the explicit-batch flag);
* 11.x: networks are strongly typed and the builder flag is gone, so precision comes from
  the graph: the engine is built from an fp16 copy of the ONNX model with fp32 inputs and
  outputs (``quant.onnx_int8.convert_fp16``, needs the ``onnx`` package).

Needs the ``tensorrt`` Python module (``pip install 'spiritlm-edge[gpu]'``, or JetPack's
``python3-libnvinfer`` on a Jetson) and onnxruntime (to read input dimension names). No torch.
A TensorRT whose Python API lacks what this needs is a :class:`SpiritLMEdgeError` saying so.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spiritlm_edge.runtime.bundle import Bundle
from spiritlm_edge.runtime.errors import BundleError, SpiritLMEdgeError
from spiritlm_edge.runtime.trt_engine import (
    DeviceInfo,
    cuda_device_info,
    engine_dir,
    engine_mismatch,
    import_tensorrt,
    onnx_io,
    profile_shapes,
    read_engine_records,
    write_engine_records,
)

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32")


# The TensorRT majors whose builder API this module speaks.
SUPPORTED_MAJORS = (8, 10, 11)


def _import_tensorrt():
    trt = import_tensorrt()
    if trt is None:
        raise SpiritLMEdgeError(
            "Building TensorRT engines needs the tensorrt module: pip install 'spiritlm-edge[gpu]' on a desktop, "
            "or `sudo apt install python3-libnvinfer` (JetPack) on a Jetson."
        )
    return trt


def tensorrt_major(trt) -> int:
    """TensorRT's major version; a :class:`SpiritLMEdgeError` for one this module cannot drive."""
    version = str(getattr(trt, "__version__", "?"))
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else -1
    if major < SUPPORTED_MAJORS[0]:
        raise SpiritLMEdgeError(
            f"TensorRT {version} is too old to build engines here: use 8.6 (JetPack 6.0), 10.x "
            "(pip install 'spiritlm-edge[gpu]') or 11.x."
        )
    return major


def _make_logger(trt):
    class Logger(trt.ILogger):
        """TensorRT's messages into Python logging; errors kept for the exception."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.debug("TensorRT warning: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return Logger()


def timing_cache_path(bundle_dir: str | os.PathLike, device: DeviceInfo, trt_version: str) -> Path:
    """One timing cache per GPU model and TensorRT version: TensorRT rejects any other."""
    tag = re.sub(r"[^A-Za-z0-9]+", "-", f"{device.name}-sm{device.compute_capability}-trt{trt_version}").strip("-")
    return engine_dir(bundle_dir) / f"timing-{tag}.cache"


def onnx_components(bundle: Bundle) -> list[str]:
    """Components of ``bundle`` that are ONNX models, less the stateful streaming vocoder
    (``states`` in its entry), which the runtime runs on ONNX Runtime's CPU provider only."""
    return [
        name
        for name, entry in bundle.components.items()
        if str(entry.get("file", "")).endswith(".onnx") and "states" not in entry
    ]


def build_engine(
    trt,
    onnx_path: Path,
    engine_path: Path,
    profile: dict[str, dict[str, list[int]]],
    precision: str,
    timing_cache: Path,
    workspace_bytes: int | None = None,
) -> int:
    """Build one serialized engine from ``onnx_path`` into ``engine_path``; returns its size.

    TensorRT 11 takes precision from the graph (strongly typed networks), so its fp16 engine
    is built from an fp16 copy of the model, made in a temporary file beside the engine."""
    if precision == "fp16" and tensorrt_major(trt) >= 11:
        with tempfile.TemporaryDirectory(dir=engine_path.parent) as tmp:
            fp16_path = Path(tmp) / onnx_path.name
            try:
                # only TensorRT 11 needs it, and it needs onnx, which a Jetson's install lacks
                from spiritlm_edge.quant.onnx_int8 import convert_fp16

                convert_fp16(onnx_path, fp16_path)
            except ImportError as exc:
                raise SpiritLMEdgeError(
                    f"TensorRT 11 builds fp16 engines from an fp16 ONNX graph, which needs the onnx package "
                    f"({exc}): pip install onnx, or build --fp32."
                ) from None
            return _build(
                trt, onnx_path.name, fp16_path, engine_path, profile, precision, timing_cache, workspace_bytes
            )
    return _build(trt, onnx_path.name, onnx_path, engine_path, profile, precision, timing_cache, workspace_bytes)


def _build(
    trt,
    name: str,
    onnx_path: Path,
    engine_path: Path,
    profile: dict[str, dict[str, list[int]]],
    precision: str,
    timing_cache: Path,
    workspace_bytes: int | None,
) -> int:
    major = tensorrt_major(trt)
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    # 8.x needs the explicit-batch flag; 10 ignores it (deprecated) and 11 removed it: every
    # network is explicit-batch, and in 11 strongly typed.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if major < 10 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise BundleError(f"TensorRT cannot parse {name}: {'; '.join(errors)[:500]}")
    config = builder.create_builder_config()
    if precision == "fp16" and major < 11:  # 11: the fp16 graph says it (see build_engine)
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "fp32":  # fp32 means fp32: no TF32 matmuls either
        config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    optimization_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        bounds = profile.get(tensor.name)
        if bounds is None:
            raise BundleError(f"{name}: TensorRT sees an input {tensor.name!r} that ONNX Runtime does not.")
        optimization_profile.set_shape(tensor.name, bounds["min"], bounds["opt"], bounds["max"])
    config.add_optimization_profile(optimization_profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(logger.errors[-3:]) or "no message"
        raise BundleError(
            f"TensorRT failed to build an engine from {name} ({detail[:500]}). With too little "
            "GPU memory, lower max lengths in bundle.json's dynamic_axes or free the GPU."
        )
    data = memoryview(serialized)
    tmp = engine_path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, engine_path)
    timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return len(data)


def build_tensorrt_engines(
    bundle_dir: str | os.PathLike,
    precision: str = "fp16",
    components: Iterable[str] | None = None,
    force: bool = False,
    workspace_bytes: int | None = None,
    device_id: int = 0,
) -> dict[str, dict[str, Any]]:
    """Build (or rebuild where stale) TensorRT engines for the bundle's ONNX components
    into ``<bundle>/tensorrt/`` and record them; returns component -> engine record.

    An engine is kept when its record matches this GPU, TensorRT version, precision,
    profile and the current ONNX file; otherwise it is rebuilt and the reason logged.
    ``force`` rebuilds everything.
    """
    if precision not in PRECISIONS:
        raise SpiritLMEdgeError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}.")
    trt = _import_tensorrt()
    bundle = Bundle(bundle_dir)
    device = cuda_device_info(device_id)
    if device is None:
        raise SpiritLMEdgeError(
            f"No CUDA GPU {device_id} is visible (no NVIDIA driver, or CUDA_VISIBLE_DEVICES "
            "hides it): TensorRT engines are built on the GPU that will run them."
        )
    trt_version = str(trt.__version__)
    tensorrt_major(trt)
    names = list(components) if components else onnx_components(bundle)
    unknown = [n for n in names if n not in onnx_components(bundle)]
    if unknown:
        raise BundleError(
            f"Bundle {bundle.dir} has no ONNX component {', '.join(map(repr, unknown))} (it has: "
            f"{', '.join(onnx_components(bundle))})."
        )
    directory = engine_dir(bundle.dir)
    directory.mkdir(parents=True, exist_ok=True)
    records = read_engine_records(bundle.dir)
    cache = timing_cache_path(bundle.dir, device, trt_version)
    for name in names:
        entry = bundle.component(name)
        onnx_path = bundle.path(name)
        input_shapes, input_types, output_types = onnx_io(onnx_path)
        profile = profile_shapes(entry, input_shapes, name)
        old = records.get(name)
        reason = None
        if old is not None:
            reason = engine_mismatch(old, device, trt_version, entry["sha256"], bundle.dir)
            if reason is None and old.get("precision") != precision:
                reason = f"it is {old.get('precision')}, {precision} was asked"
            if reason is None and old.get("profile") != profile:
                reason = "bundle.json's shape ranges changed"
            if reason is None and not force:
                log.info("%s: TensorRT engine %s is up to date", name, old["file"])
                continue
            log.info("%s: rebuilding the TensorRT engine: %s", name, reason or "forced")
        else:
            log.info(
                "%s: building a %s TensorRT engine for %s (takes minutes for the large models)",
                name,
                precision,
                device.name,
            )
        engine_file = f"{name}.{precision}.engine"
        start = time.perf_counter()
        try:
            size = build_engine(trt, onnx_path, directory / engine_file, profile, precision, cache, workspace_bytes)
        except (AttributeError, TypeError) as exc:  # a TensorRT whose Python API moved
            raise SpiritLMEdgeError(
                f"TensorRT {trt_version}'s Python API lacks what building needs ({type(exc).__name__}: {exc}). "
                f"spiritlm-edge builds with TensorRT {', '.join(f'{m}.x' for m in SUPPORTED_MAJORS)}; "
                "see the README's GPU section for the tested versions."
            ) from None
        except RuntimeError as exc:  # TensorRT's own errors (out of memory, an unsupported layer)
            raise BundleError(f"TensorRT failed to build {name}: {' '.join(str(exc).split())[:300]}") from None
        if old is not None and old.get("file") != f"{directory.name}/{engine_file}":
            (bundle.dir / old["file"]).unlink(missing_ok=True)  # the other precision's engine
        records[name] = {
            "file": f"{directory.name}/{engine_file}",
            "bytes": size,
            "onnx": entry["file"],
            "onnx_sha256": entry["sha256"],
            "precision": precision,
            "gpu": device.name,
            "compute_capability": device.compute_capability,
            "tensorrt": trt_version,
            "profile": profile,
            "inputs": input_types,
            "outputs": output_types,
            "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_engine_records(bundle.dir, records)  # after each engine: an interrupted build keeps the rest
        log.info("%s: built %s (%.1f MB) in %.0f s", name, engine_file, size / 1e6, time.perf_counter() - start)
    return {name: records[name] for name in names}
