"""``SpiritLM``: the reference's ``Spiritlm.generate`` on a bundle, plus streaming.

::

    from spiritlm_edge import SpiritLM, OutputModality

    spirit_lm = SpiritLM("bundle/")
    outputs = spirit_lm.generate(
        interleaved_inputs=[("SPEECH", "question.wav")],
        output_modality=OutputModality.SPEECH,
        max_new_tokens=200,
    )
    outputs[0].content            # float32 16 kHz waveform

    for event in spirit_lm.generate_stream([("SPEECH", "question.wav")], output_modality="SPEECH"):
        ...                       # TextDelta, AudioChunk as they are ready, then TurnEnd

Sampling follows the reference: greedy by default; ``do_sample=True`` (or a
``generation_config``) samples as transformers would, see ``runtime/sampling.py``.

Prompt building, forbidden tokens and the decoding of the generated string follow the
spec (sections 3, 2 and 7) through ``runtime/units.py``; token ids come from our own
tokenizer (``runtime/tokenizer.py``), never from llama.cpp's.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from spiritlm_edge.runtime.audio import SAMPLE_RATE
from spiritlm_edge.runtime.bundle import Bundle
from spiritlm_edge.runtime.errors import BundleError, ModelError
from spiritlm_edge.runtime.events import AudioChunk, TextDelta, TurnEnd
from spiritlm_edge.runtime.lm import LanguageModel
from spiritlm_edge.runtime.sampling import SamplingConfig
from spiritlm_edge.runtime.speech import SpeechTokenizer, StreamingEncoder, StreamingWindow
from spiritlm_edge.runtime.units import (
    SPEECH_PREFIX,
    TEXT_PREFIX,
    OutputModality,
    build_prompt,
    count_hubert_units,
    does_end_with_speech_token,
    does_start_with_speech_token,
    find_prompt_last_speech_start_position,
    split_speech_and_text,
)

log = logging.getLogger(__name__)

# Spec section 7: a generated speech chunk shorter than this many Hubert units is dropped.
MIN_SPEECH_UNITS = 25

# How speech inputs become units: "whole" encodes each input at once, as the reference does;
# "streaming" encodes it in sliding windows whose units are final once emitted, which is what
# lets a live turn be encoded and prefilled while the user is still speaking (Listening).
SPEECH_ENCODINGS = ("whole", "streaming")

# A cancelled or finished Listening stops after at most this many tokens of prefill.
PREFILL_SLICE_TOKENS = 64


def check_speech_encoding(value: str) -> str:
    if value not in SPEECH_ENCODINGS:
        raise ModelError(f"speech_encoding must be one of {', '.join(SPEECH_ENCODINGS)}, not {value!r}.")
    return value


class ContentType(Enum):
    TEXT = "TEXT"
    SPEECH = "SPEECH"


@dataclass
class GenerationInput:
    """One piece of an interleaved prompt: text, or speech as a path or an array."""

    content: Any
    content_type: ContentType

    @classmethod
    def from_tuple(cls, item: tuple) -> GenerationInput:
        content_type, content = item
        try:
            content_type = ContentType(str(getattr(content_type, "value", content_type)).upper())
        except ValueError:
            raise ModelError(f"Content type {content_type!r} is neither 'TEXT' nor 'SPEECH'.") from None
        return cls(content=content, content_type=content_type)


@dataclass
class GenerationOutput:
    """One piece of the answer: ``content`` is a str (TEXT) or a float32 16 kHz array (SPEECH)."""

    content: str | np.ndarray
    content_type: ContentType


# The reference's spelling, kept so that code written against it runs unchanged.
GenerationOuput = GenerationOutput


def _as_inputs(interleaved_inputs) -> list[GenerationInput]:
    if interleaved_inputs is None:
        return []
    if isinstance(interleaved_inputs, (GenerationInput, tuple)):
        interleaved_inputs = [interleaved_inputs]
    items = []
    for item in interleaved_inputs:
        if isinstance(item, GenerationInput):
            items.append(item)
        elif isinstance(item, tuple) and len(item) == 2:
            items.append(GenerationInput.from_tuple(item))
        else:
            raise ModelError(
                "Each interleaved input is a GenerationInput or a (content_type, content) tuple, "
                f"got {type(item).__name__}."
            )
    return items


class SpiritLM:
    """A Spirit LM bundle: speech engines + language model, with the reference's API."""

    # the reference's names for the modality markers (its eval code builds prompts with them)
    TEXT_PROMPT_PREFIX = TEXT_PREFIX
    SPEECH_PROMPT_PREFIX = SPEECH_PREFIX

    def __init__(
        self,
        bundle: str | os.PathLike | Bundle,
        providers: Sequence[str] | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int | None = None,
        n_ctx: int = 2048,
        **lm_options: Any,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.speech_tokenizer = SpeechTokenizer(self.bundle, providers=providers, n_threads=n_threads)
        self.lm = LanguageModel.from_bundle(
            self.bundle, n_threads=n_threads, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, **lm_options
        )
        self.tokenizer = self.lm.tokenizer
        if self.tokenizer.vocab.variant != self.bundle.variant:
            raise BundleError(
                f"Bundle {self.bundle.dir} says it is {self.bundle.variant} but its LM has a "
                f"{self.tokenizer.vocab.variant} vocabulary: the bundle mixes parts of two builds. Rebuild it."
            )

    @property
    def variant(self) -> str:
        return self.bundle.variant

    @property
    def is_expressive_model(self) -> bool:
        return self.variant == "expressive"

    # -- prompt ---------------------------------------------------------------------------

    def build_prompt(self, interleaved_inputs, output_modality="ARBITRARY", speech_encoding: str = "whole") -> str:
        """The prompt string for ``interleaved_inputs`` (speech is encoded to units here)."""
        modality = OutputModality.parse(output_modality)
        segments = self.encode_inputs(interleaved_inputs, speech_encoding)
        return build_prompt(segments, modality, vocab=self.tokenizer.vocab)

    def encode_inputs(
        self, interleaved_inputs, speech_encoding: str = "whole", window: StreamingWindow | None = None
    ) -> list[tuple[str, str]]:
        """``("TEXT", text)`` / ``("SPEECH", unit string)`` segments for the prompt grammar:
        speech is encoded to units (see ``SPEECH_ENCODINGS``; ``window`` sizes the streaming
        encoder); text must be a str (nothing is converted silently)."""
        check_speech_encoding(speech_encoding)
        segments = []
        for item in _as_inputs(interleaved_inputs):
            if item.content_type is ContentType.SPEECH:
                if speech_encoding == "streaming":
                    units = StreamingEncoder(self.speech_tokenizer, window).encode_string(item.content)
                else:
                    units = self.speech_tokenizer.encode_string(item.content)
                segments.append(("SPEECH", units))
            elif isinstance(item.content, str):
                segments.append(("TEXT", item.content))
            else:
                raise ModelError(
                    f"TEXT content must be a str, got {type(item.content).__name__}: convert it yourself "
                    "(or pass speech as ('SPEECH', audio))."
                )
        return segments

    def _prompt_and_bans(
        self, interleaved_inputs, prompt, output_modality, force_tokens_to_output_modality, speech_encoding="whole"
    ):
        modality = OutputModality.parse(output_modality)
        inputs = _as_inputs(interleaved_inputs)
        if prompt is None and not inputs:
            raise ModelError("Give interleaved_inputs or prompt: there is nothing to continue.")
        if prompt is not None and inputs:
            log.warning("prompt is given: interleaved_inputs are not used (as in the reference)")
        if prompt is None:
            prompt = self.build_prompt(inputs, modality, speech_encoding)
        # The LM bans spec section 2's tokens for this modality inside llama.cpp's sampler.
        constraint = modality if force_tokens_to_output_modality else OutputModality.ARBITRARY
        return modality, prompt, constraint

    # -- offline --------------------------------------------------------------------------

    def generate(
        self,
        interleaved_inputs=None,
        prompt: str | None = None,
        output_modality: OutputModality | str = OutputModality.ARBITRARY,
        generation_config: Any = None,
        force_tokens_to_output_modality: bool = True,
        speaker_id: int = 2,
        return_prompt: bool = False,
        seed: int | None = None,
        speech_encoding: str = "whole",
        **kwargs: Any,
    ):
        """Continue a speech/text prompt; returns a list of :class:`GenerationOutput`
        (and the prompt string when ``return_prompt``), like the reference.

        ``generation_config`` (a transformers ``GenerationConfig``, a dict, any object with
        those attribute names, or a :class:`SamplingConfig`) and ``kwargs`` (its attribute
        names: max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
        max_length) choose the sampling, as in the reference: greedy by default,
        transformers' temperature 1.0 / top-k 50 / top-p 1.0 with ``do_sample=True``.
        Options llama.cpp cannot reproduce (beams, min_p, ...) are refused by name.
        ``max_new_tokens`` defaults to 200 (the reference's 20 tokens in all would not
        hold a second of speech). ``speech_encoding="streaming"`` encodes speech inputs the
        way a live turn is encoded while it is spoken (see ``SPEECH_ENCODINGS``); the
        default, "whole", gives the reference's units.
        """
        sampling = self.sampling_config(generation_config, seed, kwargs)
        modality, prompt, constraint = self._prompt_and_bans(
            interleaved_inputs, prompt, output_modality, force_tokens_to_output_modality, speech_encoding
        )
        ids = self.tokenizer.encode(prompt)
        new_ids = list(self.lm.generate(ids, sampling=sampling, output_modality=constraint))
        generated = self.tokenizer.decode(new_ids)
        # one per turn: speech without pitch codes continues the prompt's pitch (spec section 5)
        fallback = self.speech_tokenizer.pitch_fallback(prompt)
        outputs = self._decode_generated(modality, generated, prompt, speaker_id, sampling.seed, fallback)
        return (outputs, prompt) if return_prompt else outputs

    @staticmethod
    def sampling_config(
        generation_config: Any = None, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> SamplingConfig:
        """The :class:`SamplingConfig` of ``generate(generation_config=..., seed=..., **options)``."""
        options = dict(options or {})
        if seed is not None:
            options["seed"] = seed
        return SamplingConfig.from_generation_config(generation_config, **options)

    def _decode_generated(
        self, modality, generated: str, prompt: str, speaker_id: int, seed, fallback=None
    ) -> list[GenerationOutput]:
        """Spec section 7: the generated string -> text and speech outputs."""
        generated = generated.strip()
        if modality is OutputModality.TEXT:
            return [GenerationOutput(generated, ContentType.TEXT)]
        if modality is OutputModality.SPEECH:
            # Only unit tokens can be spoken; text appears here only when the constraint
            # was turned off (force_tokens_to_output_modality=False), and is left out.
            spoken = "".join(c for c, kind in split_speech_and_text(generated) if kind == "s")
            return [GenerationOutput(self._speech(spoken, speaker_id, seed, fallback), ContentType.SPEECH)]
        continues_prompt = does_end_with_speech_token(prompt) and does_start_with_speech_token(generated)
        prompt_units = 0
        if continues_prompt:
            # The continuation usually lacks the pitch and style tokens that the prompt's
            # speech carries: decode both together, then cut the prompt's share.
            prompt_speech = prompt[find_prompt_last_speech_start_position(prompt) :]
            prompt_units = count_hubert_units(prompt_speech)
            generated = prompt_speech + generated
        outputs = []
        for index, (content, kind) in enumerate(split_speech_and_text(generated)):
            if kind == "t":
                outputs.append(GenerationOutput(content, ContentType.TEXT))
                continue
            units = count_hubert_units(content)
            if index == 0 and continues_prompt:
                if units - prompt_units < MIN_SPEECH_UNITS:
                    continue
                audio = self._speech(content, speaker_id, seed, fallback)
                audio = audio[math.ceil(audio.size * prompt_units / units) :]
            elif units < MIN_SPEECH_UNITS:
                continue
            else:
                audio = self._speech(content, speaker_id, seed, fallback)
            outputs.append(GenerationOutput(audio, ContentType.SPEECH))
        return outputs

    def _speech(self, units: str, speaker_id: int, seed, fallback=None) -> np.ndarray:
        if count_hubert_units(units) == 0:
            return np.zeros(0, np.float32)
        return self.speech_tokenizer.decode(units, speaker_id=speaker_id, seed=seed, pitch_fallback=fallback)

    # -- streaming ------------------------------------------------------------------------

    def generate_stream(
        self,
        interleaved_inputs=None,
        prompt: str | None = None,
        output_modality: OutputModality | str = OutputModality.ARBITRARY,
        generation_config: Any = None,
        force_tokens_to_output_modality: bool = True,
        speaker_id: int = 2,
        seed: int | None = None,
        chunk_frames: int | None = None,
        speech_encoding: str = "whole",
        **kwargs: Any,
    ) -> Generator[TextDelta | AudioChunk | TurnEnd, None, None]:
        """Like :meth:`generate`, but yields events as they happen: :class:`TextDelta`
        for new text, :class:`AudioChunk` as soon as the streaming vocoder has audio, then
        one :class:`TurnEnd` with the per-stage timings. Sampling (``generation_config``,
        ``seed``, keywords) is chosen as in :meth:`generate`.

        A speech chunk starts playing once it has 25 Hubert units (shorter ones are
        dropped, spec section 7). When the prompt ends in speech and the answer continues
        it, the prompt's speech primes the vocoder and its audio is not emitted.
        """
        sampling = self.sampling_config(generation_config, seed, kwargs)
        seed = sampling.seed
        turn = _TurnTimer()
        modality, prompt, constraint = self._prompt_and_bans(
            interleaved_inputs, prompt, output_modality, force_tokens_to_output_modality, speech_encoding
        )
        turn.mark("encode")
        ids = self.tokenizer.encode(prompt)
        turn.mark("tokenize")
        turn.counts["prompt_tokens"] = len(ids)
        tokens = _TimedTokens(self.lm.generate(ids, sampling=sampling, output_modality=constraint), turn)
        pieces = _Pieces(self.tokenizer, tokens)
        arbitrary = modality is OutputModality.ARBITRARY
        # Same rules as generate(): only ARBITRARY drops short runs and continues the
        # prompt's speech; SPEECH speaks every unit it gets.
        prime = _speech_context(prompt) if arbitrary and does_end_with_speech_token(prompt) else ""
        audio_parts: list[np.ndarray] = []
        fallback = self.speech_tokenizer.pitch_fallback(prompt)  # one per turn, as in generate()
        first = True
        for kind, value in pieces:
            if kind == "unit" and modality is OutputModality.TEXT:
                kind = "text"  # unconstrained TEXT output keeps unit tokens as text, like generate()
            if kind == "text":
                if first and not value.strip():
                    continue  # the answer's leading whitespace is stripped, as in the reference
                yield TextDelta(value.lstrip() if first else value)
                first = False
                continue
            run = [value]
            if arbitrary:
                run += pieces.take_units(MIN_SPEECH_UNITS - count_hubert_units(value))
                if count_hubert_units("".join(run)) < MIN_SPEECH_UNITS:
                    first = False
                    continue  # too short to speak (spec section 7)
            run_prime, first = (prime if first else ""), False
            for chunk in self._stream_run(run_prime, run, pieces, speaker_id, seed, chunk_frames, turn, fallback):
                audio_parts.append(chunk)
                yield AudioChunk(chunk)
        turn.mark("end")
        # The turn's text, exactly as generate() would give it.
        generated = self.tokenizer.decode(pieces.all_ids).strip()
        text = "".join(c for c, k in split_speech_and_text(generated) if k == "t")
        audio = np.concatenate(audio_parts) if audio_parts else None
        yield TurnEnd(timings=turn.report(audio), text=text, audio=audio, generated=generated)

    def _stream_run(
        self, prime, run, pieces, speaker_id, seed, chunk_frames, turn, fallback=None
    ) -> Iterator[np.ndarray]:
        """Stream one speech run through the vocoder; ``prime`` (the prompt's trailing
        speech) gives the vocoder its context, and its audio is skipped."""
        skip_samples = 0
        if prime:
            prime_audio = self.speech_tokenizer.decode(prime, speaker_id=speaker_id, seed=seed, pitch_fallback=fallback)
            skip_samples = prime_audio.size
        tokens = iter([prime] if prime else [])
        stream = self.speech_tokenizer.decode_stream(
            _chain(tokens, run, pieces.iter_units()),
            speaker_id=speaker_id,
            seed=seed,
            chunk_frames=chunk_frames,
            pitch_fallback=fallback,
        )
        for chunk in turn.time_vocoder(stream):
            if skip_samples >= chunk.size:
                skip_samples -= chunk.size
                continue
            chunk, skip_samples = chunk[skip_samples:], 0
            turn.first_audio()
            yield chunk


# The reference's class name: code written against it changes only its import line.
Spiritlm = SpiritLM


def _speech_context(prompt: str, hubert_units: int = 50) -> str:
    """The last ``hubert_units`` units of the prompt's trailing speech, led by the pitch
    and style in force there: enough left context for the streaming vocoder to continue
    the prompt's voice without re-synthesising all of it."""
    speech = prompt[find_prompt_last_speech_start_position(prompt) :]
    tokens = re.findall(r"\[(?:Hu|Pi|St)\d+\]", speech)
    hubert_positions = [i for i, t in enumerate(tokens) if t.startswith("[Hu")]
    if len(hubert_positions) <= hubert_units:
        return "".join(tokens)
    cut = hubert_positions[-hubert_units]
    lead = []
    for prefix in ("[St", "[Pi"):
        earlier = [t for t in tokens[:cut] if t.startswith(prefix)]
        if earlier:
            lead.append(earlier[-1])
    return "".join(lead + tokens[cut:])


def _chain(*iterables: Iterable[str]) -> Iterator[str]:
    for iterable in iterables:
        yield from iterable


class _TimedTokens:
    """Wraps the LM's token iterator, charging the time spent in it to prefill (first
    token) and decode (the rest)."""

    def __init__(self, tokens: Iterator[int], turn: _TurnTimer):
        self.tokens, self.turn = tokens, turn

    def __iter__(self):
        return self

    def __next__(self) -> int:
        start = time.perf_counter()
        try:
            token = next(self.tokens)
        except StopIteration:
            self.turn.charge_lm(time.perf_counter() - start, produced=False)
            raise
        self.turn.charge_lm(time.perf_counter() - start, produced=True)
        return token


class _Pieces:
    """The LM's token ids as ("text", delta) / ("unit", "[Hu12]") pieces, with a one-piece
    look-ahead so that a speech run can be handed to the vocoder as an iterator.

    Text deltas come from re-decoding the current text run and taking what is new, so
    that SentencePiece's spaces and multi-byte characters come out right; ``all_ids``
    keeps every generated id for the exact final decode.
    """

    def __init__(self, tokenizer, tokens: Iterator[int]):
        self.tokenizer = tokenizer
        self.vocab = tokenizer.vocab
        self.tokens = tokens
        self.all_ids: list[int] = []
        self.run_ids: list[int] = []  # ids of the current text run
        self.run_text = ""  # what has been emitted of it
        self.peeked: tuple[str, str] | None = None
        self.held: tuple[str, str] | None = None

    def _next_piece(self) -> tuple[str, str] | None:
        if self.held is not None:
            piece, self.held = self.held, None
            return piece
        for token_id in self.tokens:
            self.all_ids.append(token_id)
            if self.vocab.unit_of(token_id) is not None:
                unit = ("unit", self.tokenizer.id_to_token(token_id))
                rest = self._end_text_run()
                if rest:
                    self.held = unit
                    return ("text", rest)
                return unit
            if token_id in (self.vocab.text_id, self.vocab.speech_id):
                continue  # modality markers are dropped (spec section 7)
            self.run_ids.append(token_id)
            text = self.tokenizer.decode(self.run_ids)
            if text.endswith("\ufffd"):
                continue  # wait for the rest of a multi-byte character
            delta, self.run_text = text[len(self.run_text) :], text
            if delta:
                return ("text", delta)
        rest = self._end_text_run()
        return ("text", rest) if rest else None

    def _end_text_run(self) -> str:
        text = self.tokenizer.decode(self.run_ids) if self.run_ids else ""
        rest = text[len(self.run_text) :]
        self.run_ids, self.run_text = [], ""
        return rest

    def peek(self):
        if self.peeked is None:
            self.peeked = self._next_piece()
        return self.peeked

    def __iter__(self):
        return self

    def __next__(self):
        piece = self.peek()
        self.peeked = None
        if piece is None:
            raise StopIteration
        return piece

    def more_units(self) -> bool:
        piece = self.peek()
        return piece is not None and piece[0] == "unit"

    def take_units(self, hubert_units: int) -> list[str]:
        """Up to ``hubert_units`` more Hubert units of the current run (with any pitch and
        style tokens among them)."""
        taken: list[str] = []
        while count_hubert_units("".join(taken)) < hubert_units and self.more_units():
            taken.append(next(self)[1])
        return taken

    def iter_units(self) -> Iterator[str]:
        while self.more_units():
            yield next(self)[1]


class _TurnTimer:
    """Per-stage wall-clock timings of one turn."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.lm_seconds = 0.0
        self.new_tokens = 0
        self.vocoder_seconds = 0.0
        self.first_audio_at: float | None = None
        self.first_token_seconds: float | None = None

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = now - self.last
        self.last = now

    def charge_lm(self, seconds: float, produced: bool) -> None:
        if self.first_token_seconds is None:
            self.first_token_seconds = seconds  # prefill + the first sampled token
        self.new_tokens += produced
        self.lm_seconds += seconds

    def time_vocoder(self, stream: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """Time spent producing chunks, less the LM time spent inside (the vocoder pulls
        tokens from the LM as it goes)."""
        while True:
            lm_before, start = self.lm_seconds, time.perf_counter()
            try:
                chunk = next(stream)
            except StopIteration:
                self.vocoder_seconds += time.perf_counter() - start - (self.lm_seconds - lm_before)
                return
            self.vocoder_seconds += time.perf_counter() - start - (self.lm_seconds - lm_before)
            yield chunk

    def first_audio(self) -> None:
        if self.first_audio_at is None:
            self.first_audio_at = time.perf_counter() - self.start

    def report(self, audio: np.ndarray | None) -> dict[str, float]:
        new_tokens = self.new_tokens
        decode = self.lm_seconds - (self.first_token_seconds or 0.0)
        timings = {
            "encode_s": self.stages.get("encode", 0.0),
            "tokenize_s": self.stages.get("tokenize", 0.0),
            "prefill_s": self.first_token_seconds or 0.0,
            "decode_s": decode,
            "vocoder_s": self.vocoder_seconds,
            "total_s": time.perf_counter() - self.start,
            "prompt_tokens": self.counts.get("prompt_tokens", 0),
            "new_tokens": max(new_tokens, 0),
            "decode_tokens_per_s": (new_tokens - 1) / decode if new_tokens > 1 and decode > 0 else 0.0,
            "audio_s": 0.0 if audio is None else audio.size / SAMPLE_RATE,
        }
        if self.first_audio_at is not None:
            timings["first_audio_s"] = self.first_audio_at
        return timings


class Conversation:
    """A multi-turn exchange that keeps the LM's state between turns.

    The dialogue is one growing prompt (user inputs and the model's answers, joined by
    the prompt grammar of spec section 3). The LM keeps its KV cache and only prefills
    what a new turn adds. When the dialogue no longer fits the context with room for the
    answer, the oldest segments are dropped and the cache is rebuilt: the first time is
    a warning, the rest is logged at debug level, and each turn's timings report
    ``dropped_segments``.

    ``sampling`` (a :class:`SamplingConfig`, or anything ``generate``'s
    ``generation_config`` takes) and ``options`` (its field names, ``seed`` included)
    set every turn's sampling; a turn's own options change it for that turn.
    """

    def __init__(
        self,
        spirit_lm: SpiritLM,
        output_modality="ARBITRARY",
        speaker_id: int = 2,
        sampling: Any = None,
        **options: Any,
    ):
        self.spirit_lm = spirit_lm
        self.output_modality = OutputModality.parse(output_modality)
        self.speaker_id = speaker_id
        self.sampling = SamplingConfig.from_generation_config(sampling, **options)
        self.segments: list[tuple[str, str]] = []  # ("TEXT"|"SPEECH", text or unit string)
        self.overflow_warned = False

    def _fit(
        self, segments: list[tuple[str, str]], modality: OutputModality, sampling: SamplingConfig
    ) -> tuple[str, list[int], int]:
        """The prompt of ``segments`` less as many of its oldest segments as the context
        needs dropped (at least the newest one is kept); returns it, its token ids and that count."""
        tokenizer, n_ctx = self.spirit_lm.tokenizer, self.spirit_lm.lm.n_ctx
        dropped = 0
        while True:
            prompt = build_prompt(segments[dropped:], modality, vocab=tokenizer.vocab)
            ids = tokenizer.encode(prompt)
            n_tokens = len(ids)
            if n_tokens + sampling.new_token_limit(n_tokens) <= n_ctx or len(segments) - dropped <= 1:
                break
            log.debug(
                "conversation: %d prompt tokens + the answer exceed the %d-token context: "
                "dropping its oldest segment (%s)",
                n_tokens,
                n_ctx,
                segments[dropped][0],
            )
            dropped += 1
        if dropped and not self.overflow_warned:
            self.overflow_warned = True
            log.warning(
                "the conversation outgrew the %d-token context: its oldest segments are dropped "
                "from now on (each turn's timings report how many)",
                n_ctx,
            )
        return prompt, ids, dropped

    def stream(
        self, interleaved_inputs, output_modality=None, speech_encoding: str = "whole", **options: Any
    ) -> Generator[TextDelta | AudioChunk | TurnEnd, None, None]:
        """One turn: the user's inputs in, the answer's events out (see ``generate_stream``)."""
        return self._answer(self.spirit_lm.encode_inputs(interleaved_inputs, speech_encoding), output_modality, options)

    def _answer(
        self,
        user_segments: list[tuple[str, str]],
        output_modality=None,
        options: dict[str, Any] | None = None,
        timings: dict[str, float] | None = None,
    ) -> Generator[TextDelta | AudioChunk | TurnEnd, None, None]:
        """The answer to encoded user segments; ``timings`` join the TurnEnd's."""
        modality = OutputModality.parse(output_modality or self.output_modality)
        sampling = SamplingConfig.from_generation_config(None, base=self.sampling, **(options or {}))
        segments = self.segments + user_segments
        prompt, _, dropped = self._fit(segments, modality, sampling)
        segments = segments[dropped:]
        for event in self.spirit_lm.generate_stream(
            prompt=prompt, output_modality=modality, speaker_id=self.speaker_id, generation_config=sampling
        ):
            if isinstance(event, TurnEnd):
                answer = [
                    ("TEXT" if kind == "t" else "SPEECH", content)
                    for content, kind in split_speech_and_text(event.generated)
                ]
                self.segments = segments + answer
                event.timings["dropped_segments"] = dropped
                event.timings.update(timings or {})
            yield event

    def listen(
        self, window: StreamingWindow | None = None, after: threading.Thread | None = None, model_lock: Any = None
    ) -> Listening:
        """Start a spoken user turn that is encoded and prefilled while it lasts; see
        :class:`Listening`. ``after``: a thread still using the model (an abandoned answer)
        that the prefill waits for; ``model_lock``: a lock the prefill must hold (a server's)."""
        return Listening(self, window, after, model_lock)

    def turn(self, interleaved_inputs, output_modality=None, **options: Any) -> TurnEnd:
        """One turn, waiting for the whole answer; returns its :class:`TurnEnd`."""
        for event in self.stream(interleaved_inputs, output_modality, **options):
            if isinstance(event, TurnEnd):
                return event
        raise AssertionError("generate_stream ended without a TurnEnd")  # it always ends with one

    def respond(self, user_audio) -> Iterator[TextDelta | AudioChunk | TurnEnd]:
        """A spoken user turn -> the answer's events: the callable the live loop takes."""
        return self.stream([("SPEECH", user_audio)])

    def reset(self) -> None:
        self.segments = []
        self.overflow_warned = False


class Listening:
    """A user turn being spoken, encoded and prefilled while it lasts (``speech_encoding``
    "streaming"): the live loop's and the server's way to answer soon after the user stops.

    ::

        listening = conversation.listen()
        for block in microphone:                  # any thread; never waits for the model
            listening.feed(block)
        for event in listening.respond():         # the turn is over: the answer's events
            ...

    A worker thread runs :class:`~spiritlm_edge.runtime.speech.StreamingEncoder` over the
    audio as it arrives and prefills the LM with each chunk of final units (the dialogue so
    far plus the turn's units: a prefix of the prompt the answer will have, so the answer's
    own prefill only evaluates the rest). At the end only the last chunk is left to encode
    and prefill. The worker is bounded (it handles the audio it has, then waits; behind real
    time it encodes several steps in one window) and cancellable (:meth:`cancel` stops it
    after at most ``PREFILL_SLICE_TOKENS`` tokens of prefill). Audio is never dropped:
    ``feed`` only appends.

    ``feed(samples, committed=n)``: of the turn's audio so far, only the first ``n``
    samples are sure to be in the turn (a turn detector trims trailing silence): units are
    made final only there.

    The trailing silence is used too: when ``committed`` stops growing while audio still
    comes (the user has paused; a turn detector keeps only ``pad_ms`` of the silence), the
    worker finishes the turn on trial, as if it ended there, and prefills that. If it does
    end there, :meth:`respond` finds the last chunk encoded and prefilled already; if the
    user goes on, the trial is dropped (the next prefill rewinds the cache past it).
    """

    def __init__(
        self,
        conversation: Conversation,
        window: StreamingWindow | None = None,
        after: threading.Thread | None = None,
        model_lock: Any = None,
    ):
        self.conversation = conversation
        # a server's lock on the shared model: prefill only while nobody else's turn holds it
        self._model_lock = model_lock
        self.encoder = StreamingEncoder(conversation.spirit_lm.speech_tokenizer, window)
        self._audio: list[np.ndarray] = []
        self._samples = 0
        self._committed = 0
        self._state = "listening"  # then "responding" or "cancelled"
        self._wake = threading.Condition()
        self._error: BaseException | None = None
        self._idle = False  # the worker waits for audio
        self._stalled = False  # audio comes but the committed part stopped growing: a pause
        self._trial: tuple[int, StreamingEncoder] | None = None  # the turn finished at that length
        self._after = after
        self.stats: dict[str, float] = {"prefilled_tokens": 0, "encode_s": 0.0, "prefill_s": 0.0, "windows": 0}
        self.thread = threading.Thread(target=self._run, name="listening", daemon=True)
        self.thread.start()

    # -- any thread -------------------------------------------------------------------

    def feed(self, samples: np.ndarray, committed: int | None = None) -> None:
        """Append 16 kHz mono audio to the turn (copied; cheap, never blocks on the model)."""
        block = np.array(samples, dtype=np.float32).reshape(-1)
        with self._wake:
            if self._state != "listening":
                return
            self._audio.append(block)
            self._samples += block.size
            before = self._committed
            self._committed = self._samples if committed is None else max(0, min(int(committed), self._samples))
            self._stalled = block.size > 0 and self._committed == before
            self._idle = self._idle and not self._has_work()
            self._wake.notify_all()

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until the worker has encoded and prefilled all it can of the audio fed so far
        (for tests and benchmarks that pace the audio); False on timeout."""
        with self._wake:
            return self._wake.wait_for(lambda: self._idle or not self.thread.is_alive(), timeout)

    def cancel(self) -> None:
        """Drop the turn (speech that was not a turn, or the session ends). Returns at once;
        the worker stops after its current step (join :attr:`thread` to wait for it)."""
        with self._wake:
            self._state = "cancelled"
            self._wake.notify_all()

    # -- the worker ---------------------------------------------------------------------

    def _has_work(self) -> bool:
        """A chunk is ready, or a pause calls for a trial finish not made yet (lock held)."""
        if self.encoder.ready(self._committed):
            return True
        trial_at = self._trial[0] if self._trial is not None else -1
        return self._stalled and self._committed > self.encoder.final_samples and trial_at != self._committed

    def _turn_audio(self) -> np.ndarray:
        """The turn's audio so far, as one array (held by the lock's owner)."""
        if len(self._audio) > 1:
            self._audio = [np.concatenate(self._audio)]
        return self._audio[0] if self._audio else np.zeros(0, np.float32)

    def _run(self) -> None:
        try:
            if self._after is not None:
                self._after.join()  # an abandoned answer still decoding: the model is its until then
            while True:
                with self._wake:
                    while self._state == "listening" and not self._has_work():
                        self._idle = True
                        self._wake.notify_all()
                        self._wake.wait()
                    self._idle = False
                    if self._state != "listening":
                        return
                    audio = self._turn_audio()[: self._committed]
                    trial = not self.encoder.ready(len(audio))
                started = time.perf_counter()
                if trial:
                    finished = self.encoder.copy()
                    finished.finish(audio)
                    self._trial = (len(audio), finished)
                    text = finished.text
                else:
                    text = self.encoder.text if self.encoder.advance(audio) else ""
                self.stats["encode_s"] += time.perf_counter() - started
                self.stats["windows"] += 1
                if text:
                    self._prefill(text)
        except BaseException as exc:  # raised again by respond(), in the caller's thread
            self._error = exc

    def _prefill(self, units: str) -> None:
        lock = self._model_lock
        if lock is None:
            self._prefill_prompt(units)
        elif lock.acquire(blocking=False):
            try:
                self._prefill_prompt(units)
            finally:
                lock.release()
        else:  # another turn has the model: the answer's own prefill will catch up
            log.debug("listening: the model is busy, prefill skipped for this step")

    def _prefill_prompt(self, units: str) -> None:
        conversation = self.conversation
        segments = conversation.segments + [("SPEECH", units)]
        # ARBITRARY: no trailing modality marker, so this prompt is a prefix of the answer's
        _, ids, _ = conversation._fit(segments, OutputModality.ARBITRARY, conversation.sampling)
        lm = conversation.spirit_lm.lm
        done = lm.cached_prefix(ids)
        while done < len(ids) and self._state == "listening":
            end = min(len(ids), done + PREFILL_SLICE_TOKENS)
            started = time.perf_counter()
            lm.prefill(ids[:end])
            self.stats["prefill_s"] += time.perf_counter() - started
            self.stats["prefilled_tokens"] += end - done
            done = end

    # -- the end of the turn ---------------------------------------------------------------

    def respond(
        self, audio: np.ndarray | None = None, output_modality=None, **options: Any
    ) -> Generator[TextDelta | AudioChunk | TurnEnd, None, None]:
        """The turn is over: its answer's events, as :meth:`Conversation.stream` gives them.
        ``audio``: the whole turn, if it differs from what was fed (a turn detector's
        utterance, trimmed and padded); it must begin with the audio fed. The TurnEnd's
        timings add ``streamed_*``: the work done while the user spoke."""
        units, timings = self.finish(audio)
        yield from self.conversation._answer([("SPEECH", units)], output_modality, options, timings)

    def finish(self, audio: np.ndarray | None = None) -> tuple[str, dict[str, float]]:
        """The turn is over: stop the worker, encode the rest, and return the turn's unit
        string with the timings of the work done while it was spoken (see :meth:`respond`)."""
        with self._wake:
            if self._state == "cancelled":
                raise ModelError("This Listening was cancelled: start a new one with Conversation.listen().")
            self._state = "responding"
            self._wake.notify_all()
        self.thread.join()  # at most one step more; the answer's prefill continues where it stopped
        if self._error is not None:
            raise self._error
        with self._wake:
            fed = self._turn_audio()
        turn_audio = fed if audio is None else np.asarray(audio, dtype=np.float32).reshape(-1)
        started = time.perf_counter()
        trial = self._trial
        if trial is not None and trial[0] == turn_audio.size and np.array_equal(fed[: trial[0]], turn_audio):
            self.encoder = trial[1]  # the turn ended where the pause began: finished already
            units = self.encoder.text
        elif turn_audio.size >= self.encoder.final_samples:
            self.encoder.finish(turn_audio)
            units = self.encoder.text
        else:  # a turn cut shorter than what was already final: nothing streamed can be kept
            log.warning("the turn's audio is shorter than what was streamed: encoding it whole")
            units = self.conversation.spirit_lm.speech_tokenizer.encode_string(turn_audio)
        timings = {
            "encode_s": time.perf_counter() - started,
            "streamed_prefill_tokens": self.stats["prefilled_tokens"],
            "streamed_prefill_s": self.stats["prefill_s"],
            "streamed_encode_s": self.stats["encode_s"],
            "streamed_windows": self.stats["windows"],
            "streamed_finish": float(self.encoder is (trial[1] if trial else None)),
            "turn_audio_s": turn_audio.size / SAMPLE_RATE,
        }
        return units, timings
