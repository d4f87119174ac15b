"""Speech units -> 16 kHz audio with the exported unit HiFi-GAN (ONNX Runtime, no torch).

Graphs from the bundle: ``vocoder_duration`` (units -> frames per unit), ``vocoder``
(per-frame units, pitch codes, style codes, speaker -> audio) and, in bundles that have it,
``vocoder_stream`` (the same generator with explicit state, for streaming). Durations are
expanded in between with ``np.repeat``, which is what lets :meth:`Vocoder.stream` run the
generator chunk by chunk while frames arrive.

Streaming is exact either way: the concatenated chunks equal :meth:`Vocoder.decode`.

- Stateful (``vocoder_stream``): each frame is fed to the generator once; every convolution
  keeps the inputs its later outputs need as state, so a stream costs about what one offline
  decode costs. The audio lags the frames by a fixed delay (``delay_samples``: 21 frames =
  840 ms for the release's size, 14 = 560 ms for the tiny test model), and the call that
  ends the stream pads each layer's right edge with zeros as offline decoding does.
- Windows (older bundles; int8 or GPU generators): each chunk is synthesized with the
  generator's full receptive field on both sides (``context_frames`` in bundle.json), so
  a chunk is ready once ``right`` more frames (20 for the release's size) have arrived, and
  every chunk recomputes its context.

With duration prediction a unit is timed once the predictor's right context
(``context_units``, 2 units) has arrived.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from typing import Any

import numpy as np

from spiritlm_edge.runtime.bundle import Bundle, DurationConfig, StreamingVocoderConfig, VocoderConfig
from spiritlm_edge.runtime.errors import ModelError, UnitsError
from spiritlm_edge.runtime.limits import MAX_WINDOW_FRAMES
from spiritlm_edge.runtime.onnx_session import create_session, default_threads
from spiritlm_edge.runtime.units import unit_ids

DEFAULT_SPEAKER = 2
# Parallel windows are at least this long, and at least as long as their context.
MIN_SEGMENT_FRAMES = 8
# The stateful streaming graph runs on one intra-op thread: ORT's blocked (NCHWc) convolutions
# split work over channel blocks, of which the 16-64-channel layers have 1-4, and on the 2-core
# Zen 4 a second intra-op thread, or ORT's parallel executor over the resblock branches, doubled
# the CPU time of a stream (`python -m spiritlm_edge.bench.vocoder_layouts --streaming`; measured
# while other processes shared the cores: rerun it on an idle machine before changing this).
STREAM_THREADS = 1

Frame = tuple[int, int | None, int | None]


class Vocoder:
    """The unit HiFi-GAN of a bundle."""

    def __init__(
        self,
        generator: Any,
        duration: Any,
        config: VocoderConfig,
        duration_config: DurationConfig | None = None,
        workers: int = 1,
        stream_generator: Any = None,
        stream_config: StreamingVocoderConfig | None = None,
    ):
        self._generator = generator
        self._duration = duration
        self._stream_generator: Any = stream_generator if stream_config is not None else None
        self.stream_config = stream_config if stream_generator is not None else None
        self._workers = max(1, int(workers))
        self._pool: ThreadPoolExecutor | None = None
        self.config = config
        self.sample_rate = config.sample_rate
        self.hop_length = config.hop_length
        self.num_units = config.num_units
        self.num_pitch = config.num_pitch
        self.num_style_codes = config.num_style_codes
        self.context_frames: tuple[int, int] = config.context_frames
        self.duration_context: tuple[int, int] = duration_config.context_units if duration_config else (0, 0)

    @classmethod
    def from_bundle(
        cls, bundle: Bundle | str | os.PathLike, providers: Sequence | None = None, n_threads: int | None = None
    ) -> Vocoder:
        """Open the vocoder of ``bundle`` (a :class:`Bundle` or its directory)."""
        if not isinstance(bundle, Bundle):
            bundle = Bundle(bundle)
        config = bundle.config("vocoder", VocoderConfig)
        threads = n_threads or default_threads()
        names = [p[0] if isinstance(p, tuple) else p for p in providers or ["CPUExecutionProvider"]]
        # ORT's blocked (NCHWc) convolutions split work over channel blocks, of which the
        # 16-64-channel layers have 1-4: a second intra-op thread gains little. Windows of
        # the sequence run side by side on one thread each scale instead (see _render).
        workers = threads if config.layout == "blocked" and names == ["CPUExecutionProvider"] else 1
        generator = create_session(bundle.engine_path("vocoder"), providers, 1 if workers > 1 else threads)
        duration, duration_config = None, None
        if bundle.has("vocoder_duration"):
            duration_config = bundle.config("vocoder_duration", DurationConfig)
            duration = create_session(bundle.path("vocoder_duration"), providers, 1)
        stream, stream_config = None, None
        # The stateful graph is fp32 and verified on ONNX Runtime's CPU provider: with an int8
        # generator (it would not equal decode()) or on a GPU, streaming keeps the windows.
        on_cpu = getattr(generator, "get_providers", list)() == ["CPUExecutionProvider"]
        if on_cpu and bundle.has("vocoder_stream") and bundle.precision_of("vocoder") == "fp32":
            stream = create_session(bundle.path("vocoder_stream"), ["CPUExecutionProvider"], STREAM_THREADS)
            stream_config = bundle.config("vocoder_stream", StreamingVocoderConfig)
        return cls(generator, duration, config, duration_config, workers, stream, stream_config)

    # ------------------------------------------------------------------ properties

    @property
    def speakers(self) -> list[str]:
        """Speaker names (speakers.txt); ``speaker_id`` indexes this list."""
        return list(self.config.speakers)

    @property
    def styles(self) -> list[str]:
        """Global style names (Base: styles.txt); ``style_id`` indexes this list."""
        return list(self.config.styles)

    @property
    def has_pitch(self) -> bool:
        """Whether the vocoder takes pitch codes (Expressive)."""
        return self.num_pitch > 0

    @property
    def has_style(self) -> bool:
        """Whether the vocoder takes per-frame style codes (Expressive)."""
        return self.num_style_codes > 0

    @property
    def has_duration(self) -> bool:
        return self._duration is not None

    @property
    def stateful_streaming(self) -> bool:
        """Whether :meth:`stream` runs the stateful generator (``vocoder_stream``), which
        computes every frame once, rather than windows with context on both sides."""
        return self.stream_config is not None

    @property
    def latency_frames(self) -> tuple[int, int]:
        """Look-ahead of :meth:`stream`: (generator frames, duration-predictor units)."""
        if self.stream_config is not None:
            generator = math.ceil(self.stream_config.delay_samples / self.hop_length)
        else:
            generator = self.context_frames[1]
        return generator, self.duration_context[1] if self.has_duration else 0

    # ------------------------------------------------------------------ checks

    def _global_inputs(self, speaker_id: int, style_id: int | None) -> dict[str, np.ndarray]:
        feeds = {}
        num_speakers, num_styles = self.config.num_speakers, self.config.num_styles
        if "speaker" in self.config.inputs:
            if not (isinstance(speaker_id, (int, np.integer)) and 0 <= speaker_id < num_speakers):
                names = self.speakers
                listing = f" ({', '.join(f'{i}={n}' for i, n in enumerate(names))})" if names else ""
                raise ModelError(
                    f"speaker_id {speaker_id!r} is out of range: this vocoder has speakers "
                    f"0..{num_speakers - 1}{listing}."
                )
            feeds["speaker"] = np.array([speaker_id], dtype=np.int64)
        if "style_id" in self.config.inputs:
            style_id = self.config.default_style if style_id is None else style_id
            if not (isinstance(style_id, (int, np.integer)) and 0 <= style_id < num_styles):
                raise ModelError(
                    f"style_id {style_id!r} is out of range: this vocoder has styles "
                    f"0..{num_styles - 1} ({', '.join(self.styles[:12])}...)."
                )
            feeds["style_id"] = np.array([style_id], dtype=np.int64)
        elif style_id is not None:
            raise ModelError("style_id is only for vocoders with global styles (Base); this one has none.")
        return feeds

    def _use_duration(self, dur_pred: bool) -> bool:
        if dur_pred and not self.has_duration:
            raise ModelError("This vocoder has no duration predictor: decode with dur_pred=False.")
        return dur_pred

    # ------------------------------------------------------------------ engines

    def durations(self, hubert) -> np.ndarray:
        """Frames per unit predicted by the duration predictor (at least 1 each)."""
        units = unit_ids(hubert, "hubert", self.num_units)
        self._use_duration(True)
        if units.size == 0:
            return np.zeros(0, dtype=np.int64)
        return self._predict_durations(units)

    def _predict_durations(self, units: np.ndarray) -> np.ndarray:
        return self._duration.run(None, {"units": np.ascontiguousarray(units, dtype=np.int64)})[0].astype(np.int64)

    def _frame_feeds(self, frames: dict[str, np.ndarray | None], globals_: dict) -> dict[str, np.ndarray]:
        feeds = {"units": np.ascontiguousarray(frames["units"], dtype=np.int64)}
        if self.has_pitch:
            feeds["pitch"] = np.ascontiguousarray(frames["pitch"], dtype=np.int64)
        if self.has_style:
            feeds["style_codes"] = np.ascontiguousarray(frames["style"], dtype=np.int64)
        feeds.update(globals_)
        return feeds

    def _generate(self, frames: dict[str, np.ndarray | None], globals_: dict) -> np.ndarray:
        return self._generator.run(None, self._frame_feeds(frames, globals_))[0]

    def _render(self, frames: dict[str, np.ndarray | None], start: int, end: int, globals_: dict) -> np.ndarray:
        """Audio of frames ``[start, end)`` of ``frames`` (per-frame arrays).

        The arrays must begin at the sequence's start or at least ``context_frames[0]``
        before ``start``, and end at the sequence's end or at least ``context_frames[1]``
        after ``end``. The range is cut into segments, each synthesized from its own
        context window (exact), to bound memory and to run in parallel (``workers``).
        """
        units = frames["units"]
        assert units is not None  # every window has units; only pitch or style may be absent
        total = len(units)
        left, right = self.context_frames
        count = end - start
        # A segment shorter than its context would cost more than it saves.
        shortest = max(MIN_SEGMENT_FRAMES, left + right)
        pieces = max(1, min(self._workers, count // shortest), -(-count // MAX_WINDOW_FRAMES))
        bounds = [start + count * i // pieces for i in range(pieces + 1)]

        def segment(span: tuple[int, int]) -> np.ndarray:
            first, stop = span
            lo, hi = max(0, first - left), min(total, stop + right)
            audio = self._generate({k: None if v is None else v[lo:hi] for k, v in frames.items()}, globals_)
            # Keep the samples past the last frame only at the sequence's end.
            last = (stop - lo) * self.hop_length if stop < total else len(audio)
            return audio[(first - lo) * self.hop_length : last]

        spans = list(pairwise(bounds))
        if len(spans) > 1 and self._workers > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="vocoder")
            return np.concatenate(list(self._pool.map(segment, spans)))
        return np.concatenate([segment(span) for span in spans])

    # ------------------------------------------------------------------ offline

    def decode(
        self,
        hubert,
        pitch=None,
        style=None,
        speaker_id: int = DEFAULT_SPEAKER,
        dur_pred: bool = True,
        style_id: int | None = None,
    ) -> np.ndarray:
        """Audio (float32, 16 kHz) for units, following the reference's decode rule.

        ``hubert``, ``pitch``, ``style``: one id per unit, as ``string_to_units`` gives them
        (ints, numeric strings, or a space-separated string). Units are used as given, not
        deduplicated. If ``pitch`` has a different count than ``hubert`` (resynthesis of
        encoder output at the streams' own rates), durations are not predicted and pitch and
        style codes are repeated up to the unit rate; otherwise, with ``dur_pred``, each unit
        lasts the predicted number of frames. Base ignores pitch/style; ``style_id`` picks
        Base's global style (default 8, conversational).
        """
        units = unit_ids(hubert, "hubert", self.num_units)
        if units.size == 0:
            raise UnitsError("No hubert units to decode.")
        globals_ = self._global_inputs(speaker_id, style_id)
        frames = len(units)
        if self.has_pitch and pitch is not None and len(unit_ids(pitch, "pitch")) != frames:
            dur_pred = False
        use_dur = self._use_duration(dur_pred)
        streams = {}
        for name, codes, size, ratio in (
            ("pitch", pitch, self.num_pitch, self.config.pitch_upsample),
            ("style", style, self.num_style_codes, self.config.style_upsample),
        ):
            if not size:
                continue
            if codes is None:
                raise UnitsError(f"This vocoder (Expressive) needs {name} codes along with the hubert units.")
            codes = unit_ids(codes, name, size)
            if len(codes) != frames:
                if use_dur:
                    raise UnitsError(
                        f"{len(codes)} {name} codes for {frames} hubert units: with duration "
                        "prediction every unit needs its own code."
                    )
                codes = _upsample(codes, frames, ratio, name)
            streams[name] = codes
        if use_dur:
            reps = self.durations(units)
            units = np.repeat(units, reps)
            streams = {k: np.repeat(v, reps) for k, v in streams.items()}
        per_frame = {"units": units, "pitch": streams.get("pitch"), "style": streams.get("style")}
        return self._render(per_frame, 0, len(units), globals_)

    # ------------------------------------------------------------------ streaming

    def stream(
        self,
        frames: Iterable[Frame | int],
        speaker_id: int = DEFAULT_SPEAKER,
        dur_pred: bool = True,
        chunk_frames: int = 25,
        style_id: int | None = None,
        first_chunk_frames: int | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield audio chunks while ``(hubert, pitch, style)`` frames arrive.

        Each frame is one unit with its pitch and style codes (``None`` where the vocoder
        takes none: Base; a bare int is a hubert-only frame). Frames come complete from
        :func:`~spiritlm_edge.runtime.units.iter_unit_frames`, which applies the rules of
        spec section 5 (codes in force, first codes, missing pitch or style). Chunks hold
        ``chunk_frames`` vocoder frames (40 ms each) and are exactly the offline
        :meth:`decode` of the same frames, cut in pieces; see :class:`StreamingSynthesizer`
        for when each one is ready. ``first_chunk_frames`` (default ``chunk_frames``) sizes
        the first chunk alone: a small one starts playback sooner. Larger later chunks
        cost less per second of audio: a little (one graph call each) with the stateful
        generator, much (the recomputed context) with windows.
        """
        synthesizer = StreamingSynthesizer(self, speaker_id, dur_pred, chunk_frames, style_id, first_chunk_frames)
        for index, frame in enumerate(frames):
            yield from synthesizer.push(frame, index)
        yield from synthesizer.finish()


class StreamingSynthesizer:
    """The state of one streamed decode: frames in with :meth:`push`, audio chunks out.

    Units arrive one frame each; once the duration predictor's right context (``d_right``
    units) follows a unit, its duration is final and it is expanded to vocoder frames.
    Frames then become audio in one of two ways, both equal to :meth:`Vocoder.decode`:

    - stateful (bundles with ``vocoder_stream``): frames are fed once to the stateful
      generator, whose audio lags them by a fixed delay (``latency_frames``); a chunk is
      ready once that many frames follow it. :meth:`finish` ends the stream with the
      graph's flush call, which pads each layer's right edge as offline decoding does.
    - windows (older bundles, int8 or GPU generators): once the generator's right context
      (``g_right`` frames) follows a chunk, it is synthesized from a window with its full
      left and right context.
    """

    def __init__(
        self,
        vocoder: Vocoder,
        speaker_id: int = DEFAULT_SPEAKER,
        dur_pred: bool = True,
        chunk_frames: int = 25,
        style_id: int | None = None,
        first_chunk_frames: int | None = None,
    ):
        first_chunk_frames = chunk_frames if first_chunk_frames is None else first_chunk_frames
        for name, value in (("chunk_frames", chunk_frames), ("first_chunk_frames", first_chunk_frames)):
            if not (isinstance(value, int) and value >= 1):
                raise ModelError(f"{name} must be a positive integer, not {value!r}.")
        self.vocoder = vocoder
        self.chunk_frames, self.first_chunk_frames = chunk_frames, first_chunk_frames
        self.globals = vocoder._global_inputs(speaker_id, style_id)
        self.use_duration = vocoder._use_duration(dur_pred)
        # the per-frame code streams this vocoder takes, besides the units
        self.streams = [
            name for name, size in (("pitch", vocoder.num_pitch), ("style", vocoder.num_style_codes)) if size
        ]
        self.units: dict[str, list[int]] = {"units": [], **{name: [] for name in self.streams}}  # per unit
        self.frames: dict[str, list[int]] = {"units": [], **{name: [] for name in self.streams}}  # per vocoder frame
        self.timed = 0  # units whose durations are final and whose frames are in self.frames
        self.emitted = 0  # vocoder frames whose audio has been yielded
        # the stateful path: the graph's states, frames fed to it, audio made but not yielded
        self.states: dict[str, np.ndarray] | None = None
        self.fed = 0
        self.audio: list[np.ndarray] = []

    def push(self, frame: Frame | int, index: int | None = None) -> Iterator[np.ndarray]:
        """Add one frame; yield the chunks it completes."""
        hubert, pitch, style = self._check(frame, len(self.units["units"]) if index is None else index)
        self.units["units"].append(hubert)
        for name, code in (("pitch", pitch), ("style", style)):
            if name in self.streams and code is not None:  # _check refuses a missing code it needs
                self.units[name].append(code)
        yield from self._emit(final=False)

    def finish(self) -> Iterator[np.ndarray]:
        """The stream ended: yield the remaining audio."""
        yield from self._emit(final=True)

    def _time_units(self, final: bool) -> None:
        count = len(self.units["units"])
        d_left, d_right = self.vocoder.duration_context
        target = count if final or not self.use_duration else max(0, count - d_right)
        if target <= self.timed:
            return
        if self.use_duration:
            lo, hi = max(0, self.timed - d_left), min(count, target + d_right)
            reps = self.vocoder._predict_durations(np.asarray(self.units["units"][lo:hi]))
            reps = reps[self.timed - lo : target - lo]
        else:
            reps = np.ones(target - self.timed, dtype=np.int64)
        for name, values in self.units.items():
            self.frames[name].extend(np.repeat(values[self.timed : target], reps).tolist())
        self.timed = target

    def _emit(self, final: bool) -> Iterator[np.ndarray]:
        self._time_units(final)
        if self.vocoder.stream_config is not None:
            yield from self._emit_stateful(final)
        else:
            yield from self._emit_windows(final)

    def _chunk_end(self, start: int) -> int:
        return start + (self.first_chunk_frames if start == 0 else self.chunk_frames)

    def _emit_windows(self, final: bool) -> Iterator[np.ndarray]:
        g_left, g_right = self.vocoder.context_frames
        total = len(self.frames["units"])
        while self.emitted < total:
            start = self.emitted
            end = self._chunk_end(start)
            if not final and end + g_right > total:
                return
            end = min(end, total)
            lo, hi = max(0, start - g_left), min(total, end + g_right)
            window = {name: np.asarray(values[lo:hi], dtype=np.int64) for name, values in self.frames.items()}
            self.emitted = end
            yield self.vocoder._render(
                {"units": window["units"], "pitch": window.get("pitch"), "style": window.get("style")},
                start - lo,
                end - lo,
                self.globals,
            )

    def _emit_stateful(self, final: bool) -> Iterator[np.ndarray]:
        config = self.vocoder.stream_config
        assert config is not None
        total = len(self.frames["units"])
        delay = self.vocoder.latency_frames[0]
        # Feed the frames of one chunk per call (the first call also its delay), so that
        # chunks come out one by one even when many frames are ready at once.
        while not final:
            if self.fed == 0:
                end = max(config.min_first_frames, self.first_chunk_frames + delay)
            else:
                end = self.fed + self.chunk_frames
            if end > total:
                break
            self._run_stateful(end, flush=False)
            yield from self._pop_chunks(final=False)
        if final and total:
            self._run_stateful(total, flush=True)
            yield from self._pop_chunks(final=True)

    def _run_stateful(self, end: int, flush: bool) -> None:
        """Feed frames ``[fed, end)``; with ``flush``, they are the last ones."""
        config = self.vocoder.stream_config
        assert config is not None
        if self.states is None:
            self.states = {name: np.zeros(shape, dtype=np.float32) for name, _, shape in config.states}
        frames = {name: np.asarray(values[self.fed : end], dtype=np.int64) for name, values in self.frames.items()}
        feeds = self.vocoder._frame_feeds(
            {"units": frames["units"], "pitch": frames.get("pitch"), "style": frames.get("style")}, self.globals
        )
        middle = (1,) if config.layout == "blocked" else ()
        feeds[config.flush_input] = np.zeros((1, 1, *middle, config.flush_length if flush else 0), np.float32)
        feeds.update(self.states)
        outputs = self.vocoder._stream_generator.run(["audio", *(out for _, out, _ in config.states)], feeds)
        self.audio.append(outputs[0])
        self.states = {name: value for (name, _, _), value in zip(config.states, outputs[1:], strict=True)}
        self.fed = end

    def _pop_chunks(self, final: bool) -> Iterator[np.ndarray]:
        """Yield the made audio in whole chunks (at the end, the rest too)."""
        hop = self.vocoder.hop_length
        audio = np.concatenate(self.audio) if len(self.audio) > 1 else self.audio[0]
        offset = 0
        while offset < len(audio):
            size = (self._chunk_end(self.emitted) - self.emitted) * hop
            if len(audio) - offset < size and not final:
                break
            chunk = audio[offset : offset + size]
            offset += len(chunk)
            self.emitted += len(chunk) // hop
            yield chunk
        self.audio = [audio[offset:]]

    def _check(self, frame: Frame | int, index: int) -> tuple[int, int | None, int | None]:
        if isinstance(frame, (int, np.integer)):
            frame = (int(frame), None, None)
        try:
            values = list(frame) + [None] * (3 - len(frame))
            if len(values) != 3:
                raise ValueError
            hubert, pitch, style = (None if v is None else int(v) for v in values)
        except (TypeError, ValueError):
            raise UnitsError(f"Frame {index} is {frame!r}: expected (hubert, pitch or None, style or None).") from None
        if hubert is None:
            raise UnitsError(f"Frame {index} has no hubert unit.")
        for name, value, size, needed in (
            ("hubert", hubert, self.vocoder.num_units, True),
            ("pitch", pitch, self.vocoder.num_pitch, "pitch" in self.streams),
            ("style", style, self.vocoder.num_style_codes, "style" in self.streams),
        ):
            if not needed:
                continue
            if value is None:
                raise UnitsError(
                    f"Frame {index} has no {name} code, which this vocoder (Expressive) needs with every unit: "
                    "make frames with units.iter_unit_frames, which fills codes in by the rules of spec section 5."
                )
            if not 0 <= value < size:
                raise UnitsError(
                    f"Frame {index}: {name} id {value} is outside this vocoder's table: valid ids are 0..{size - 1}."
                )
        return hubert, pitch, style


def _upsample(codes: np.ndarray, frames: int, ratio: int, what: str) -> np.ndarray:
    """Codes at 1/ratio of the unit rate repeated up to ``frames`` (the reference's rule:
    repeat, pad with the last code, cut; at most one code of slack)."""
    if ratio < 1 or abs(len(codes) * ratio - frames) / ratio > 1:
        raise UnitsError(
            f"{len(codes)} {what} codes do not match {frames} hubert units: expected one per unit or one per "
            f"{ratio} units (about {frames / max(ratio, 1):.0f})."
        )
    up = np.repeat(codes, ratio)
    if len(up) < frames:
        up = np.concatenate([up, np.full(frames - len(up), up[-1])])
    return up[:frames]
