"""Execution-provider chain, fallback, TensorRT engine records / profiles / builds and the
LM's GPU settings, on the CPU.

The GPU pieces are faked where this machine has none: ONNX Runtime's provider list and
session constructor (a GPU provider that fails to start, a TensorRT EP whose lazy engine
build fails), the ``tensorrt`` module and the CUDA driver (an "engine" that computes the
test model's function on fake device memory). The fake ``tensorrt`` has the Python API
surface of the major version it claims, as NVIDIA publishes it: 8.6 needs the explicit-batch
flag, 10 has ``BuilderFlag.FP16``, 11 does not (strongly typed networks), so code that uses
a name a version lacks fails here as it would on the GPU. Everything else (ORT on CPU, the
records, the profiles, the logs) is real.
"""

from __future__ import annotations

import builtins
import ctypes
import importlib.machinery
import json
import logging
import sys
import types

import llama_cpp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from spiritlm_edge.cli import app, main
from spiritlm_edge.export.speech import export_speech
from spiritlm_edge.export.tensorrt import build_tensorrt_engines, onnx_components
from spiritlm_edge.runtime import limits, llama_log, providers, trt_engine
from spiritlm_edge.runtime import lm as lm_module
from spiritlm_edge.runtime.bundle import Bundle, add_component
from spiritlm_edge.runtime.errors import BundleError, ModelError, SpiritLMEdgeError
from spiritlm_edge.runtime.onnx_session import clear_session_cache, create_session

CPU, CUDA, TRT = providers.CPU_EP, providers.CUDA_EP, providers.TRT_EP
REAL_SESSION = ort.InferenceSession


def write_model(path, opset=17):
    """y = 2 * audio, n = shape(audio): a float output and an int64 one."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["audio", "two"], ["y"]), helper.make_node("Shape", ["audio"], ["n"])],
        "double",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, "samples"])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "samples"]),
            helper.make_tensor_value_info("n", TensorProto.INT64, [2]),
        ],
        initializer=[two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture
def bundle(tmp_path):
    """A bundle with one ONNX component, ``double``, whose audio ranges 1280..16000 samples."""
    write_model(tmp_path / "double.onnx")
    add_component(
        tmp_path,
        "double",
        {
            "file": "double.onnx",
            "opset": 17,
            "inputs": ["audio"],
            "outputs": ["y", "n"],
            "min_samples": 1280,
            "opt_samples": 8000,
            "max_samples": 16000,
        },
        variant="base",
    )
    return tmp_path


@pytest.fixture(autouse=True)
def fresh_sessions():
    clear_session_cache()
    trt_engine.cuda_device_info.cache_clear()
    yield
    clear_session_cache()
    trt_engine.cuda_device_info.cache_clear()


def offer(monkeypatch, *names):
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(names))


def provider_names(providers_arg):
    return [p[0] if isinstance(p, tuple) else p for p in providers_arg or []]


class BrokenGpuSession(REAL_SESSION):
    """ORT session whose GPU providers fail to start, like onnxruntime-gpu without cuDNN."""

    attempts: list = []

    def __init__(self, path, sess_options=None, providers=None, **kwargs):
        BrokenGpuSession.attempts.append(list(providers or []))
        names = provider_names(providers)
        if names and names[0] in (TRT, CUDA):
            raise RuntimeError(f"{names[0]}: libcudnn.so.9: cannot open shared object file")
        super().__init__(path, sess_options=sess_options, providers=[n for n in names if n == CPU] or None)


def says(message, *facts):
    """``message`` names each of ``facts``, in this order (what it says, not its wording)."""
    at = 0
    for fact in facts:
        at = message.find(fact, at)
        if at < 0:
            return False
        at += len(fact)
    return True


def messages(caplog, level):
    return [r.getMessage() for r in caplog.records if r.levelno == level]


# ----------------------------------------------------------------------------- the chain


def test_parse_providers_aliases_strings_and_options():
    assert providers.parse_providers(None) is None
    assert providers.parse_providers("tensorrt, trt,cuda,CPU") == [
        (trt_engine.ENGINE_PROVIDER, {}),
        (TRT, {}),
        (CUDA, {}),
        (CPU, {}),
    ]
    assert providers.parse_providers([(CUDA, {"device_id": "1"}), "cpu"]) == [(CUDA, {"device_id": "1"}), (CPU, {})]
    with pytest.raises(SpiritLMEdgeError, match="empty"):
        providers.parse_providers(" , ")


def test_default_chain_follows_what_the_machine_offers(monkeypatch):
    offer(monkeypatch, "AzureExecutionProvider", CPU)
    assert providers.default_providers() == [CPU]
    offer(monkeypatch, CPU, CUDA, TRT)
    assert providers.default_providers() == [TRT, CUDA, CPU]
    monkeypatch.setattr(providers, "tensorrt_engine_available", lambda device_id=0: True)
    assert providers.default_providers() == [trt_engine.ENGINE_PROVIDER, TRT, CUDA, CPU]
    # CPU is always the last resort, even when a chain leaves it out.
    assert providers.provider_chain("cuda") == [(CUDA, {}), (CPU, {})]


def test_gpu_providers_that_fail_fall_back_to_cpu_with_the_reason(bundle, monkeypatch, caplog):
    offer(monkeypatch, TRT, CUDA, CPU)
    BrokenGpuSession.attempts = []
    monkeypatch.setattr(ort, "InferenceSession", BrokenGpuSession)
    caplog.set_level(logging.INFO, logger="spiritlm_edge")
    session = create_session(bundle / "double.onnx", n_threads=1)
    assert session.get_providers() == [CPU]
    audio = np.random.default_rng(0).standard_normal((1, 3000)).astype(np.float32)
    y, n = session.run(None, {"audio": audio})
    np.testing.assert_array_equal(y, 2 * audio)
    assert n.tolist() == [1, 3000]

    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 2
    # each warning: the model, the provider that failed, why, and what is tried next
    assert says(warnings[0], "double.onnx", TRT, "libcudnn.so.9", CUDA)
    assert says(warnings[1], "double.onnx", CUDA, "libcudnn.so.9", CPU)
    (runs_on,) = [m for m in messages(caplog, logging.INFO) if "runs on" in m]  # one line per model
    assert says(runs_on, "double.onnx", CPU, TRT, CUDA)

    # The TensorRT EP was given explicit profiles from bundle.json and a cache in the bundle.
    trt_attempt = next(a for a in BrokenGpuSession.attempts if provider_names(a)[:1] == [TRT])
    trt_options = dict(trt_attempt)[TRT]
    assert trt_options["trt_profile_min_shapes"] == "audio:1x1280"
    assert trt_options["trt_profile_opt_shapes"] == "audio:1x8000"
    assert trt_options["trt_profile_max_shapes"] == "audio:1x16000"
    assert trt_options["trt_fp16_enable"] == "1"
    assert trt_options["trt_engine_cache_path"] == str(bundle / "tensorrt" / "ort-cache")
    assert dict(trt_attempt)[CUDA]["cudnn_conv_algo_search"] == "HEURISTIC"
    # cached: a second call neither reopens nor logs
    caplog.clear()
    assert create_session(bundle / "double.onnx", n_threads=1) is session
    assert not caplog.records


def test_onnxruntime_own_fallback_is_detected_and_its_error_reported(bundle, monkeypatch, caplog):
    created = []

    class SelfFallbackSession(REAL_SESSION):
        # what onnxruntime-gpu does when the CUDA EP cannot start: print, retry on CPU
        def __init__(self, path, sess_options=None, providers=None, **kwargs):
            created.append(provider_names(providers))
            if provider_names(providers)[0] == CUDA:
                print("*************** EP Error ***************")
                print(f"EP Error CUDA failure 100: no CUDA-capable device is detected when using {providers}")
                print("Falling back to ['CPUExecutionProvider'] and retrying.")
            super().__init__(path, sess_options=sess_options, providers=[CPU])

    offer(monkeypatch, CUDA, CPU)
    monkeypatch.setattr(ort, "InferenceSession", SelfFallbackSession)
    caplog.set_level(logging.INFO, logger="spiritlm_edge")
    session = create_session(bundle / "double.onnx", n_threads=1)
    assert session.get_providers() == [CPU]
    assert created == [[CUDA, CPU]]  # ORT's CPU session was kept, not made twice
    (warning,) = messages(caplog, logging.WARNING)
    assert says(warning, CUDA, "no CUDA-capable device is detected", CPU)


def test_asked_for_provider_that_is_missing_warns_and_runs_on_cpu(bundle, caplog):
    caplog.set_level(logging.INFO, logger="spiritlm_edge")
    session = create_session(bundle / "double.onnx", providers="cuda", n_threads=1)
    assert session.get_providers() == [CPU]
    (warning,) = messages(caplog, logging.WARNING)
    assert says(warning, CUDA, "onnxruntime-gpu")  # what is missing and what to install


def test_default_chain_on_this_cpu_machine_logs_one_line(bundle, caplog):
    caplog.set_level(logging.INFO, logger="spiritlm_edge")
    create_session(bundle / "double.onnx", n_threads=2)
    (runs_on,) = [m for m in messages(caplog, logging.INFO) if "runs on" in m]
    assert says(runs_on, "double.onnx", CPU, "2")
    assert not messages(caplog, logging.WARNING)


def test_a_broken_model_is_a_bundle_error(tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(BundleError, match="broken.onnx"):
        create_session(tmp_path / "broken.onnx")


# ----------------------------------------------------------------------------- profiles


def test_profile_from_min_max_samples_and_built_in_opt():
    entry = {"inputs": [{"name": "audio", "shape": [1, "samples"]}], "min_samples": 1280, "max_samples": 1600000}
    assert trt_engine.profile_shapes(entry, {"audio": [1, "samples"]}) == {
        "audio": {"min": [1, 1280], "opt": [1, 160000], "max": [1, 1600000]}
    }
    # no keys at all: the runtime's own limits (MIN_SAMPLES .. the GPU maximum, 30 s)
    assert trt_engine.profile_shapes({}, {"audio": ["batch", "samples"]}) == {
        "audio": {"min": [1, 1280], "opt": [1, 160000], "max": [1, limits.GPU_MAX_SAMPLES]}
    }
    assert limits.GPU_MAX_SAMPLES == 30 * 16000


def test_explicit_dynamic_axes_win_and_are_checked():
    entry = {"min_samples": 1280, "dynamic_axes": {"audio": {"1": [1280, 16000, 32000]}}}
    assert trt_engine.profile_shapes(entry, {"audio": [1, "samples"]})["audio"]["max"] == [1, 32000]
    with pytest.raises(BundleError, match=r"min <= opt <= max"):
        trt_engine.profile_shapes({"dynamic_axes": {"audio": {"1": [9, 5, 7]}}}, {"audio": [1, "samples"]})
    with pytest.raises(BundleError, match=r"'hubert': input 'x' axis 0 .*\"dynamic_axes\""):
        trt_engine.profile_shapes({}, {"x": ["mystery"]}, "hubert")
    # a dimension the runtime does not know, given by min_/opt_/max_<name>
    entry = {"min_tokens": 1, "opt_tokens": 64, "max_tokens": 512}
    assert trt_engine.profile_shapes(entry, {"x": [1, "tokens"]}) == {
        "x": {"min": [1, 1], "opt": [1, 64], "max": [1, 512]}
    }


def test_frame_profiles_of_vocoder_duration_and_pitch_entries():
    vocoder = {"hop_length": 640, "context_frames": {"left": 14, "right": 20}}
    profile = trt_engine.profile_shapes(vocoder, {"units": ["frames"], "speaker": [1]})
    # the vocoder's windows (30 s of 25 Hz frames) and their context fit the generator's profile
    assert profile["units"]["max"] == [limits.MAX_WINDOW_FRAMES + 34] and profile["speaker"]["min"] == [1]
    assert limits.MAX_WINDOW_FRAMES == limits.GPU_MAX_SAMPLES // 640
    assert trt_engine.profile_shapes({"context_units": {"left": 2, "right": 2}}, {"units": ["frames"]})["units"][
        "min"
    ] == [1]
    pitch = {"frame_hop": 80, "frames_per_code": 16}
    features = trt_engine.profile_shapes(pitch, {"features": ["batch", 2, "frames"]})["features"]
    assert features == {"min": [1, 2, 17], "opt": [1, 2, 2001], "max": [1, 2, 6001]}


@pytest.mark.slow
def test_every_exported_speech_engine_gets_a_profile(tiny_expressive_checkpoints, tmp_path):
    """The exporters' real bundle.json entries and dimension names are all covered."""
    export_speech(tiny_expressive_checkpoints, "expressive", tmp_path)
    bundle = Bundle(tmp_path)
    names = onnx_components(bundle)
    assert {"hubert", "fcpe", "pitch", "style", "vocoder"} <= set(names)
    for name in names:
        shapes, _, _ = trt_engine.onnx_io(bundle.path(name))
        profile = trt_engine.profile_shapes(bundle.component(name), shapes, name)
        assert set(profile) == set(shapes)
        for bounds in profile.values():
            assert all(0 < a <= b <= c for a, b, c in zip(bounds["min"], bounds["opt"], bounds["max"], strict=True))


def test_tensorrt_provider_options_carry_the_profile(tmp_path):
    profile = {
        "audio": {"min": [1, 1280], "opt": [1, 8000], "max": [1, 16000]},
        "speaker": {"min": [1], "opt": [1], "max": [1]},
    }
    options = providers.tensorrt_provider_options(tmp_path, fp16=False, profile=profile, workspace_bytes=2**30)
    assert options["trt_profile_max_shapes"] == "audio:1x16000,speaker:1"
    assert options["trt_fp16_enable"] == "0" and options["trt_max_workspace_size"] == str(2**30)
    assert options["trt_timing_cache_enable"] == "1"
    assert providers.cuda_provider_options(gpu_mem_limit=2**30)["gpu_mem_limit"] == str(2**30)
    with pytest.raises(SpiritLMEdgeError, match="HEURISTIC"):
        providers.cuda_provider_options(conv_algo_search="FAST")


# ----------------------------------------------------------------------------- fake GPU + TensorRT


class FakeCuda:
    """The CUDA driver calls of the runner, on host bytearrays."""

    memory: dict[int, bytearray] = {}
    _next = [1 << 20]

    def __init__(self, device_id=0, lib=None):
        self.stream = ctypes.c_void_p(0x5EED)

    def name(self):
        return "Fake GPU"

    def compute_capability(self):
        return "8.9"

    def activate(self):
        pass

    def alloc(self, nbytes):
        pointer = FakeCuda._next[0]
        FakeCuda._next[0] += max(nbytes, 256) + 4096
        FakeCuda.memory[pointer] = bytearray(max(nbytes, 256))
        return pointer

    def free(self, pointer):
        FakeCuda.memory.pop(pointer, None)

    def to_device(self, pointer, array):
        FakeCuda.memory[pointer][: array.nbytes] = array.tobytes()

    def to_host(self, array, pointer):
        array.reshape(-1).view(np.uint8)[:] = np.frombuffer(bytes(FakeCuda.memory[pointer][: array.nbytes]), np.uint8)

    def synchronize(self):
        pass


def make_fake_tensorrt(version="10.3.0"):
    """A ``tensorrt`` module with the Python API of ``version``'s major (8, 10 or 11), whose
    builder serializes what it was asked for as JSON and whose engine computes the test model
    (y = 2 * audio on the device; n = shape as int32, like TensorRT 8, in host memory, where
    TensorRT keeps tensors computed from shapes only)."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = version
    trt.builds = []

    class Severity:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class ILogger:
        pass

    ILogger.Severity = Severity
    ILogger.WARNING = Severity.WARNING

    class Logger(ILogger):
        def __init__(self, level=Severity.WARNING):
            self.level = level

    trt.ILogger, trt.Logger = ILogger, Logger
    if major < 10:
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
        trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8", TF32="TF32")
    elif major == 10:  # EXPLICIT_BATCH deprecated (ignored); weak typing still there
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
        trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8", BF16="BF16", TF32="TF32")
    else:  # 11: strongly typed only; the precision flags are removed, TF32 stays
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", REFIT="REFIT")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.TensorLocation = types.SimpleNamespace(DEVICE="DEVICE", HOST="HOST")
    trt.nptype = lambda dtype: {"f32": np.float32, "i32": np.int32}[dtype]

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self, flags):
            self.inputs = []
            self.explicit_batch = major >= 10 or bool(flags & 1)

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class Parser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path):
            if not self.network.explicit_batch:  # TensorRT 8's ONNX parser refuses implicit-batch networks
                self.num_errors = 1
                return False
            shapes, _, _ = trt_engine.onnx_io(path)
            self.network.inputs = [Tensor(n, [d if isinstance(d, int) else -1 for d in s]) for n, s in shapes.items()]
            model = onnx.load(path)
            self.network.fp16_weights = any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
            self.network.io_types = {
                v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]
            }
            return True

        def get_error(self, i):
            return types.SimpleNamespace(desc=lambda: "the network must be explicit-batch")

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+"

    class Config:
        def __init__(self):
            self.flags = {"TF32"}
            self.cache = None
            self.profiles = []

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def set_memory_pool_limit(self, pool, size):
            self.workspace = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Profile(dict):
        def set_shape(self, name, low, opt, high):
            self[name] = [list(low), list(opt), list(high)]

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            trt.builds.append(
                {
                    "flags": sorted(config.flags),
                    "timing_cache": config.cache.data,
                    "fp16_weights": network.fp16_weights,
                    "io_types": network.io_types,
                }
            )
            return json.dumps({"profile": config.profiles[0], "version": trt.__version__}).encode()

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)

        def get_tensor_shape(self, name):
            return {"y": self.shapes["audio"], "n": (2,)}[name]

        def set_tensor_address(self, name, pointer):
            self.addresses[name] = pointer

        def execute_async_v3(self, stream):
            if getattr(trt, "fail_runs", False):
                return False
            if self.addresses["n"] in FakeCuda.memory:  # a host tensor bound to device memory
                return False
            shape = self.shapes["audio"]
            count = int(np.prod(shape))
            audio = np.frombuffer(bytes(FakeCuda.memory[self.addresses["audio"]][: 4 * count]), np.float32)
            FakeCuda.memory[self.addresses["y"]][: 4 * count] = (2 * audio).tobytes()
            n = np.array(shape, np.int32)
            ctypes.memmove(self.addresses["n"], n.ctypes.data, n.nbytes)
            trt.runs = getattr(trt, "runs", 0) + 1
            return True

    class Engine:
        names = ["audio", "y", "n"]
        num_io_tensors = 3

        def __init__(self, data):
            self.profile = data["profile"]

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return "INPUT" if name == "audio" else "OUTPUT"

        def get_tensor_dtype(self, name):
            return "i32" if name == "n" else "f32"

        def get_tensor_shape(self, name):
            return [2] if name == "n" else [1, -1]

        def get_tensor_location(self, name):
            return "HOST" if name == "n" else "DEVICE"

        def get_tensor_profile_shape(self, name, index):
            return self.profile[name]

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            data = json.loads(bytes(data))
            return Engine(data) if data["version"] == trt.__version__ else None

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, Parser, Runtime
    return trt


@pytest.fixture
def fake_gpu(monkeypatch):
    trt = make_fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_engine, "CudaDriver", FakeCuda)
    trt_engine.cuda_device_info.cache_clear()
    return trt


def use_tensorrt(monkeypatch, version):
    trt = make_fake_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def edit_record(bundle, **changes):
    path = bundle / "tensorrt" / "engines.json"
    data = json.loads(path.read_text())
    data["engines"]["double"].update(changes)
    path.write_text(json.dumps(data))


def test_build_records_what_the_engine_is_for_and_skips_fresh_ones(bundle, fake_gpu, caplog):
    caplog.set_level(logging.INFO, logger="spiritlm_edge")
    records = build_tensorrt_engines(bundle)
    record = records["double"]
    assert record["file"] == "tensorrt/double.fp16.engine"
    assert (record["gpu"], record["compute_capability"], record["tensorrt"], record["precision"]) == (
        "Fake GPU",
        "8.9",
        "10.3.0",
        "fp16",
    )
    assert record["profile"] == {"audio": {"min": [1, 1280], "opt": [1, 8000], "max": [1, 16000]}}
    assert record["inputs"] == {"audio": "float32"} and record["outputs"] == {"y": "float32", "n": "int64"}
    assert record["onnx_sha256"] == json.loads((bundle / "bundle.json").read_text())["components"]["double"]["sha256"]
    assert trt_engine.read_engine_records(bundle) == records
    (build,) = fake_gpu.builds
    assert "FP16" in build["flags"] and build["timing_cache"] == b""
    engine = json.loads((bundle / record["file"]).read_bytes())
    assert engine["profile"] == {"audio": [[1, 1280], [1, 8000], [1, 16000]]}
    cache = bundle / "tensorrt" / "timing-Fake-GPU-sm8-9-trt10-3-0.cache"
    assert cache.read_bytes() == b"+"

    build_tensorrt_engines(bundle)
    assert len(fake_gpu.builds) == 1  # up to date: kept

    edit_record(bundle, gpu="NVIDIA Jetson Orin Nano", compute_capability="8.7")
    caplog.clear()
    build_tensorrt_engines(bundle)
    assert len(fake_gpu.builds) == 2 and fake_gpu.builds[1]["timing_cache"] == b"+"  # the cache was reused
    assert any("Jetson Orin Nano" in m for m in messages(caplog, logging.INFO))  # the reason is said
    assert trt_engine.read_engine_records(bundle)["double"]["gpu"] == "Fake GPU"

    records = build_tensorrt_engines(bundle, precision="fp32")
    assert records["double"]["file"] == "tensorrt/double.fp32.engine"
    assert "FP16" not in fake_gpu.builds[-1]["flags"] and "TF32" not in fake_gpu.builds[-1]["flags"]
    assert not (bundle / "tensorrt" / "double.fp16.engine").exists()


@pytest.mark.parametrize("version", ["8.6.1", "10.3.0", "11.4.0"])
def test_each_tensorrt_major_builds_fp16_its_own_way_and_the_engine_runs(bundle, fake_gpu, monkeypatch, version):
    """8.6 (JetPack 6.0) and 10: the FP16 builder flag on the fp32 graph; 11 (no such flag):
    a strongly typed build from an fp16 copy of the graph whose inputs and outputs stay fp32."""
    trt = use_tensorrt(monkeypatch, version)
    record = build_tensorrt_engines(bundle)["double"]
    (build,) = trt.builds
    fp32 = TensorProto.FLOAT
    if version.startswith("11"):
        assert build["flags"] == ["TF32"] and build["fp16_weights"]
    else:
        assert "FP16" in build["flags"] and not build["fp16_weights"]
    assert build["io_types"] == {"audio": fp32, "y": fp32, "n": TensorProto.INT64}
    assert not [p for p in (bundle / "tensorrt").iterdir() if p.suffix == ".onnx" or p.is_dir()]  # no leftovers
    assert record["tensorrt"] == version

    session = create_session(bundle / "double.onnx", n_threads=1)
    audio = np.random.default_rng(3).standard_normal((1, 2000)).astype(np.float32)
    y, n = session.run(None, {"audio": audio})
    np.testing.assert_array_equal(y, 2 * audio)
    assert n.dtype == np.int64 and n.tolist() == [1, 2000]

    trt.builds.clear()
    build_tensorrt_engines(bundle, precision="fp32", force=True)
    assert "FP16" not in trt.builds[0]["flags"] and "TF32" not in trt.builds[0]["flags"]
    assert not trt.builds[0]["fp16_weights"]


def test_without_onnx_tensorrt_10_builds_and_11_says_what_to_install(bundle, fake_gpu, monkeypatch):
    """A Jetson's install has no onnx: TensorRT 8.6 / 10 do not need it; 11's fp16 build
    (from an fp16 copy of the graph) says to install it, or to build fp32."""
    monkeypatch.setitem(sys.modules, "spiritlm_edge.quant.onnx_int8", None)  # an import of it fails
    assert build_tensorrt_engines(bundle)["double"]["precision"] == "fp16"
    use_tensorrt(monkeypatch, "11.4.0")
    with pytest.raises(SpiritLMEdgeError, match="pip install onnx"):
        build_tensorrt_engines(bundle, force=True)
    assert build_tensorrt_engines(bundle, precision="fp32")["double"]["tensorrt"] == "11.4.0"


def test_a_tensorrt_api_problem_is_a_one_line_cli_error(bundle, fake_gpu, monkeypatch, capsys):
    """A TensorRT whose Python API lacks a name we use (here: a builder without
    build_serialized_network) ends the CLI with our one-line error, not a traceback."""
    trt = use_tensorrt(monkeypatch, "10.3.0")
    del trt.Builder.build_serialized_network
    monkeypatch.setattr("sys.argv", ["spiritlm-edge", "export", "tensorrt", "--bundle", str(bundle)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "10.3.0" in err and "build_serialized_network" in err

    use_tensorrt(monkeypatch, "7.2.3")
    with pytest.raises(SpiritLMEdgeError, match="7.2.3"):
        build_tensorrt_engines(bundle)


def test_build_errors_say_what_to_do(bundle, monkeypatch, fake_gpu):
    with pytest.raises(SpiritLMEdgeError, match="precision"):
        build_tensorrt_engines(bundle, precision="int8")
    with pytest.raises(BundleError, match="vocoder"):
        build_tensorrt_engines(bundle, components=["vocoder"])
    monkeypatch.setattr(
        trt_engine, "CudaDriver", lambda *a, **k: (_ for _ in ()).throw(trt_engine.EngineUnavailable("no CUDA driver"))
    )
    trt_engine.cuda_device_info.cache_clear()
    with pytest.raises(SpiritLMEdgeError, match="CUDA"):
        build_tensorrt_engines(bundle)
    monkeypatch.delitem(sys.modules, "tensorrt")
    monkeypatch.setattr(builtins, "__import__", _block("tensorrt"))
    with pytest.raises(SpiritLMEdgeError, match=r"spiritlm-edge\[gpu\]"):
        build_tensorrt_engines(bundle)


def _block(blocked):
    real_import = builtins.__import__

    def guarded(name, *args, **kwargs):
        if name == blocked:
            raise ImportError(f"No module named {blocked!r}")
        return real_import(name, *args, **kwargs)

    return guarded


def test_engine_runs_first_in_the_default_chain_and_matches_cpu(bundle, fake_gpu, caplog):
    build_tensorrt_engines(bundle)
    caplog.set_level(logging.INFO, logger="spiritlm_edge")
    session = create_session(bundle / "double.onnx", n_threads=1)
    assert session.get_providers() == [trt_engine.ENGINE_PROVIDER]
    (line,) = [m for m in messages(caplog, logging.INFO) if "runs on" in m]
    assert "tensorrt/double.fp16.engine" in line and "Fake GPU" in line
    assert [a.name for a in session.get_inputs()] == ["audio"]
    assert [(a.name, a.type) for a in session.get_outputs()] == [("y", "tensor(float)"), ("n", "tensor(int64)")]

    reference = REAL_SESSION(str(bundle / "double.onnx"), providers=[CPU])
    rng = np.random.default_rng(1)
    for samples in (1280, 5000, 3000):  # buffers grow and are reused
        audio = rng.standard_normal((1, samples)).astype(np.float32)
        got, expected = session.run(None, {"audio": audio}), reference.run(None, {"audio": audio})
        np.testing.assert_array_equal(got[0], expected[0])
        assert got[1].dtype == np.int64 and got[1].tolist() == expected[1].tolist()  # int32 engine output cast back
    assert session.run(["n"], {"audio": audio})[0].tolist() == [1, 3000]
    assert fake_gpu.runs == 4

    # Outside the profile: the next provider runs it, with one warning.
    caplog.clear()
    for _ in range(2):
        long = rng.standard_normal((1, 20000)).astype(np.float32)
        np.testing.assert_array_equal(session.run(None, {"audio": long})[0], 2 * long)
    assert fake_gpu.runs == 4
    (warning,) = messages(caplog, logging.WARNING)
    assert "[1, 20000]" in warning and warning.endswith(CPU)


def test_an_engine_that_fails_to_run_hands_over_to_the_next_provider(bundle, fake_gpu, caplog):
    build_tensorrt_engines(bundle)
    session = create_session(bundle / "double.onnx", n_threads=1)
    fake_gpu.fail_runs = True
    caplog.set_level(logging.WARNING, logger="spiritlm_edge")
    audio = np.ones((1, 2000), np.float32)
    np.testing.assert_array_equal(session.run(["y"], {"audio": audio})[0], 2 * audio)
    (warning,) = messages(caplog, logging.WARNING)
    assert warning.endswith(CPU)


def test_an_engine_whose_tensorrt_api_moved_hands_over_for_good(bundle, fake_gpu, caplog):
    """A TensorRT whose execution context lacks a method we call: the run still answers,
    on the next provider, and so do later ones, with one warning naming the problem."""
    build_tensorrt_engines(bundle)
    session = create_session(bundle / "double.onnx", n_threads=1)
    del type(session.context).execute_async_v3  # the fake module is this test's own
    caplog.set_level(logging.WARNING, logger="spiritlm_edge")
    audio = np.ones((1, 2000), np.float32)
    for _ in range(2):
        np.testing.assert_array_equal(session.run(["y"], {"audio": audio})[0], 2 * audio)
    (warning,) = messages(caplog, logging.WARNING)
    assert says(warning, "double", "execute_async_v3", CPU)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"gpu": "NVIDIA GeForce RTX 3060", "compute_capability": "8.6"}, "RTX 3060"),
        ({"tensorrt": "8.6.2"}, "8.6.2"),
        ({"onnx_sha256": "0" * 64}, "double.onnx"),
        ({"bytes": 1}, "tensorrt/double.fp16.engine"),
    ],
)
def test_a_stale_engine_is_never_loaded_the_chain_falls_back_and_says_why(bundle, fake_gpu, caplog, change, reason):
    build_tensorrt_engines(bundle)
    edit_record(bundle, **change)
    caplog.set_level(logging.INFO, logger="spiritlm_edge")
    session = create_session(bundle / "double.onnx", n_threads=1)
    assert session.get_providers() == [CPU]
    assert not hasattr(fake_gpu, "runs")
    (warning,) = messages(caplog, logging.WARNING)
    assert reason in warning and f"spiritlm-edge export tensorrt --bundle {bundle}" in warning


def test_engine_mismatch_lists_every_reason():
    record = {"gpu": "A", "compute_capability": "8.6", "tensorrt": "10.0.1", "onnx": "m.onnx", "onnx_sha256": "x"}
    assert trt_engine.engine_mismatch(record, trt_engine.DeviceInfo("A", "8.6"), "10.0.1", "x") is None
    why = trt_engine.engine_mismatch(record, None, None, "y")
    assert len(why.split("; ")) == 3 and "m.onnx" in why


def test_no_engine_built_is_a_quiet_note(bundle, fake_gpu, caplog):
    caplog.set_level(logging.INFO, logger="spiritlm_edge")
    session = create_session(bundle / "double.onnx", n_threads=1)
    assert session.get_providers() == [CPU]
    assert not messages(caplog, logging.WARNING)
    (line,) = [m for m in messages(caplog, logging.INFO) if "runs on" in m]
    assert "spiritlm-edge export tensorrt --bundle" in line


def test_cli_export_tensorrt(bundle, fake_gpu):
    result = CliRunner().invoke(app, ["export", "tensorrt", "--bundle", str(bundle), "--fp32"])
    assert result.exit_code == 0, result.output
    assert "tensorrt/double.fp32.engine" in result.output and "10.3.0" in result.output


def test_cuda_device_info_is_none_without_a_driver(monkeypatch):
    monkeypatch.setattr(trt_engine, "_load_libcuda", lambda: None)
    assert trt_engine.cuda_device_info() is None
    assert not providers.tensorrt_engine_available()


# ----------------------------------------------------------------------------- the TensorRT EP


class FakeTensorrtEP(REAL_SESSION):
    """ONNX Runtime with a TensorRT EP that starts (it builds its engine lazily, on the first
    run) and a CUDA EP, both computed on the CPU; ``build_fails`` makes that first run fail like an engine build
    out of GPU memory. Records what it was given and the order of events."""

    events: list = []
    build_fails = False

    def __init__(self, path, sess_options=None, providers=None, **kwargs):
        names = provider_names(providers)
        self.first = names[0]
        self.on_trt = names[0] == TRT
        self.options = dict(p for p in providers if isinstance(p, tuple))
        FakeTensorrtEP.events.append(("session", names[0]))
        super().__init__(path, sess_options=sess_options, providers=[CPU])

    def get_providers(self):  # the CUDA EP starts too
        return [self.first, CPU] if self.first in (TRT, CUDA) else super().get_providers()

    def run(self, output_names, feeds, run_options=None):
        if self.on_trt:
            FakeTensorrtEP.events.append(("run", TRT))
            if FakeTensorrtEP.build_fails:
                raise RuntimeError(
                    "[TensorrtExecutionProvider] TensorRT EP failed to create engine from network: out of memory"
                )
        return super().run(output_names, feeds, run_options)


@pytest.fixture
def trt_ep(monkeypatch):
    offer(monkeypatch, TRT, CUDA, CPU)
    FakeTensorrtEP.events, FakeTensorrtEP.build_fails = [], False
    monkeypatch.setattr(ort, "InferenceSession", FakeTensorrtEP)
    # `import tensorrt` loads pip's libnvinfer into the process: recorded among the events
    monkeypatch.setattr(providers, "import_tensorrt", lambda: FakeTensorrtEP.events.append(("import tensorrt",)))
    return FakeTensorrtEP


def test_tensorrt_is_imported_before_the_tensorrt_ep_opens(bundle, trt_ep):
    session = create_session(bundle / "double.onnx", providers="trt", n_threads=1)
    assert session.get_providers()[0] == TRT
    # libnvinfer is in the process before the EP starts
    assert trt_ep.events.index(("import tensorrt",)) < trt_ep.events.index(("session", TRT))


def test_tensorrt_ep_runs_what_fits_and_hands_longer_inputs_to_the_next_provider(bundle, trt_ep, caplog):
    caplog.set_level(logging.WARNING, logger="spiritlm_edge")
    session = create_session(bundle / "double.onnx", n_threads=1)
    assert session.get_providers()[0] == TRT
    short = np.ones((1, 4000), np.float32)
    np.testing.assert_array_equal(session.run(["y"], {"audio": short})[0], 2 * short)
    long = np.ones((1, 20000), np.float32)  # the profile (bundle.json) stops at 16000
    np.testing.assert_array_equal(session.run(["y"], {"audio": long})[0], 2 * long)
    assert trt_ep.events.count(("run", TRT)) == 1
    sessions = [e[1] for e in trt_ep.events if e[0] == "session"]
    assert sessions[sessions.index(TRT) + 1] == CUDA  # the next provider of the chain, not the TensorRT EP again
    (warning,) = messages(caplog, logging.WARNING)
    assert "[1, 20000]" in warning


def test_a_failed_lazy_engine_build_falls_back_for_good_with_the_reason(bundle, trt_ep, caplog):
    trt_ep.build_fails = True
    caplog.set_level(logging.WARNING, logger="spiritlm_edge")
    session = create_session(bundle / "double.onnx", n_threads=1)
    audio = np.ones((1, 4000), np.float32)
    for _ in range(3):
        np.testing.assert_array_equal(session.run(["y"], {"audio": audio})[0], 2 * audio)
    assert trt_ep.events.count(("run", TRT)) == 1  # not retried on every turn
    assert session.get_providers()[0] == CUDA
    (warning,) = messages(caplog, logging.WARNING)
    assert "out of memory" in warning and CUDA in warning


def test_the_tensorrt_ep_profile_reads_the_model_once(bundle, trt_ep, monkeypatch):
    reads = []
    real_onnx_io = providers.onnx_io
    monkeypatch.setattr(providers, "onnx_io", lambda path: reads.append(path) or real_onnx_io(path))
    options = providers.default_provider_options(TRT, bundle / "double.onnx")
    assert options["trt_profile_max_shapes"] == "audio:1x16000"
    assert providers.default_provider_options(TRT, bundle / "double.onnx") == options
    assert len(reads) == 1
    write_model(bundle / "double.onnx", opset=18)  # a re-exported model (new sha256) is read again
    add_component(bundle, "double", {**Bundle(bundle).component("double"), "opset": 18}, variant="base")
    providers.default_provider_options(TRT, bundle / "double.onnx")
    assert len(reads) == 2


# ----------------------------------------------------------------------------- the LM


def test_lm_gpu_settings(monkeypatch):
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)
    assert not providers.llama_gpu_available()
    assert providers.default_n_gpu_layers() == 0
    assert providers.lm_gpu_settings() == {
        "n_gpu_layers": 0,
        "type_k": llama_cpp.GGML_TYPE_F16,
        "type_v": llama_cpp.GGML_TYPE_F16,
        "flash_attn_type": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    }
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    assert providers.default_n_gpu_layers() == providers.ALL_LAYERS
    settings = providers.lm_gpu_settings(kv_cache="q8_0", flash_attn=True)
    assert settings == {
        "n_gpu_layers": providers.ALL_LAYERS,
        "type_k": llama_cpp.GGML_TYPE_Q8_0,
        "type_v": llama_cpp.GGML_TYPE_Q8_0,
        "flash_attn_type": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    }
    assert providers.lm_gpu_settings(n_gpu_layers=-1)["n_gpu_layers"] == providers.ALL_LAYERS
    assert providers.lm_gpu_settings(n_gpu_layers=12, flash_attn=False)["flash_attn_type"] == (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    assert providers.lm_gpu_settings(kv_cache="Q4_0")["type_v"] == llama_cpp.GGML_TYPE_Q4_0
    with pytest.raises(ModelError):
        providers.lm_gpu_settings(kv_cache="q4_0", flash_attn=False)  # a quantized V cache needs flash attention
    with pytest.raises(ModelError, match="q3"):
        providers.kv_cache_type("q3")


# Lines llama.cpp logs when offloading fails for lack of GPU memory (ggml-cuda, ggml-alloc, llama-model).
WEIGHTS_OOM = [
    "load_tensors: offloading 32 repeating layers to GPU\n",
    "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 3648.00 MiB on device 0: "
    "cudaMalloc failed: out of memory\n",
    "alloc_tensor_range: failed to allocate CUDA0 buffer of size 3825205248\n",
    "llama_model_load: error loading model: unable to allocate CUDA0 buffer\n",
]
CONTEXT_OOM = [
    "ggml_gallocr_reserve_n: failed to allocate CUDA0 buffer of size 150995968\n",
    "llama_init_from_model: failed to allocate compute buffers\n",
]


def test_lm_gpu_memory_errors_say_how_much_and_what_to_try():
    error = providers.lm_gpu_memory_error(WEIGHTS_OOM, "loading the weights", providers.ALL_LAYERS)
    assert isinstance(error, ModelError)
    assert "3648 MiB" in str(error) and "device 0" in str(error)
    assert all(flag in str(error) for flag in ("--n-gpu-layers", "--kv-cache q8_0", "--n-ctx"))
    assert "144 MiB" in str(providers.lm_gpu_memory_error(CONTEXT_OOM, "creating its context", 20))
    # a CPU allocation failure or a foreign file is not a GPU memory problem
    assert providers.lm_gpu_memory_error(["failed to allocate CPU buffer of size 437944320\n"], "x", 0) is None
    assert providers.lm_gpu_memory_error(["llama_model_load: error loading model: bad magic\n"], "x", 0) is None


@pytest.mark.parametrize("stage", ["weights", "context"])
def test_language_model_reports_gpu_memory_not_a_bad_file(tiny_base_bundle, monkeypatch, stage):
    """Our LanguageModel, with llama.cpp's load (or context creation) failing the way it does
    on a GPU without room: the error is about memory, not "rebuild the GGUF"."""

    def failing(lines):
        def call(*args):
            for listener in list(llama_log._listeners):
                for line in lines:
                    listener(line)
            return None

        return call

    name = "llama_model_load_from_file" if stage == "weights" else "llama_init_from_model"
    monkeypatch.setattr(llama_cpp, name, failing(WEIGHTS_OOM if stage == "weights" else CONTEXT_OOM))
    with pytest.raises(ModelError, match="ran out of memory") as info:
        lm_module.LanguageModel.from_bundle(tiny_base_bundle, n_gpu_layers=-1)
    assert "GGUF" not in str(info.value)
