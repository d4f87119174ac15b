"""Silero VAD on ONNX Runtime (runtime/vad.py): model lookup, streaming probabilities, turn taking."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from spiritlm_edge.runtime import vad as vad_mod
from spiritlm_edge.runtime.audio import SAMPLE_RATE, load_audio
from spiritlm_edge.runtime.errors import AudioError, BundleError
from spiritlm_edge.runtime.vad import (
    BLOCK_SAMPLES,
    SileroVAD,
    SpeechDiscarded,
    SpeechStart,
    TurnDetector,
    Utterance,
)

MODEL = vad_mod.packaged_model_path()
needs_model = pytest.mark.skipif(
    MODEL is None, reason="Silero VAD model not installed: pip install --no-deps silero-vad==6.2.3"
)


@pytest.fixture(scope="module")
def clip(librispeech_clip):
    return load_audio(librispeech_clip)


@pytest.fixture(scope="module")
def vad():
    if MODEL is None:
        pytest.skip("Silero VAD model not installed: pip install --no-deps silero-vad==6.2.3")
    return SileroVAD()


@needs_model
def test_speech_probability_high_on_speech_low_on_silence(vad, clip):
    probs = vad.probabilities(clip)
    assert probs.shape == (-(-len(clip) // BLOCK_SAMPLES),)
    # The clip is two phrases around a 1.4 s pause: most blocks are speech, the pause is not.
    assert (probs > 0.5).mean() > 0.6
    assert probs.max() > 0.95
    assert probs[85:120].max() < 0.2  # inside the pause (2.7 s - 3.8 s)
    rng = np.random.default_rng(1)
    for signal in (
        np.zeros(3 * SAMPLE_RATE),
        rng.normal(0, 0.003, 3 * SAMPLE_RATE),
        rng.normal(0, 0.02, 3 * SAMPLE_RATE),
    ):
        assert vad.probabilities(signal.astype(np.float32)).max() < 0.3


@needs_model
def test_streaming_matches_silero_reference_wrapper(vad, clip):
    """Our numpy streaming protocol against silero-vad's own ONNX wrapper (which needs torch)."""
    pytest.importorskip("torch")
    pytest.importorskip("packaging")
    import torch
    from silero_vad.utils_vad import OnnxWrapper  # imported here only: the runtime never does

    reference = OnnxWrapper(str(MODEL), force_onnx_cpu=True)
    segment = clip[: 150 * BLOCK_SAMPLES]
    expected = reference.audio_forward(torch.from_numpy(segment), SAMPLE_RATE).numpy().reshape(-1)
    ours = vad.probabilities(segment)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


@needs_model
def test_reset_restarts_the_stream(vad, clip):
    blocks = clip[: 40 * BLOCK_SAMPLES].reshape(40, BLOCK_SAMPLES)
    vad.reset()
    first = [vad(b) for b in blocks]
    vad.reset()
    second = [vad(b) for b in blocks]
    assert first == second
    # Without reset the recurrent state carries over and changes the answer.
    third = [vad(b) for b in blocks]
    assert third != first


@needs_model
def test_wrong_block_size_is_a_clear_error(vad):
    with pytest.raises(AudioError, match="512 samples"):
        vad(np.zeros(480, dtype=np.float32))


@needs_model
def test_runtime_finds_model_without_importing_silero_vad_or_torch():
    code = (
        "import sys; from spiritlm_edge.runtime.vad import SileroVAD; import numpy as np; "
        "v = SileroVAD(); v(np.zeros(512, dtype=np.float32)); "
        "bad = [m for m in ('torch', 'silero_vad') if m in sys.modules]; "
        "assert not bad, bad; print(v.model_path)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("silero_vad.onnx")


@needs_model
def test_model_lookup_order(tmp_path, monkeypatch):
    from spiritlm_edge.runtime.bundle import add_component

    # An explicit path wins; a directory means the file inside it.
    copy = tmp_path / "explicit" / "silero_vad.onnx"
    copy.parent.mkdir()
    shutil.copy(MODEL, copy)
    assert vad_mod.find_vad_model(copy.parent) == copy
    with pytest.raises(BundleError, match="does not exist.*--no-deps silero-vad"):
        vad_mod.find_vad_model(tmp_path / "missing.onnx")

    # A bundle's 'vad' component comes before the installed package.
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copy(MODEL, bundle / "silero_vad.onnx")
    add_component(bundle, "vad", {"file": "silero_vad.onnx"})
    assert vad_mod.find_vad_model(bundle=bundle) == bundle / "silero_vad.onnx"
    assert SileroVAD.from_bundle(bundle).model_path == bundle / "silero_vad.onnx"

    # A bundle without one falls back to the package; with neither, the error says what to do.
    empty = tmp_path / "empty-bundle"
    empty.mkdir()
    (empty / "x.bin").write_bytes(b"x")
    add_component(empty, "other", {"file": "x.bin"})
    assert vad_mod.find_vad_model(bundle=empty) == MODEL
    monkeypatch.setattr(vad_mod, "packaged_model_path", lambda: None)
    with pytest.raises(BundleError, match="no 'vad' component.*pip install --no-deps silero-vad"):
        vad_mod.find_vad_model(bundle=empty)
    with pytest.raises(BundleError, match="pip install --no-deps silero-vad"):
        SileroVAD()


def test_not_a_vad_model_is_rejected(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "other.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by any ONNX Runtime >= 1.17
    onnx.save(model, path)
    with pytest.raises(BundleError, match="not a Silero VAD"):
        SileroVAD(path)


# ----------------------------------------------------------------------------- TurnDetector


def _blocks(values):
    """Blocks whose first sample is their index, so the utterance's blocks can be identified."""
    return [np.full(BLOCK_SAMPLES, float(i), dtype=np.float32) for i in range(len(values))]


def _run(detector, probs):
    events = []
    for i, (block, p) in enumerate(zip(_blocks(probs), probs, strict=True)):
        event = detector.feed(block, p)
        if event is not None:
            events.append((i, event))
    return events


def test_turn_detector_start_end_and_padding():
    # 32 ms blocks: start after 5 speech blocks, end after 20 silent ones, pad 3 blocks.
    detector = TurnDetector(start_ms=160, end_silence_ms=640, min_speech_ms=100, pad_ms=96)
    probs = [0.0] * 10 + [0.9] * 30 + [0.4] * 2 + [0.9] * 5 + [0.0] * 25
    events = _run(detector, probs)
    assert [type(e).__name__ for _, e in events] == ["SpeechStart", "Utterance"]
    start_at, _ = events[0]
    assert start_at == 14  # fifth speech block
    end_at, utterance = events[1]
    # Blocks at 0.4 sit between the thresholds (0.35, 0.5): they do not start the silence count.
    last_speech = 46
    assert end_at == last_speech + 20
    ids = utterance.audio.reshape(-1, BLOCK_SAMPLES)[:, 0].astype(int).tolist()
    assert ids == list(range(10 - 3, last_speech + 1 + 3))  # 3 blocks of padding either side
    assert utterance.speech_ms == pytest.approx((last_speech + 1 - 10) * 32)
    assert not detector.speaking


def test_turn_detector_ignores_blips_and_short_speech():
    detector = TurnDetector(start_ms=160, end_silence_ms=320, min_speech_ms=400, pad_ms=64)
    # Four speech blocks never confirm a start; seven do, but 224 ms < min_speech_ms.
    events = _run(detector, [0.0] * 5 + [0.9] * 4 + [0.0] * 5 + [0.9] * 7 + [0.0] * 15)
    assert [type(e) for _, e in events] == [SpeechStart, SpeechDiscarded]
    assert events[1][1].speech_ms == pytest.approx(7 * 32)


def test_turn_detector_cuts_overlong_turns():
    detector = TurnDetector(start_ms=64, end_silence_ms=700, pad_ms=0, max_utterance_s=1.0)
    events = _run(detector, [0.9] * 70)
    utterances = [e for _, e in events if isinstance(e, Utterance)]
    assert len(utterances) == 2 and all(u.forced for u in utterances)
    assert len(utterances[0].audio) == round(1000 / 32) * BLOCK_SAMPLES


def test_turn_detector_rejects_bad_threshold():
    with pytest.raises(AudioError, match="between 0 and 1"):
        TurnDetector(threshold=1.5)


@needs_model
def test_end_of_turn_silence_on_real_speech(vad, clip):
    """The clip's 1.4 s pause ends a turn at 700 ms of silence, not at 2 s."""
    signal = np.concatenate([np.zeros(8192, np.float32), clip, np.zeros(3 * SAMPLE_RATE, np.float32)])
    signal = signal[: len(signal) // BLOCK_SAMPLES * BLOCK_SAMPLES].reshape(-1, BLOCK_SAMPLES)
    for end_silence_ms, expected_turns in ((700, 2), (2000, 1)):
        vad.reset()
        detector = TurnDetector(end_silence_ms=end_silence_ms)
        utterances = [e for b in signal if isinstance(e := detector.feed(b, vad(b)), Utterance)]
        assert len(utterances) == expected_turns
    # One turn holds the whole clip, give or take the padding and the clip's own silences.
    assert abs(len(utterances[0].audio) - len(clip)) < 0.6 * SAMPLE_RATE
