"""Our GPU code paths on a real NVIDIA GPU: ``pytest -m gpu``.

What runs on the GPU is our code, compared with the same code on the CPU, with tolerances
that measure something (fp16 and GPU kernels round differently, so nothing asks for bit
equality or equal greedy continuations of a random tiny model):

* TensorRT engines (``export tensorrt``) vs CPU fp32: HuBERT units, pitch / style codes,
  vocoder audio; a stale engine falls back, then is rebuilt;
* the TensorRT EP and the CUDA EP down the provider chain, inputs longer than the GPU
  maximum (30 s) handed to the next provider;
* our ``LanguageModel`` with every layer offloaded, flash attention on, f16 and q8_0 KV
  caches: logits close to the CPU's and the same top-k candidates;
* the streaming vocoder and a whole speech-to-speech turn (``SpiritLM.generate_stream``)
  on GPU providers.

Every test is marked ``gpu``: tests/conftest.py skips them, saying so, where ONNX Runtime
has no CUDAExecutionProvider. Those that also need the ``tensorrt`` module or a CUDA build
of llama-cpp-python skip with that reason when it is missing.
"""

from __future__ import annotations

import json
import logging

import llama_cpp
import numpy as np
import pytest

from spiritlm_edge import SpiritLM
from spiritlm_edge.export.speech import export_speech
from spiritlm_edge.export.tensorrt import build_tensorrt_engines
from spiritlm_edge.runtime import limits, providers, trt_engine
from spiritlm_edge.runtime.audio import load_audio
from spiritlm_edge.runtime.events import AudioChunk, TurnEnd
from spiritlm_edge.runtime.lm import LanguageModel
from spiritlm_edge.runtime.onnx_session import clear_session_cache, create_session
from spiritlm_edge.runtime.pitch import PitchEngine
from spiritlm_edge.runtime.speech import SpeechTokenizer
from spiritlm_edge.runtime.vocoder import Vocoder

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def fresh_sessions():
    clear_session_cache()
    yield
    clear_session_cache()


@pytest.fixture(scope="module")
def gpu_bundle(tiny_expressive_checkpoints, tmp_path_factory):
    """The tiny Expressive speech engines, exported to ONNX."""
    out = tmp_path_factory.mktemp("gpu-bundle")
    export_speech(tiny_expressive_checkpoints, "expressive", out)
    return out


def needs_tensorrt():
    if trt_engine.import_tensorrt() is None:
        pytest.skip("needs the tensorrt module (pip install 'spiritlm-edge[gpu]')")
    if trt_engine.cuda_device_info() is None:
        pytest.skip("the CUDA driver reports no GPU")


def needs_cuda_llama():
    if not providers.llama_gpu_available():
        pytest.skip("llama-cpp-python was built without a GPU backend (see the README: CMAKE_ARGS=-DGGML_CUDA=on)")


@pytest.fixture(scope="module")
def engines(gpu_bundle):
    """fp16 engines for every speech component, built once."""
    needs_tensorrt()
    return build_tensorrt_engines(gpu_bundle, precision="fp16")


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


# ----------------------------------------------------------------------------- TensorRT engines


def test_hubert_units_fp16_engine_vs_cpu(gpu_bundle, engines, librispeech_clip):
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
    samples = load_audio(librispeech_clip)
    gpu_codes = PitchEngine.from_bundle(gpu_bundle, providers="tensorrt")(samples)
    cpu_codes = PitchEngine.from_bundle(gpu_bundle, providers="cpu")(samples)
    assert gpu_codes.shape == cpu_codes.shape
    assert (gpu_codes == cpu_codes).mean() >= 0.9
    feeds = {"audio": samples[None]}
    styles_gpu = create_session(gpu_bundle / "style.onnx", providers="tensorrt").run(["styles"], feeds)
    styles_cpu = create_session(gpu_bundle / "style.onnx", providers="cpu").run(["styles"], feeds)
    assert (styles_gpu[0] == styles_cpu[0]).mean() >= 0.9


def test_vocoder_fp16_engine_vs_cpu(gpu_bundle, engines):
    gpu = Vocoder.from_bundle(gpu_bundle, providers="tensorrt")
    cpu = Vocoder.from_bundle(gpu_bundle, providers="cpu")
    rng = np.random.default_rng(0)
    hubert = rng.integers(0, cpu.num_units, 200)
    pitch = rng.integers(0, max(cpu.num_pitch, 1), 200) if cpu.has_pitch else None
    style = rng.integers(0, max(cpu.num_style_codes, 1), 200) if cpu.has_style else None
    expected = cpu.decode(hubert, pitch=pitch, style=style, dur_pred=False)
    audio = gpu.decode(hubert, pitch=pitch, style=style, dur_pred=False)
    assert audio.shape == expected.shape
    assert rel_l2(audio, expected) <= 1e-2


def test_inputs_beyond_the_gpu_maximum_run_on_the_next_provider(gpu_bundle, engines, caplog):
    """A 40 s chunk exceeds every GPU profile (30 s): the engine hands it to the CUDA EP."""
    session = create_session(gpu_bundle / "hubert.onnx", providers="tensorrt,cuda")
    assert session.get_providers() == [trt_engine.ENGINE_PROVIDER]
    audio = np.random.default_rng(1).standard_normal((1, limits.GPU_MAX_SAMPLES + 160_000)).astype(np.float32) * 0.1
    caplog.set_level(logging.WARNING, logger="spiritlm_edge")
    units = session.run(["units"], {"audio": audio})[0]
    expected = create_session(gpu_bundle / "hubert.onnx", providers="cpu").run(["units"], {"audio": audio})[0]
    assert (units == expected).mean() >= 0.98
    assert any(providers.CUDA_EP in m for m in caplog.messages)


def test_stale_engine_falls_back_then_is_rebuilt(gpu_bundle, engines, caplog):
    records_path = gpu_bundle / "tensorrt" / "engines.json"
    data = json.loads(records_path.read_text())
    real_gpu = data["engines"]["vocoder_duration"]["gpu"]
    data["engines"]["vocoder_duration"]["gpu"] = "Some Other GPU"
    records_path.write_text(json.dumps(data))

    caplog.set_level(logging.INFO, logger="spiritlm_edge")
    session = create_session(gpu_bundle / "vocoder_duration.onnx")
    assert session.get_providers()[0] != trt_engine.ENGINE_PROVIDER
    assert any("Some Other GPU" in m for m in caplog.messages)

    record = build_tensorrt_engines(gpu_bundle, components=["vocoder_duration"])["vocoder_duration"]
    assert record["gpu"] == real_gpu
    clear_session_cache()
    assert create_session(gpu_bundle / "vocoder_duration.onnx").get_providers() == [trt_engine.ENGINE_PROVIDER]


# ----------------------------------------------------------------------------- ONNX Runtime's GPU EPs


def test_default_chain_puts_the_gpu_first(gpu_bundle, caplog):
    chain = providers.default_providers()
    assert providers.CUDA_EP in chain and chain[-1] == providers.CPU_EP
    caplog.set_level(logging.INFO, logger="spiritlm_edge")
    session = create_session(gpu_bundle / "vocoder_duration.onnx", providers="cuda")
    assert session.get_providers()[0] == providers.CUDA_EP
    assert providers.session_device(session) == "cuda"


def test_tensorrt_ep_with_our_profile_matches_cpu_and_hands_over_long_inputs(gpu_bundle, librispeech_clip):
    if providers.TRT_EP not in providers.available_providers():
        pytest.skip("this onnxruntime has no TensorRT EP")
    needs_tensorrt()  # the EP needs pip's libnvinfer, which `import tensorrt` loads
    session = create_session(gpu_bundle / "hubert.onnx", providers="trt,cuda")
    assert session.get_providers()[0] == providers.TRT_EP  # it started: libnvinfer was found
    samples = load_audio(librispeech_clip)[None]
    cpu = create_session(gpu_bundle / "hubert.onnx", providers="cpu")
    got = session.run(["units"], {"audio": samples})[0]  # builds the EP's engine: the first run is slow
    assert (got == cpu.run(["units"], {"audio": samples})[0]).mean() >= 0.98
    long = np.tile(samples, (1, limits.GPU_MAX_SAMPLES // samples.shape[1] + 1))
    assert (session.run(["units"], {"audio": long})[0] == cpu.run(["units"], {"audio": long})[0]).mean() >= 0.98


# ----------------------------------------------------------------------------- the LM


@pytest.mark.parametrize("kv_cache, tolerance", [("f16", 2e-2), ("q8_0", 5e-2)])
def test_language_model_offloaded_with_flash_attention_vs_cpu(tiny_base_bundle, kv_cache, tolerance):
    """Our LanguageModel with every layer on the GPU, flash attention and the KV cache type
    asked for, against the same model on the CPU (f16 KV, no flash attention): the logits
    of every position are close and rank the same top-5 candidates."""
    needs_cuda_llama()
    gpu = LanguageModel.from_bundle(tiny_base_bundle, n_gpu_layers=-1, flash_attn=True, kv_cache=kv_cache, n_ctx=256)
    cpu = LanguageModel.from_bundle(tiny_base_bundle, n_gpu_layers=0, flash_attn=False, kv_cache="f16", n_ctx=256)
    assert gpu.model_params.n_gpu_layers == providers.ALL_LAYERS
    assert gpu.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    assert gpu.context_params.type_k == providers.KV_CACHE_TYPES[kv_cache]

    ids = gpu.tokenizer.encode("[Text]the quick brown fox jumps over the lazy dog and runs into the woods")
    on_gpu, on_cpu = gpu.score(ids), cpu.score(ids)
    assert on_gpu.shape == on_cpu.shape and np.isfinite(on_gpu).all()
    assert rel_l2(on_gpu, on_cpu) <= tolerance
    top_gpu, top_cpu = np.argsort(-on_gpu, axis=1)[:, :5], np.argsort(-on_cpu, axis=1)[:, :5]
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top_gpu, top_cpu, strict=True)])
    assert overlap >= 0.8

    # generation runs on the GPU context and stays within the vocabulary
    out = list(gpu.generate(ids, max_new_tokens=16, output_modality="text"))
    assert 0 < len(out) <= 16 and all(0 <= t < gpu.n_vocab for t in out)
    gpu.close()
    cpu.close()


# ----------------------------------------------------------------------------- streaming and a whole turn


def test_streaming_vocoder_on_the_gpu_matches_cpu_decode(tiny_base_bundle, caplog):
    caplog.set_level(logging.INFO, logger="spiritlm_edge")
    gpu = SpeechTokenizer.from_bundle(tiny_base_bundle, providers=["cuda"])
    cpu = SpeechTokenizer.from_bundle(tiny_base_bundle, providers=["cpu"])
    runs_on = [m for m in caplog.messages if m.startswith("vocoder") and " runs on " in m]
    assert runs_on and all(providers.CUDA_EP in m for m in runs_on[: len(runs_on) // 2])  # GPU first, then CPU
    rng = np.random.default_rng(2)
    units = [f"[Hu{h}]" for h in rng.integers(0, cpu.vocoder.num_units, 120)]
    streamed = np.concatenate(list(gpu.decode_stream(units)))
    offline = cpu.decode("".join(units))
    assert streamed.shape == offline.shape
    assert rel_l2(streamed, offline) <= 1e-2


def test_a_whole_speech_turn_on_gpu_providers(tiny_expressive_bundle, librispeech_clip):
    """Speech in, speech out, streamed, with the speech engines on the GPU (and the LM
    too where llama-cpp-python has CUDA); the prompt's units match the CPU's."""
    gpu_layers = -1 if providers.llama_gpu_available() else 0
    gpu = SpiritLM(tiny_expressive_bundle, providers=["cuda"], n_gpu_layers=gpu_layers)
    cpu = SpiritLM(tiny_expressive_bundle, providers=["cpu"], n_gpu_layers=0)
    gpu_prompt = gpu.build_prompt([("SPEECH", librispeech_clip)], output_modality="SPEECH")
    cpu_prompt = cpu.build_prompt([("SPEECH", librispeech_clip)], output_modality="SPEECH")
    gpu_units, cpu_units = gpu_prompt.split("]"), cpu_prompt.split("]")
    assert len(gpu_units) == len(cpu_units)
    assert np.mean([a == b for a, b in zip(gpu_units, cpu_units, strict=True)]) >= 0.95

    events = list(
        gpu.generate_stream([("SPEECH", librispeech_clip)], output_modality="SPEECH", max_new_tokens=60, seed=0)
    )
    chunks = [e.samples for e in events if isinstance(e, AudioChunk)]
    assert isinstance(events[-1], TurnEnd)
    if chunks:  # a random tiny LM may stop before 25 units; what it says must be audio
        audio = np.concatenate(chunks)
        assert audio.dtype == np.float32 and np.isfinite(audio).all()
