"""SpeechTokenizer (runtime/speech.py) on tiny bundles: the reference's API, streaming decode,
and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from spiritlm_edge import SpeechTokenizer
from spiritlm_edge.runtime.audio import load_audio
from spiritlm_edge.runtime.errors import AudioError, BundleError, SpiritLMEdgeError, UnitsError
from spiritlm_edge.units import PitchFallback, common_style, string_to_units, units_to_string


@pytest.fixture(scope="module", params=["base", "expressive"])
def tokenizer(request, tiny_base_bundle, tiny_expressive_bundle):
    bundle = tiny_base_bundle if request.param == "base" else tiny_expressive_bundle
    return SpeechTokenizer.from_bundle(bundle, n_threads=2)


def test_encode_units_and_string(tokenizer, librispeech_clip):
    units = tokenizer.encode_units(librispeech_clip)
    expected_keys = {"hubert"} if tokenizer.variant == "base" else {"hubert", "pitch", "style"}
    assert set(units) == expected_keys
    hubert = [int(x) for x in units["hubert"].split()]
    seconds = load_audio(librispeech_clip).size / 16000
    assert abs(len(hubert) - seconds * 25) <= 1  # 25 Hz
    assert len(set(hubert)) >= 20
    if tokenizer.variant == "expressive":
        assert abs(len(units["pitch"].split()) - seconds * 12.5) <= 1  # 12.5 Hz
        assert len(units["style"].split()) == 10  # one per started second
    string = tokenizer.encode_string(librispeech_clip)
    assert string == units_to_string(units, has_pitch=tokenizer.has_pitch, has_style=tokenizer.has_style)
    assert tokenizer(librispeech_clip) == string  # __call__ is encode_string


def test_array_input_with_its_sample_rate(tokenizer, librispeech_clip):
    import soxr

    clip = load_audio(librispeech_clip)
    at_44k = soxr.resample(clip, 16000, 44100)
    stereo = np.stack([at_44k, at_44k], axis=1)
    a = tokenizer.encode_units(librispeech_clip)["hubert"].split()
    b = tokenizer.encode_units((stereo, 44100))["hubert"].split()
    assert len(a) == len(b)
    assert np.mean(np.array(a) == np.array(b)) > 0.8  # resampled twice: nearly the same units


def test_decode_string_and_dict_agree(tokenizer, librispeech_clip):
    string = tokenizer.encode_string(librispeech_clip)
    from_string = tokenizer.decode(string, seed=0)
    from_dict = tokenizer.decode(string_to_units(string, rng=0), seed=0)
    assert from_string.dtype == np.float32 and from_string.size % 640 == 0
    np.testing.assert_array_equal(from_string, from_dict)
    assert np.sqrt(np.mean(from_string**2)) > 1e-3  # not silent
    without_durations = tokenizer.decode(string, dur_pred=False, seed=0)
    assert without_durations.size == len(string_to_units(string)["hubert"].split()) * 640


def test_decode_stream_equals_decode(tokenizer, librispeech_clip):
    import re

    string = tokenizer.encode_string(librispeech_clip)
    offline = tokenizer.decode(string, seed=1)
    tokens = re.findall(r"\[\w+?\d+\]", string)
    chunks = list(tokenizer.decode_stream(iter(tokens), chunk_frames=10, first_chunk_frames=3, seed=1))
    assert len(chunks) > 3
    assert chunks[0].size == 3 * 640 and all(c.size == 10 * 640 for c in chunks[1:-1])
    streamed = np.concatenate(chunks)
    assert streamed.shape == offline.shape
    assert np.linalg.norm(streamed - offline) <= 1e-3 * np.linalg.norm(offline)


def test_decode_stream_yields_before_the_units_end(tokenizer, librispeech_clip):
    """Audio must come out while units are still arriving, not after the last one."""
    import re

    tokens = re.findall(r"\[\w+?\d+\]", tokenizer.encode_string(librispeech_clip))
    consumed = []

    def arriving():
        for i, token in enumerate(tokens):
            consumed.append(i)
            yield token

    stream = tokenizer.decode_stream(arriving(), chunk_frames=5, seed=0)
    next(stream)
    # the first chunk needs its frames plus the vocoder's right context, not the whole stream
    need = 5 + tokenizer.vocoder.context_frames[1] + 10
    hubert_consumed = sum(t.startswith("[Hu") for t in tokens[: len(consumed)])
    assert hubert_consumed <= need < sum(t.startswith("[Hu") for t in tokens), (hubert_consumed, need)
    stream.close()


@pytest.mark.parametrize(
    "audio, message",
    [
        (np.zeros(0, np.float32), "empty"),
        (np.zeros(1000, np.float32), "at least 1280"),
        (np.full(4000, np.nan, np.float32), "NaN"),
    ],
)
def test_bad_audio(tokenizer, audio, message):
    with pytest.raises(AudioError, match=message):
        tokenizer.encode_units(audio)


def test_bad_units_and_speaker(tokenizer, tmp_path):
    with pytest.raises(UnitsError, match="500|501|outside|range"):
        tokenizer.decode("[Hu999][Hu1]")
    with pytest.raises(SpiritLMEdgeError, match="[Ss]peaker"):
        tokenizer.decode("[Hu1][Hu2][Hu3]", speaker_id=7)
    with pytest.raises(UnitsError):
        tokenizer.decode("")
    not_audio = tmp_path / "x.flac"
    not_audio.write_bytes(b"fLaC but not really")
    with pytest.raises(AudioError, match="x.flac"):
        tokenizer.encode_units(not_audio)


def test_bundle_whose_file_does_not_match_its_hash(tiny_base_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_base_bundle, copy)
    manifest = json.loads((copy / "bundle.json").read_text())
    target = copy / manifest["components"]["hubert"]["file"]
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        SpeechTokenizer.from_bundle(copy)


def test_expressive_units_without_pitch_are_spoken(tiny_expressive_bundle, caplog):
    """Spec section 5 / issue 16: Hubert units alone are spoken with the bundle's neutral pitch
    code (or a given fallback), from a string, a dict, or a stream, all alike."""
    tokenizer = SpeechTokenizer.from_bundle(tiny_expressive_bundle, n_threads=2)
    hubert = [(13 * i) % 90 for i in range(40)]
    string = "".join(f"[Hu{u}]" for u in hubert)
    neutral = tokenizer.pitch.neutral_code
    expected = tokenizer.vocoder.decode(hubert, [neutral] * 40, [common_style(3)] * 40)
    with caplog.at_level("WARNING"):
        from_string = tokenizer.decode(string, seed=3)
    assert "neutral pitch code" in caplog.text
    np.testing.assert_array_equal(from_string, expected)
    np.testing.assert_array_equal(tokenizer.decode({"hubert": " ".join(map(str, hubert))}, seed=3), expected)
    streamed = np.concatenate(
        list(tokenizer.decode_stream(iter(string.replace("][", "]|[").split("|")), chunk_frames=6, seed=3))
    )
    assert np.linalg.norm(streamed - expected) <= 1e-3 * np.linalg.norm(expected)
    given = tokenizer.decode(string, seed=3, pitch_fallback=PitchFallback(17, "a test"))
    np.testing.assert_array_equal(given, tokenizer.decode("[Pi17]" + string, seed=3))
