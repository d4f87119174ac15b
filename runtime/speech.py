"""``SpeechTokenizer``: speech <-> unit strings with the bundle's ONNX engines.

The method names are the reference's (``encode_units``, ``encode_string``, ``decode``),
so code written against Spirit LM's speech tokenizer runs unchanged::

    tokenizer = SpeechTokenizer.from_bundle("bundle/")
    units = tokenizer.encode_units("question.wav")   # {"hubert": "78 42 ...", ...}
    prompt = tokenizer("question.wav")               # "[Hu78][Hu42]..."
    audio = tokenizer.decode(prompt, speaker_id=2)   # float32, 16 kHz
    for chunk in tokenizer.decode_stream(iter_of_unit_tokens):
        play(chunk)

    encoder = StreamingEncoder(tokenizer)            # units while the user is still speaking
    new_tokens = encoder.advance(audio_so_far)       # "[Hu78][Hu42]..." final once returned
    new_tokens = encoder.finish(whole_turn_audio)
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from spiritlm_edge.runtime.audio import SAMPLE_RATE, AudioSource, load_audio
from spiritlm_edge.runtime.bundle import Bundle
from spiritlm_edge.runtime.errors import AudioError, UnitsError
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


# ------------------------------------------------------------------------------ streaming encoder


@dataclass(frozen=True)
class StreamingWindow:
    """Where :class:`StreamingEncoder` looks when it makes a chunk of units final.

    HuBERT attends over everything it is given, so the units of a chunk depend on the
    audio around it. Each chunk is encoded in a window of ``left_s`` before it and
    ``lookahead_s`` after it; once emitted its units never change. Defaults, and why:

    * ``step_s`` 1.0: the LM prefills the units of a chunk in one batch; a batch of ~25
      tokens keeps llama.cpp's prefill near its large-batch speed on a CPU (a handful of
      tokens costs almost a decode step each), and a window per second keeps HuBERT's
      share of two cores near 0.15 of real time.
    * ``lookahead_s`` 0.5: what is left to encode and prefill when the turn ends (with up
      to a step more), so it sets the floor of the latency; half a second holds the next
      two or three phones, the context that decides most units of a local model.
    * ``left_s`` 1.5: the positional convolution of HuBERT base spans 1.28 s each side;
      more left context costs encode time on every step.

    These are choices made without the released weights (random weights agree poorly
    whatever the window); ``spiritlm-edge agreement`` measures them on real checkpoints.
    Sizes are rounded up to the bundle's alignment: 40 ms (one HuBERT frame) for Base,
    1 s (one style code) for Expressive.
    """

    left_s: float = 1.5
    step_s: float = 1.0
    lookahead_s: float = 0.5

    def __post_init__(self) -> None:
        for name in ("left_s", "step_s", "lookahead_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise AudioError(f"StreamingWindow.{name} must be a number of seconds >= 0, not {value!r}.")
        if self.step_s <= 0:
            raise AudioError("StreamingWindow.step_s must be > 0 seconds.")


class StreamingEncoder:
    """The units of one turn while it is spoken: the bundle's encoders over a sliding window.

    :meth:`advance` takes the turn's audio so far and returns the prompt tokens
    (``"[Hu78][Hu42]..."``, with ``[Pi]``/``[St]`` for Expressive) that became final;
    :meth:`finish` takes the whole turn and returns the rest. Joined, they are exactly
    ``units_to_string`` of the streams' final codes (deduplicated across chunk seams as the
    whole-turn path does), so a prompt prefilled piece by piece is a prefix of the final one.

    A chunk ``[b0, b1)`` (multiples of the alignment, so every stream's frames start on a
    chunk boundary) is encoded from the window ``[b0 - left, b1 + lookahead)``; the codes
    of its frames are kept. Behind real time, one window covers several steps at once.
    ``finish`` encodes ``[b0 - left, end)`` and keeps everything from ``b0``: a turn too
    short for any step is encoded whole, exactly as the whole-turn path does.
    """

    def __init__(self, speech: SpeechTokenizer, window: StreamingWindow | None = None):
        self.speech = speech
        self.window = window or StreamingWindow()
        self.engines: dict[str, object] = {"hubert": speech.hubert}
        if speech.pitch is not None:
            self.engines["pitch"] = speech.pitch
        if speech.style is not None:
            self.engines["style"] = speech.style
        # samples per id of each stream; chunk boundaries are multiples of all of them
        self.hops = {name: round(SAMPLE_RATE / _rate(engine)) for name, engine in self.engines.items()}
        self.align = math.lcm(*self.hops.values())

        def aligned(seconds: float, minimum: int = 0) -> int:
            return max(minimum, -(-round(seconds * SAMPLE_RATE) // self.align) * self.align)

        self.left = aligned(self.window.left_s)
        self.step = aligned(self.window.step_s, self.align)
        self.lookahead = round(self.window.lookahead_s * SAMPLE_RATE)
        self.codes: dict[str, list[int]] = {name: [] for name in self.engines}
        self.final_samples = 0  # audio whose codes are final (a chunk boundary)
        self.text = ""  # the prompt tokens of the final codes
        self.windows = 0  # encoder windows run
        self.finished = False

    def copy(self) -> StreamingEncoder:
        """An independent copy of this turn's state (to finish a turn on trial)."""
        twin = copy.copy(self)
        twin.codes = {name: list(codes) for name, codes in self.codes.items()}
        return twin

    def ready(self, available: int) -> bool:
        """Whether :meth:`advance` would make a chunk final with ``available`` samples."""
        return self._next_boundary(available) > self.final_samples

    def _next_boundary(self, available: int) -> int:
        steps = (available - self.lookahead - self.final_samples) // self.step
        return self.final_samples + max(0, steps) * self.step

    def advance(self, audio: np.ndarray) -> str:
        """Encode the chunks of ``audio`` (the turn so far, from its first sample) that have
        their look-ahead; return the prompt tokens that became final (often "")."""
        self._check_open()
        end = self._next_boundary(len(audio))
        if end <= self.final_samples:
            return ""
        return self._encode(audio[: end + self.lookahead], end)

    def finish(self, audio: np.ndarray) -> str:
        """The turn is over: encode what is left of ``audio`` (the whole turn) and return its
        tokens. ``audio`` must begin with the audio given to :meth:`advance`."""
        self._check_open()
        if len(audio) < self.final_samples:
            raise AudioError(
                f"The turn's audio ({len(audio)} samples) is shorter than what was already encoded "
                f"({self.final_samples}): pass the whole turn, from its first sample."
            )
        self.finished = True
        return self._encode(audio, None)

    def _check_open(self) -> None:
        if self.finished:
            raise AudioError("This StreamingEncoder has finished its turn: start a new one for the next turn.")

    def _encode(self, audio: np.ndarray, end: int | None) -> str:
        """Encode ``audio[start - left:]`` and keep the codes of frames in ``[start, end)``
        (to the end of what the engines return when ``end`` is None)."""
        start = self.final_samples
        origin = max(0, start - self.left)
        window = np.ascontiguousarray(audio[origin:], dtype=np.float32)
        for name, engine in self.engines.items():
            hop = self.hops[name]
            codes = engine(window) if window.size else np.zeros(0, np.int64)  # type: ignore[operator]
            first = (start - origin) // hop
            last = len(codes) if end is None else min(len(codes), (end - origin) // hop)
            self.codes[name].extend(int(c) for c in codes[first:last])
        self.windows += 1
        self.final_samples = len(audio) if end is None else end
        speech = self.speech
        text = units_to_string(self.codes, has_pitch=speech.has_pitch, has_style=speech.has_style)
        if not text.startswith(self.text):
            # cannot happen below 100 s of turn (see units_to_string's time rule); say so if it does
            raise UnitsError("The streamed units reordered across a chunk seam (a turn over 100 s?).")
        new, self.text = text[len(self.text) :], text
        return new

    def encode_string(self, audio: AudioSource, sample_rate: int | None = None) -> str:
        """The prompt string of a whole recording, encoded as if it were being spoken: one
        :meth:`advance` per step as the audio "arrives", then :meth:`finish` (what a live
        turn gets when the encoder keeps up with real time). Uses up this encoder."""
        samples = load_audio(audio, sample_rate)
        for arrived in range(self.step + self.lookahead, len(samples) + 1, self.step):
            self.advance(samples[:arrived])
        self.finish(samples)
        return self.text

    def units(self) -> dict[str, str]:
        """The final codes so far, as :meth:`SpeechTokenizer.encode_units` gives them."""
        return {name: " ".join(map(str, codes)) for name, codes in self.codes.items()}


def _rate(engine: object) -> float:
    rate = getattr(engine, "rate", None)  # the pitch engine's codes per second
    return float(rate if rate is not None else engine.rate_hz)  # type: ignore[attr-defined]
