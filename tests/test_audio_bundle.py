"""runtime/audio.py and runtime/bundle.py: input checking and manifest integrity."""

import json

import numpy as np
import pytest
import soundfile as sf

from spiritlm_edge.runtime.audio import MIN_SAMPLES, chunks, load_audio
from spiritlm_edge.runtime.bundle import (
    Bundle,
    EncoderConfig,
    VocoderConfig,
    add_component,
    read_manifest,
    update_manifest,
)
from spiritlm_edge.runtime.errors import AudioError, BundleError


def test_load_audio_reads_the_clip(librispeech_clip):
    samples = load_audio(librispeech_clip)
    info = sf.info(str(librispeech_clip))
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert len(samples) == info.frames and info.samplerate == 16000


def test_stereo_is_averaged_and_resampled(tmp_path):
    t = np.arange(44100) / 44100
    left, right = np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t) * 0.5
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 44100, subtype="FLOAT")
    samples = load_audio(path)
    assert abs(len(samples) - 16000) <= 1
    # amplitude of the average (0.75) survives resampling; frequency stays at 440 Hz
    assert 0.7 < np.abs(samples[1000:-1000]).max() < 0.8
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) * 16000 / len(samples) - 440) < 3


def test_array_with_rate_and_int_pcm():
    pcm = (np.random.default_rng(0).standard_normal(8000) * 1000).astype(np.int16)
    samples = load_audio((pcm, 8000))
    assert len(samples) == 16000 and np.abs(samples).max() < 1


@pytest.mark.parametrize(
    "audio, message",
    [
        (np.zeros(0, np.float32), "empty"),
        (np.zeros(MIN_SAMPLES - 1, np.float32), "at least 1280 samples"),
        (np.array([0.1] * 2000 + [np.nan], np.float32), "NaN or infinite"),
        (np.array([np.inf] * 2000, np.float32), "NaN or infinite"),
        (np.array(["a", "b"]), "numeric"),
    ],
)
def test_bad_audio_is_refused(audio, message):
    with pytest.raises(AudioError, match=message):
        load_audio(audio)


def test_non_audio_file_is_refused(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio")
    with pytest.raises(AudioError, match="Cannot read .*notes.wav"):
        load_audio(path)
    with pytest.raises(AudioError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")


def test_chunks_skip_short_tail():
    samples = np.zeros(2 * 2000 + 500, np.float32)
    pieces = list(chunks(samples, max_samples=2000))
    assert [len(p) for p in pieces] == [2000, 2000]  # the 500-sample tail is skipped
    pieces = list(chunks(np.zeros(2 * 1500 + 1280, np.float32), max_samples=1500))
    assert [len(p) for p in pieces] == [1500, 1500, 1280]


def test_bundle_records_and_verifies_files(tmp_path):
    (tmp_path / "a.onnx").write_bytes(b"model-bytes")
    add_component(tmp_path, "hubert", {"file": "a.onnx", "rate_hz": 25}, variant="base")
    bundle = Bundle(tmp_path)
    assert bundle.variant == "base" and bundle.component("hubert")["rate_hz"] == 25
    assert bundle.path("hubert") == tmp_path / "a.onnx"
    # same size, different bytes: caught by the hash
    (tmp_path / "a.onnx").write_bytes(b"model-BYTES")
    with pytest.raises(BundleError, match="sha256"):
        Bundle(tmp_path).path("hubert")
    (tmp_path / "a.onnx").write_bytes(b"short")
    with pytest.raises(BundleError, match="truncated"):
        Bundle(tmp_path).path("hubert")
    (tmp_path / "a.onnx").unlink()
    with pytest.raises(BundleError, match="missing a.onnx"):
        Bundle(tmp_path).path("hubert")
    with pytest.raises(BundleError, match="no 'vocoder' component"):
        Bundle(tmp_path).component("vocoder")


def test_bundle_refuses_mixed_variants_and_bad_manifests(tmp_path):
    update_manifest(tmp_path, variant="base")
    with pytest.raises(BundleError, match="holds a base bundle"):
        update_manifest(tmp_path, variant="expressive")
    (tmp_path / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "bundle.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(BundleError, match="not a spiritlm-edge manifest"):
        read_manifest(tmp_path)
    with pytest.raises(BundleError, match="no bundle.json"):
        read_manifest(tmp_path / "..")
    with pytest.raises(BundleError, match="does not exist"):
        Bundle(tmp_path / "nope")


def test_manifest_is_deterministic(tmp_path):
    (tmp_path / "a.onnx").write_bytes(b"x")
    add_component(tmp_path, "hubert", {"file": "a.onnx"}, variant="base")
    first = (tmp_path / "bundle.json").read_bytes()
    add_component(tmp_path, "hubert", {"file": "a.onnx"}, variant="base")
    assert (tmp_path / "bundle.json").read_bytes() == first


def test_component_settings_are_typed_and_checked(tmp_path):
    (tmp_path / "vocoder.onnx").write_bytes(b"x")
    (tmp_path / "hubert.onnx").write_bytes(b"x")
    vocoder = {
        "file": "vocoder.onnx",
        "inputs": ["units", "speaker"],
        "sample_rate": 16000,
        "hop_length": 640,
        "num_units": 500,
        "num_speakers": 4,
        "context_frames": {"left": 14, "right": 20},
    }
    add_component(tmp_path, "vocoder", vocoder, variant="base")
    add_component(tmp_path, "hubert", {"file": "hubert.onnx", "hop_samples": 640, "rate_hz": 25})
    bundle = Bundle(tmp_path)
    config = bundle.config("vocoder", VocoderConfig)
    assert (config.inputs, config.context_frames, config.num_pitch, config.default_style) == (
        ("units", "speaker"),
        (14, 20),
        0,
        None,
    )
    assert bundle.config("vocoder", VocoderConfig) is config  # read once
    with pytest.raises(BundleError, match="'hubert' component lacks min_samples.*Rebuild"):
        bundle.config("hubert", EncoderConfig)
    with pytest.raises(BundleError, match="no EncoderConfig"):
        bundle.config("vocoder", EncoderConfig)
    add_component(tmp_path, "vocoder", {**vocoder, "context_frames": [14, 20]})
    with pytest.raises(BundleError, match="context_frames"):
        Bundle(tmp_path).config("vocoder", VocoderConfig)
