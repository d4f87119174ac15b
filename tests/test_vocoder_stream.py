"""The stateful streaming vocoder: the PyTorch module against the offline network, its ONNX
graph against the module, and the runtime's streamed audio against offline decoding."""

from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

from spiritlm_edge.export import random_speech as RS
from spiritlm_edge.export import vocoder as V
from spiritlm_edge.export.checkpoints import CheckpointPaths
from spiritlm_edge.runtime.bundle import Bundle, DurationConfig
from spiritlm_edge.runtime.errors import BundleError
from spiritlm_edge.runtime.vocoder import Vocoder

VARIANTS = ("base", "expressive")


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def frame_inputs(config: V.VocoderConfig, frames: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    inputs = {"units": torch.randint(0, config.num_embeddings, (frames,), generator=gen)}
    if config.num_f0_tokens:
        inputs["pitch"] = torch.randint(0, config.num_f0_tokens, (frames,), generator=gen)
        inputs["style_codes"] = torch.randint(0, config.num_style_tokens, (frames,), generator=gen)
    inputs["speaker"] = torch.tensor([1])
    if config.multistyle:
        inputs["style_id"] = torch.tensor([3])
    return inputs


def cut(inputs: dict[str, torch.Tensor], start: int, end: int) -> dict[str, torch.Tensor]:
    return {k: v[start:end] if k in ("units", "pitch", "style_codes") else v for k, v in inputs.items()}


def stream_in_chunks(stream: V.StreamingGenerator, inputs, sizes, flush_length: int) -> list[torch.Tensor]:
    """Feed ``sizes`` frames per call, then end the stream with the rest: the audio of each call."""
    total = inputs["units"].shape[0]
    middle = (1,) if stream.model.layout_2d else ()
    dtype = stream.model.conv_pre.weight.dtype
    empty, flush = (torch.zeros((1, 1, *middle, n), dtype=dtype) for n in (0, flush_length))
    states, outputs, start = None, [], 0
    for size in sizes:
        audio, io = stream.run(cut(inputs, start, start + size), empty, states)
        outputs.append(audio)
        states, start = io.next, start + size
    audio, _ = stream.run(cut(inputs, start, total), flush, states)
    return [*outputs, audio]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout_2d", [False, True])
def test_streaming_module_equals_offline_pytorch(variant, layout_2d):
    """Chunk by chunk (first call at its minimum, 1-frame calls, an end call without new
    frames, a stream ended before its delay) equals UnitHiFiGAN with weight norm, offline."""
    config = V.model_config(variant, "tiny", num_speakers=4)
    model = RS.random_vocoder(config, seed=1).double()
    folded = V.fold_weight_norm(model, layout_2d=layout_2d).double()
    inputs = frame_inputs(config, 40, seed=2)
    stream = V.StreamingGenerator(folded, list(inputs))
    plan = V.stream_layout(stream, inputs)
    hop = config.hop_length
    with torch.no_grad():
        expected = model(**inputs)  # weight norm, transposed convolutions: the reference's network
        first = plan.min_first_frames
        for sizes in ([], [first, 1, 1, 1, 2, 7], [first + 5, 9, 1], [40]):
            chunks = stream_in_chunks(stream, inputs, sizes, plan.flush_length)
            # Every call but the last emits exactly what its frames complete: after the first
            # call, hop samples per frame.
            emitted = [n * hop for n in sizes]
            if sizes:
                emitted[0] -= plan.delay_samples
            assert [c.shape[0] for c in chunks[:-1]] == emitted
            assert rel_l2(torch.cat(chunks), expected) <= 1e-5, sizes
        short = cut(inputs, 0, first - 3)  # shorter than the delay: the end call alone
        assert rel_l2(torch.cat(stream_in_chunks(stream, short, [], plan.flush_length)), model(**short)) <= 1e-5
    assert plan.delay_samples == 8889 and first == 14  # tiny: about 13.9 frames of look-ahead
    assert plan.delay_samples <= V.generator_context(config)[1] * hop + hop


@pytest.mark.slow
@pytest.mark.parametrize("layout", V.LAYOUTS)
def test_stream_graph_equals_pytorch_module(tmp_path, layout):
    """The exported vocoder_stream.onnx, call by call, against the PyTorch module."""
    variant = "expressive" if layout == "blocked" else "base"
    config = V.model_config(variant, "tiny", num_speakers=4)
    model = RS.random_vocoder(config, seed=4)
    model.speakers = list(RS.TINY_SPEAKERS)
    model.styles = list(RS.TINY_STYLES) if config.multistyle else []
    V.export_onnx(None, variant, tmp_path, model=model, layout=layout)
    entry = json.loads((tmp_path / "bundle.json").read_text())["components"]["vocoder_stream"]
    assert entry["layout"] == layout and entry["inputs"] == list(frame_inputs(config, 1, 0))
    session = ort.InferenceSession(str(tmp_path / entry["file"]), providers=["CPUExecutionProvider"])
    folded = V.fold_weight_norm(model, layout_2d=layout == "blocked")
    stream = V.StreamingGenerator(folded, entry["inputs"])
    inputs = frame_inputs(config, 30, seed=5)
    sizes = [entry["min_first_frames"], 1, 4]
    with torch.no_grad():
        expected = stream_in_chunks(stream, inputs, sizes, entry["flush"]["length"])
    states = {s["input"]: np.zeros(s["shape"], np.float32) for s in entry["states"]}
    middle = [1] if layout == "blocked" else []
    start = 0
    for size, want in zip([*sizes, 30], expected, strict=True):
        feeds = {k: v.numpy() for k, v in cut(inputs, start, start + size).items()}
        flush = entry["flush"]["length"] if start + size >= 30 else 0
        feeds[entry["flush"]["input"]] = np.zeros([1, 1, *middle, flush], np.float32)
        outputs = session.run(["audio", *(s["output"] for s in entry["states"])], {**feeds, **states})
        states = {s["input"]: value for s, value in zip(entry["states"], outputs[1:], strict=True)}
        assert outputs[0].shape == tuple(want.shape)
        assert rel_l2(outputs[0], want.numpy()) <= 1e-5
        start += size
    # Convolution states start as their left padding, alignment buffers empty.
    assert {s["shape"][-1] for s in entry["states"]} >= {0, 3}


@pytest.fixture(scope="module", params=VARIANTS)
def vocoders(request, tmp_path_factory):
    """(stateful runtime vocoder, the same bundle's vocoder without its stream graph, the bundle)."""
    root = tmp_path_factory.mktemp(f"vstream-{request.param}")
    paths = CheckpointPaths(root / "ckpt")
    RS.write_vocoder(paths, request.param, seed=6)
    V.export_onnx(paths, request.param, root / "bundle")
    bundle = Bundle(root / "bundle")
    stateful = Vocoder.from_bundle(bundle, n_threads=1)
    durations = bundle.config("vocoder_duration", DurationConfig)
    windowed = Vocoder(stateful._generator, stateful._duration, stateful.config, durations)
    return stateful, windowed, root / "bundle"


def unit_frames(vocoder: Vocoder, n: int, seed: int) -> list[tuple[int, int | None, int | None]]:
    rng = np.random.default_rng(seed)
    hubert = rng.integers(0, vocoder.num_units, n).tolist()
    pitch = rng.integers(0, vocoder.num_pitch, n).tolist() if vocoder.has_pitch else [None] * n
    style = rng.integers(0, vocoder.num_style_codes, n).tolist() if vocoder.has_style else [None] * n
    return list(zip(hubert, pitch, style, strict=True))


def offline(vocoder: Vocoder, frames, dur_pred: bool) -> np.ndarray:
    hubert, pitch, style = (None if v[0] is None else np.array(v) for v in zip(*frames, strict=True))
    return vocoder.decode(hubert, pitch, style, dur_pred=dur_pred)


@pytest.mark.parametrize("dur_pred", [True, False])
@pytest.mark.parametrize(("chunk_frames", "first_chunk_frames"), [(1, 1), (3, 8), (25, 2)])
@pytest.mark.parametrize("units", [3, 12, 50])
def test_stateful_stream_equals_offline(vocoders, dur_pred, chunk_frames, first_chunk_frames, units):
    stateful, _, _ = vocoders
    assert stateful.stateful_streaming
    frames = unit_frames(stateful, units, seed=units + chunk_frames)
    expected = offline(stateful, frames, dur_pred)
    consumed = [0]

    def arriving():
        for frame in frames:
            consumed[0] += 1
            yield frame

    chunks, consumed_at = [], []
    for chunk in stateful.stream(
        arriving(), dur_pred=dur_pred, chunk_frames=chunk_frames, first_chunk_frames=first_chunk_frames
    ):
        chunks.append(chunk)
        consumed_at.append(consumed[0])
    assert rel_l2(np.concatenate(chunks), expected) <= 1e-5
    sizes = [first_chunk_frames] + [chunk_frames] * (len(chunks) - 2)
    assert [len(c) for c in chunks[:-1]] == [s * 640 for s in sizes[: len(chunks) - 1]]
    delay = stateful.latency_frames[0]
    if not dur_pred:  # the first chunk comes once its frames and the delay have arrived
        assert consumed_at[0] == min(units, max(first_chunk_frames + delay, stateful.stream_config.min_first_frames))


def test_windows_still_stream_old_bundles(vocoders):
    """A bundle without vocoder_stream (or an int8 generator) streams with windows, as before."""
    stateful, windowed, _ = vocoders
    assert not windowed.stateful_streaming
    assert windowed.latency_frames[0] == windowed.context_frames[1] >= stateful.latency_frames[0] - 1
    frames = unit_frames(windowed, 30, seed=8)
    streamed = np.concatenate(list(windowed.stream(frames, chunk_frames=4, first_chunk_frames=2)))
    assert rel_l2(streamed, offline(windowed, frames, True)) <= 1e-5


def test_no_stream_graph_when_asked(tmp_path):
    config = V.model_config("base", "tiny", num_speakers=4)
    model = RS.random_vocoder(config, seed=0)
    model.speakers, model.styles = list(RS.TINY_SPEAKERS), list(RS.TINY_STYLES)
    V.export_onnx(None, "base", tmp_path, model=model, streaming=False)
    assert not Bundle(tmp_path).has("vocoder_stream")
    assert not Vocoder.from_bundle(tmp_path, n_threads=1).stateful_streaming
    assert math.isfinite(Vocoder.from_bundle(tmp_path, n_threads=1).latency_frames[0])


def test_malformed_stream_entry_is_a_clear_error(tmp_path):
    config = V.model_config("base", "tiny", num_speakers=4)
    model = RS.random_vocoder(config, seed=0)
    model.speakers, model.styles = list(RS.TINY_SPEAKERS), list(RS.TINY_STYLES)
    V.export_onnx(None, "base", tmp_path, model=model)
    manifest = json.loads((tmp_path / "bundle.json").read_text())
    entry = manifest["components"]["vocoder_stream"]
    entry["states"][0] = {"input": "state0"}
    (tmp_path / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="vocoder_stream.*Rebuild"):
        Vocoder.from_bundle(tmp_path, n_threads=1)
    del entry["delay_samples"]
    (tmp_path / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="lacks delay_samples"):
        Vocoder.from_bundle(tmp_path, n_threads=1)


def test_gpu_generator_keeps_windows(vocoders, monkeypatch):
    """The stateful graph is opened only next to a generator on ONNX Runtime's CPU provider."""
    import spiritlm_edge.runtime.vocoder as runtime_vocoder

    *_, bundle_dir = vocoders
    create_session = runtime_vocoder.create_session
    opened = []

    class OnGpu:
        def __init__(self, session):
            self.run = session.run

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def create(path, providers, threads):
        opened.append(path.name)
        session = create_session(path, providers, threads)
        return OnGpu(session) if path.name == "vocoder.onnx" else session

    monkeypatch.setattr(runtime_vocoder, "create_session", create)
    vocoder = Vocoder.from_bundle(bundle_dir, n_threads=1)
    assert not vocoder.stateful_streaming and "vocoder_stream.onnx" not in opened
    frames = unit_frames(vocoder, 20, seed=9)
    streamed = np.concatenate(list(vocoder.stream(frames, chunk_frames=5)))
    assert rel_l2(streamed, offline(vocoder, frames, True)) <= 1e-5
