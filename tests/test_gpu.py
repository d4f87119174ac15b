"""GPU engines on a real NVIDIA GPU: TensorRT fp16 against CPU fp32, rebuild of stale
engines, the default provider chain, I/O binding on CUDA, and the LM offloaded by llama.cpp.

Every test is marked ``gpu``: tests/conftest.py skips them, saying so, where ONNX Runtime
has no CUDAExecutionProvider. Those that also need the ``tensorrt`` module or a CUDA
build of llama-cpp-python skip with that reason when it is missing.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from spiritlm_edge.runtime import providers, trt_engine
from spiritlm_edge.runtime.onnx_session import clear_session_cache, create_session

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def fresh_sessions():
    clear_session_cache()
    yield
    clear_session_cache()


@pytest.fixture(scope="module")
def gpu_bundle(tiny_expressive_checkpoints, tmp_path_factory):
    """The tiny Expressive speech engines, exported to ONNX."""
    from spiritlm_edge.export.speech import export_speech

    out = tmp_path_factory.mktemp("gpu-bundle")
    export_speech(tiny_expressive_checkpoints, "expressive", out)
    return out


def needs_tensorrt():
    pytest.importorskip("tensorrt", reason="needs the tensorrt module (pip install 'spiritlm-edge[gpu]')")
    if trt_engine.cuda_device_info() is None:
        pytest.skip("the CUDA driver reports no GPU")


@pytest.fixture(scope="module")
def engines(gpu_bundle):
    """fp16 engines for every speech component, built once."""
    needs_tensorrt()
    from spiritlm_edge.export.tensorrt import build_tensorrt_engines

    return build_tensorrt_engines(gpu_bundle, precision="fp16")


def test_hubert_units_fp16_engine_vs_cpu(gpu_bundle, engines, librispeech_clip):
    from spiritlm_edge.runtime.audio import load_audio

    samples = load_audio(librispeech_clip)[None]
    path = gpu_bundle / "hubert.onnx"
    engine = create_session(path, providers="tensorrt")
    assert engine.get_providers() == [trt_engine.ENGINE_PROVIDER]
    cpu = create_session(path, providers="cpu")
    units = engine.run(["units"], {"audio": samples})[0]
    expected = cpu.run(["units"], {"audio": samples})[0]
    assert units.shape == expected.shape and units.dtype == np.int64
    assert (units == expected).mean() >= 0.98


def test_style_and_pitch_codes_fp16_engine_vs_cpu(gpu_bundle, engines, librispeech_clip):
    from spiritlm_edge.runtime.audio import load_audio
    from spiritlm_edge.runtime.pitch import PitchEngine

    samples = load_audio(librispeech_clip)
    gpu_codes = PitchEngine.from_bundle(gpu_bundle, providers="tensorrt")(samples)
    cpu_codes = PitchEngine.from_bundle(gpu_bundle, providers="cpu")(samples)
    assert gpu_codes.shape == cpu_codes.shape
    assert (gpu_codes == cpu_codes).mean() >= 0.9
    styles_gpu = create_session(gpu_bundle / "style.onnx", providers="tensorrt").run(["styles"], {"audio": samples[None]})
    styles_cpu = create_session(gpu_bundle / "style.onnx", providers="cpu").run(["styles"], {"audio": samples[None]})
    assert (styles_gpu[0] == styles_cpu[0]).mean() >= 0.9


def test_vocoder_fp16_engine_vs_cpu(gpu_bundle, engines):
    from spiritlm_edge.runtime.vocoder import Vocoder

    gpu = Vocoder.from_bundle(gpu_bundle, providers="tensorrt")
    assert gpu._generator.get_providers() == [trt_engine.ENGINE_PROVIDER]
    cpu = Vocoder.from_bundle(gpu_bundle, providers="cpu")
    rng = np.random.default_rng(0)
    hubert = rng.integers(0, cpu.num_units, 200)
    pitch = rng.integers(0, max(cpu.num_pitch, 1), 200) if cpu.has_pitch else None
    style = rng.integers(0, max(cpu.num_style_codes, 1), 200) if cpu.has_style else None
    expected = cpu.decode(hubert, pitch=pitch, style=style, dur_pred=False)
    audio = gpu.decode(hubert, pitch=pitch, style=style, dur_pred=False)
    assert audio.shape == expected.shape
    assert np.linalg.norm(audio - expected) / np.linalg.norm(expected) <= 1e-2


def test_stale_engine_falls_back_then_is_rebuilt(gpu_bundle, engines, caplog):
    from spiritlm_edge.export.tensorrt import build_tensorrt_engines

    records_path = gpu_bundle / "tensorrt" / "engines.json"
    data = json.loads(records_path.read_text())
    real_gpu = data["engines"]["vocoder_duration"]["gpu"]
    data["engines"]["vocoder_duration"]["gpu"] = "Some Other GPU"
    records_path.write_text(json.dumps(data))

    caplog.set_level(logging.INFO, logger="spiritlm_edge")
    session = create_session(gpu_bundle / "vocoder_duration.onnx")
    assert session.get_providers()[0] != trt_engine.ENGINE_PROVIDER
    assert any("is stale: it was built for Some Other GPU" in m for m in caplog.messages)

    caplog.clear()
    record = build_tensorrt_engines(gpu_bundle, components=["vocoder_duration"])["vocoder_duration"]
    assert record["gpu"] == real_gpu
    assert any("rebuilding the TensorRT engine: it was built for Some Other GPU" in m for m in caplog.messages)
    clear_session_cache()
    assert create_session(gpu_bundle / "vocoder_duration.onnx").get_providers() == [trt_engine.ENGINE_PROVIDER]


def test_default_chain_puts_the_gpu_first(gpu_bundle, caplog):
    chain = providers.default_providers()
    assert providers.CUDA_EP in chain and chain[-1] == providers.CPU_EP
    caplog.set_level(logging.INFO, logger="spiritlm_edge")
    session = create_session(gpu_bundle / "vocoder_duration.onnx", providers="cuda")
    assert session.get_providers()[0] == providers.CUDA_EP
    assert any(m.startswith(f"vocoder_duration.onnx runs on {providers.CUDA_EP}") for m in caplog.messages)


def test_io_binding_keeps_outputs_on_the_gpu(gpu_bundle, librispeech_clip):
    from spiritlm_edge.runtime.audio import load_audio

    session = create_session(gpu_bundle / "hubert.onnx", providers="cuda")
    assert providers.session_device(session) == "cuda"
    samples = load_audio(librispeech_clip)[None]
    units, features = providers.run_with_io_binding(session, {"audio": samples}, ["units", "features"],
                                                    keep_on_device=True)
    assert features.device_name().lower() == "cuda"
    expected = session.run(["units"], {"audio": samples})[0]
    np.testing.assert_array_equal(units.numpy(), expected)


def test_lm_greedy_continuation_gpu_vs_cpu_at_f16(tiny_base_checkpoints, tmp_path):
    if not providers.llama_gpu_available():
        pytest.skip("llama-cpp-python was built without a GPU backend (see the README: CMAKE_ARGS=-DGGML_CUDA=on)")
    import llama_cpp

    from spiritlm_edge.export.build import export_lm

    gguf = export_lm(tiny_base_checkpoints, "base", tmp_path, quant="F16", progress=False)

    def greedy(n_gpu_layers: int) -> list[int]:
        llm = llama_cpp.Llama(str(gguf), n_gpu_layers=n_gpu_layers, n_ctx=128, logits_all=True,
                              seed=0, verbose=False)
        tokens = [1] + [100 + i for i in range(12)]
        llm.eval(tokens)
        out = []
        for _ in range(24):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(token)
            llm.eval([token])
        return out

    assert greedy(-1) == greedy(0)
