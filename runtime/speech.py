"""``SpeechTokenizer``: speech <-> unit strings with the bundle's ONNX engines.

The method names are the reference's (``encode_units``, ``encode_string``, ``decode``),
so code written against Spirit LM's speech tokenizer runs unchanged::

    tokenizer = SpeechTokenizer.from_bundle("bundle/")
    units = tokenizer.encode_units("question.wav")   # {"hubert": "78 42 ...", ...}
    prompt = tokenizer("question.wav")               # "[Hu78][Hu42]..."
    audio = tokenizer.decode(prompt, speaker_id=2)   # float32, 16 kHz
    for chunk in tokenizer.decode_stream(iter_of_unit_tokens):
        play(chunk)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from spiritlm_edge.runtime.audio import AudioSource, load_audio
from spiritlm_edge.runtime.bundle import Bundle
from spiritlm_edge.runtime.errors import UnitsError
from spiritlm_edge.runtime.hubert import HubertEngine
from spiritlm_edge.runtime.pitch import PitchEngine
from spiritlm_edge.runtime.style import StyleEngine
from spiritlm_edge.runtime.units import (
    PitchFallback,
    common_style,
    iter_unit_frames,
    string_to_units,
    unit_ids,
    units_to_string,
)
from spiritlm_edge.runtime.vocoder import Vocoder

# 8 frames (320 ms of audio) for the first streamed chunk: with the generator's context on
# both sides that is about half the compute of a default 25-frame chunk.
FIRST_CHUNK_FRAMES = 8


class SpeechTokenizer:
    """The speech side of a bundle: HuBERT units (+ pitch and style for Expressive) in,
    unit HiFi-GAN out. Engines are ONNX Runtime sessions created once and reused."""

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        providers: Sequence[str] | None = None,
        n_threads: int | None = None,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.variant = self.bundle.variant
        self.hubert = HubertEngine.from_bundle(self.bundle, providers=providers, n_threads=n_threads)
        self.pitch: PitchEngine | None = None  # Expressive bundles only
        self.style: StyleEngine | None = None
        if self.variant == "expressive":
            self.pitch = PitchEngine.from_bundle(self.bundle, providers=providers, n_threads=n_threads)
            self.style = StyleEngine.from_bundle(self.bundle, providers=providers, n_threads=n_threads)
        self.vocoder = Vocoder.from_bundle(self.bundle, providers=providers, n_threads=n_threads)

    @classmethod
    def from_bundle(cls, bundle, providers=None, n_threads=None) -> SpeechTokenizer:
        return cls(bundle, providers=providers, n_threads=n_threads)

    @property
    def has_pitch(self) -> bool:
        return self.pitch is not None

    @property
    def has_style(self) -> bool:
        return self.style is not None

    def pitch_fallback(self, prompt: str | None = None) -> PitchFallback | None:
        """What Expressive speech without any pitch code is spoken with (spec section 5):
        the last pitch code of ``prompt`` if it has one, else the bundle's neutral pitch
        code. None for Base. Pass one object per turn to :meth:`decode` and
        :meth:`decode_stream`: it warns once, the first time it is used."""
        if self.pitch is None:
            return None
        return PitchFallback.for_prompt(prompt, self.pitch.neutral_code)

    # -- encoding -------------------------------------------------------------------------

    def encode_units(self, audio: AudioSource, sample_rate: int | None = None) -> dict[str, str]:
        """Unit streams of ``audio`` as space-separated ids, like the reference:
        ``{"hubert": ...}`` and, for Expressive, ``"pitch"`` and ``"style"``."""
        samples = load_audio(audio, sample_rate)
        units = {"hubert": " ".join(map(str, self.hubert(samples)))}
        if self.pitch is not None:
            units["pitch"] = " ".join(map(str, self.pitch(samples)))
        if self.style is not None:
            units["style"] = " ".join(map(str, self.style(samples)))
        return units

    def encode_string(self, audio: AudioSource, sample_rate: int | None = None) -> str:
        """The LM's view of ``audio``: ``[St..][Pi..][Hu..]...`` (spec section 5)."""
        units = self.encode_units(audio, sample_rate)
        return units_to_string(units, has_pitch=self.has_pitch, has_style=self.has_style)

    __call__ = encode_string

    # -- decoding -------------------------------------------------------------------------

    def decode(
        self,
        units: str | dict,
        speaker_id: int = 2,
        dur_pred: bool = True,
        seed: int | None = None,
        pitch_fallback: PitchFallback | None = None,
    ) -> np.ndarray:
        """Speech (float32, 16 kHz) from a unit string or a units dict.

        ``seed`` fixes the choice of a common style when the units have pitch but no
        style (spec section 5). Expressive units without any pitch code are spoken with
        ``pitch_fallback`` (default: :meth:`pitch_fallback` without a prompt, the bundle's
        neutral pitch code), with a warning.
        """
        if self.has_pitch and pitch_fallback is None:
            pitch_fallback = self.pitch_fallback()
        if isinstance(units, str):
            units = string_to_units(units, rng=seed, pitch_fallback=pitch_fallback)
        if not isinstance(units, dict) or "hubert" not in units:
            raise UnitsError("decode() takes a unit string or a dict with a 'hubert' stream.")
        hubert = unit_ids(units["hubert"], "units['hubert']")
        if not hubert.size:
            raise UnitsError("There are no [Hu*] units to synthesise.")
        pitch = style = None
        if pitch_fallback is not None:  # Expressive
            # a dict without pitch (or style) follows the same rules as a string without them
            pitch = unit_ids(units.get("pitch", ()), "units['pitch']")
            if not pitch.size:
                pitch = np.full(hubert.size, pitch_fallback.take(hubert.size))
            style = unit_ids(units.get("style", ()), "units['style']")
            if not style.size:
                style = np.full(pitch.size, common_style(seed))
        return self.vocoder.decode(hubert, pitch=pitch, style=style, speaker_id=speaker_id, dur_pred=dur_pred)

    def decode_stream(
        self,
        unit_tokens: Iterable[str],
        speaker_id: int = 2,
        dur_pred: bool = True,
        chunk_frames: int | None = None,
        seed: int | None = None,
        first_chunk_frames: int | None = FIRST_CHUNK_FRAMES,
        pitch_fallback: PitchFallback | None = None,
    ) -> Iterator[np.ndarray]:
        """Audio chunks as unit tokens (``"[Hu12]"``, ``"[Pi3]"``, ...) arrive, e.g. from
        the LM's token stream. The concatenated chunks equal ``decode`` of the same units
        (``seed`` and ``pitch_fallback`` as there). The first chunk is short
        (``first_chunk_frames``, 40 ms each) so playback starts early; later ones are
        ``chunk_frames`` long (the vocoder's default when None)."""
        if self.has_pitch and pitch_fallback is None:
            pitch_fallback = self.pitch_fallback()
        # the variant tells the frame assembler not to wait for pitch and style that Base never has
        frames = iter_unit_frames(unit_tokens, rng=seed, variant=self.variant, pitch_fallback=pitch_fallback)
        if not self.has_pitch:
            frames = ((hubert, None, None) for hubert, _, _ in frames)
        kwargs = {} if chunk_frames is None else {"chunk_frames": chunk_frames}
        if first_chunk_frames is not None:
            kwargs["first_chunk_frames"] = min(first_chunk_frames, chunk_frames or first_chunk_frames)
        yield from self.vocoder.stream(frames, speaker_id=speaker_id, dur_pred=dur_pred, **kwargs)
