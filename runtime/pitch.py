"""Pitch codes at 12.5 Hz (Spirit LM Expressive) with two ONNX engines and NumPy glue.

``fcpe.onnx`` gives F0 and confidence at FCPE's own hop (160 samples); the steps the
reference runs between FCPE and the VQ-VAE happen here, in its order (spec section 4):
unvoiced = confidence <= threshold or F0 < f0_min; linear interpolation of unvoiced F0
at FCPE's rate; clamp to f0_max; nearest resize to ``N//80 + 1`` frames; ``vuv = 1-uv``;
mean-voiced-F0 subtraction for ``norm_`` features; ``pitch_vqvae.onnx`` -> codes.
Audio goes through in chunks of at most 100 s, like the reference::

    engine = PitchEngine.from_bundle("bundle/")
    codes = engine(samples)            # int64, one per 16 F0 frames
    f0, voiced = engine.f0(samples)    # per 80-sample frame
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from spiritlm_edge.runtime.audio import BUNDLED_CLIP, SAMPLE_RATE, AudioSource, chunks, load_audio
from spiritlm_edge.runtime.bundle import Bundle, F0Config, PitchConfig
from spiritlm_edge.runtime.errors import BundleError
from spiritlm_edge.runtime.onnx_session import create_session

log = logging.getLogger(__name__)

# Codes in the flat contour the neutral pitch code is read from: its middle code must see
# only the contour, not the zero padding at its ends (with the full-size encoder, the
# padding reaches about 56 codes in from each end).
NEUTRAL_CONTOUR_CODES = 256


def neutral_features(frames_per_code: int, f0_hz: float) -> np.ndarray:
    """The VQ-VAE input [1, 2, frames] of a flat, voiced contour at ``f0_hz``: 0 for
    speaker-normalised features (a contour at the speaker's mean F0 normalises to 0)."""
    frames = NEUTRAL_CONTOUR_CODES * frames_per_code
    return np.stack([np.full(frames, f0_hz, np.float32), np.ones(frames, np.float32)])[None]


def neutral_f0_hz(normalize: bool, f0: np.ndarray, voiced: np.ndarray) -> float:
    """F0 of the neutral contour: the speaker-normalised mean (0) for normalised features;
    otherwise the mean voiced F0 of ``f0`` (the bundled LibriSpeech clip's, measured with
    the bundle's own F0 model)."""
    if normalize or not voiced.any():
        return 0.0
    return float(f0[voiced].mean(dtype=np.float64))


def middle_code(codes) -> int:
    """The neutral pitch code: the middle code of a flat contour's codes."""
    flat = np.asarray(codes).reshape(-1)
    return int(flat[flat.size // 2])


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source frame of every output frame of a nearest resize, computed as PyTorch's
    ``interpolate(size=n_out, mode="nearest")`` does (float32 scale, floor, clamp), so
    frame boundaries fall where the reference puts them."""
    if n_out == n_in:
        return np.arange(n_out)
    if n_out == 2 * n_in:
        return np.arange(n_out) >> 1
    scale = np.float32(n_in) / np.float32(n_out)
    index = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, n_in - 1)


class PitchEngine:
    """Audio (mono float32, 16 kHz) -> pitch codes, with ``fcpe`` and ``pitch`` components."""

    def __init__(self, fcpe_session: Any, vqvae_session: Any, fcpe: F0Config, pitch: PitchConfig):
        self.fcpe_session, self.vqvae_session = fcpe_session, vqvae_session
        if fcpe.sample_rate != SAMPLE_RATE:
            raise BundleError(f"The bundle's FCPE runs at {fcpe.sample_rate} Hz; expected {SAMPLE_RATE}.")
        if pitch.frame_hop != fcpe.frame_hop:
            raise BundleError("The bundle's FCPE and pitch VQ-VAE disagree on the F0 frame hop; rebuild it.")
        self.model_hop = fcpe.model_hop
        self.frame_hop = fcpe.frame_hop
        self.threshold = fcpe.threshold
        self.f0_min, self.f0_max = fcpe.f0_min, fcpe.f0_max
        self.interpolate = fcpe.interpolate_unvoiced
        self.normalize = pitch.normalize_f0
        self.frames_per_code = pitch.frames_per_code
        self.codebook_size = pitch.codebook_size
        self.rate = SAMPLE_RATE / (self.frame_hop * self.frames_per_code)
        recorded = pitch.neutral_code
        if recorded is None:
            # bundles exported before spiritlm-edge recorded it: the same computation, on ONNX
            log.info("bundle.json has no neutral pitch code (older export): computing it from the pitch VQ-VAE")
            recorded = self.compute_neutral_code()
        if not (isinstance(recorded, int) and 0 <= recorded < self.codebook_size):
            raise BundleError(
                f"bundle.json's neutral pitch code {recorded!r} is not one of the "
                f"{self.codebook_size} pitch codes; re-export the bundle (spiritlm-edge build)."
            )
        self.neutral_code: int = recorded

    def compute_neutral_code(self) -> int:
        """The code the bundle's VQ-VAE gives a flat, voiced contour at the speaker-normalised
        mean F0 (spec section 5): what Expressive speech without pitch codes is spoken with."""
        f0_hz = 0.0
        if not self.normalize:
            f0_hz = neutral_f0_hz(False, *self.f0(BUNDLED_CLIP))
        features = neutral_features(self.frames_per_code, f0_hz)
        return middle_code(self.vqvae_session.run(None, {"features": features})[0])

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle | str | os.PathLike,
        providers: Sequence[str] | None = None,
        n_threads: int | None = None,
    ) -> PitchEngine:
        bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        fcpe = bundle.config("fcpe", F0Config)
        pitch = bundle.config("pitch", PitchConfig)
        return cls(
            create_session(bundle.engine_path("fcpe"), providers, n_threads),
            create_session(bundle.engine_path("pitch"), providers, n_threads),
            fcpe,
            pitch,
        )

    # -- F0 -------------------------------------------------------------------------------

    def _chunk_f0(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raw, confidence = self.fcpe_session.run(None, {"audio": chunk[None]})
        f0 = np.where(confidence[0] > self.threshold, raw[0], np.float32(0)).astype(np.float32)
        unvoiced = f0 < self.f0_min
        if not unvoiced.all():
            if self.interpolate and unvoiced.any():
                frames = np.arange(f0.shape[0])
                f0[unvoiced] = np.interp(frames[unvoiced], frames[~unvoiced], f0[~unvoiced])
        else:
            f0[:] = 0.0  # nothing voiced (silence): no pitch, rather than the reference's crash
        np.minimum(f0, np.float32(self.f0_max), out=f0)
        source = nearest_indices(f0.shape[0], chunk.shape[0] // self.frame_hop + 1)
        return f0[source], ~unvoiced[source]

    def f0(self, audio: AudioSource, sample_rate: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """F0 in Hz (unvoiced frames interpolated, as the VQ-VAE sees it) and the voiced
        mask, per 80-sample frame (``len//80 + 1`` frames per chunk, chunks concatenated)."""
        samples = load_audio(audio, sample_rate)
        parts = [self._chunk_f0(chunk) for chunk in chunks(samples)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    # -- codes ----------------------------------------------------------------------------

    def features(self, chunk: np.ndarray) -> np.ndarray:
        """The VQ-VAE's input [1, 2, frames] (f0, vuv) for one chunk."""
        f0, voiced = self._chunk_f0(chunk)
        if self.normalize and voiced.any():
            mean = f0[voiced].mean(dtype=np.float32)
            f0 = np.where(f0 != 0, f0 - mean, f0)
        return np.stack([f0, voiced.astype(np.float32)])[None].astype(np.float32)

    def __call__(self, audio: AudioSource, sample_rate: int | None = None) -> np.ndarray:
        """Pitch codes (int64, 0..63) of ``audio``, 12.5 per second."""
        samples = load_audio(audio, sample_rate)
        codes = [self.vqvae_session.run(None, {"features": self.features(chunk)})[0][0] for chunk in chunks(samples)]
        return np.concatenate(codes).astype(np.int64)
