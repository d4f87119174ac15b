"""Audio in: read a file or take an array, make it mono float32 at 16 kHz, check it.

Spirit LM's speech encoders all take 16 kHz mono (spec section 4). Stereo is averaged;
any other rate goes through soxr's high-quality resampler.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf
import soxr

from spiritlm_edge.runtime.errors import AudioError

SAMPLE_RATE = 16000
# The reference skips chunks shorter than this: HuBERT's front end needs 400 samples
# for one frame and the 25 Hz hop is 640; 1280 = two hops.
MIN_SAMPLES = 1280
MAX_CHUNK_SAMPLES = 100 * SAMPLE_RATE

# What the encoders accept as speech: a file path, an array at 16 kHz (or at the caller's
# ``sample_rate``), or a (samples, rate) pair. Not to be confused with the microphone
# classes of runtime/audio_io.py.
AudioSource = Union[str, os.PathLike, np.ndarray, "tuple[np.ndarray, int]"]

BUNDLED_CLIP = Path(__file__).parent / "data" / "librispeech-7143-88743-0029.flac"


def read_audio_file(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(samples as float32 [frames, channels] or [frames], sample rate) from a sound file."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"Audio file {path} does not exist.")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=False)
    except Exception as exc:  # libsndfile's errors are RuntimeError / LibsndfileError
        raise AudioError(
            f"Cannot read {path} as audio ({str(exc).strip()[:200]}). Give a WAV, FLAC or OGG file "
            "(anything libsndfile reads)."
        ) from None
    return data, rate


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Average channels. Accepts [frames], [frames, channels] (soundfile) or [channels, frames]
    with few channels (torchaudio style)."""
    if samples.ndim == 1:
        return samples
    if samples.ndim != 2:
        raise AudioError(f"Audio array has shape {samples.shape}; expected [samples] or [samples, channels].")
    # The channel axis is the short one.
    channel_axis = 1 if samples.shape[1] <= samples.shape[0] else 0
    return samples.mean(axis=channel_axis)


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    if rate == target:
        return samples
    if rate <= 0:
        raise AudioError(f"Sample rate {rate} is not positive.")
    return soxr.resample(samples, rate, target, quality="HQ").astype(np.float32, copy=False)


def load_audio(audio: AudioSource, sample_rate: int | None = None, what: str = "audio") -> np.ndarray:
    """Any audio input -> mono float32 samples at 16 kHz, checked for bad values.

    ``audio`` is a path, a ``(samples, rate)`` tuple, or an array; a bare array is taken
    to be at ``sample_rate`` (16 kHz if not given).
    """
    if isinstance(audio, (str, os.PathLike)):
        samples, rate = read_audio_file(audio)
        what = f"{what} {audio}"
    elif isinstance(audio, tuple) and len(audio) == 2:
        samples, rate = np.asarray(audio[0]), int(audio[1])
    else:
        if hasattr(audio, "detach"):  # a torch tensor, without importing torch
            audio = audio.detach().cpu().numpy()
        samples = np.asarray(audio)
        rate = SAMPLE_RATE if sample_rate is None else int(sample_rate)
    if samples.dtype.kind not in "fiu":
        raise AudioError(f"{what}: expected numeric samples, got dtype {samples.dtype}.")
    if samples.dtype.kind in "iu":  # PCM integers -> [-1, 1]
        samples = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max)
    samples = to_mono(samples.astype(np.float32, copy=False))
    if samples.size == 0:
        raise AudioError(f"{what} is empty: there is no speech to encode.")
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise AudioError(f"{what} has {bad} NaN or infinite samples; clean the signal before encoding.")
    samples = resample(samples, rate)
    if samples.size < MIN_SAMPLES:
        raise AudioError(
            f"{what} is {samples.size / SAMPLE_RATE * 1000:.0f} ms long; the speech encoders need at "
            f"least {MIN_SAMPLES} samples at 16 kHz ({MIN_SAMPLES / SAMPLE_RATE * 1000:.0f} ms)."
        )
    return np.ascontiguousarray(samples, dtype=np.float32)


def chunks(samples: np.ndarray, max_samples: int = MAX_CHUNK_SAMPLES):
    """The reference's chunking: pieces of at most 100 s; a trailing piece shorter than
    1280 samples is skipped."""
    for start in range(0, len(samples), max_samples):
        piece = samples[start : start + max_samples]
        if len(piece) >= MIN_SAMPLES:
            yield piece


def write_wav(path: str | os.PathLike, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    sf.write(str(path), np.asarray(samples, dtype=np.float32), rate, subtype="PCM_16")
