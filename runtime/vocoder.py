"""Speech units -> 16 kHz audio with the exported unit HiFi-GAN (ONNX Runtime, no torch).

Two graphs from the bundle: ``vocoder_duration`` (units -> frames per unit) and
``vocoder`` (per-frame units, pitch codes, style codes, speaker -> audio). Durations are
expanded in between with ``np.repeat``, which is what lets :meth:`Vocoder.stream` run the
generator chunk by chunk while frames arrive.

Streaming is exact: each chunk is synthesized with the generator's full receptive field
on both sides (``context_frames`` in bundle.json) and durations with the predictor's
(``context_units``), so the concatenated chunks equal :meth:`Vocoder.decode`. The price
is latency: a chunk is ready once ``right`` more frames (20 = 800 ms for the release's
size, 14 = 560 ms for the tiny test model) and, with duration prediction, 2 more units
have arrived.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Sequence

import numpy as np

from spiritlm_edge.runtime.bundle import Bundle
from spiritlm_edge.runtime.errors import BundleError, ModelError, UnitsError
from spiritlm_edge.runtime.limits import MAX_WINDOW_FRAMES
from spiritlm_edge.runtime.onnx_session import create_session, default_threads

log = logging.getLogger(__name__)

DEFAULT_SPEAKER = 2
# The reference picks one of these when pitch codes come without any style code.
MOST_COMMON_STYLES = (71, 68, 98)
# Parallel windows are at least this long, and at least as long as their context.
MIN_SEGMENT_FRAMES = 8

_REQUIRED = ("inputs", "hop_length", "num_units", "context_frames", "sample_rate")


def _as_ids(values, what: str) -> np.ndarray:
    """An int64 array from ints, numeric strings, or one space-separated string."""
    if isinstance(values, str):
        values = values.split()
    try:
        ids = np.asarray(list(values) if not isinstance(values, np.ndarray) else values)
        if ids.dtype.kind in "UO":
            ids = ids.astype(np.int64)
        if ids.dtype.kind == "f" and not np.all(ids == np.round(ids)):
            raise ValueError("non-integer value")
        ids = ids.astype(np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise UnitsError(f"{what} must be a sequence of integer ids ({exc}).") from None
    return ids


def _check_range(ids: np.ndarray, size: int, what: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= size):
        bad = int(np.flatnonzero((ids < 0) | (ids >= size))[0])
        raise UnitsError(
            f"{what} id {int(ids[bad])} at position {bad} is outside this vocoder's table: valid ids are "
            f"0..{size - 1}. Were these units made for another model?"
        )


class Vocoder:
    """The unit HiFi-GAN of a bundle."""

    def __init__(self, generator, duration, entry: dict, duration_entry: dict | None, workers: int = 1):
        missing = [k for k in _REQUIRED if k not in entry]
        if missing:
            raise BundleError(f"bundle.json's 'vocoder' entry lacks {', '.join(missing)}; rebuild the bundle.")
        self._generator = generator
        self._duration = duration
        self._workers = max(1, int(workers))
        self._pool: ThreadPoolExecutor | None = None
        self._entry = entry
        self._inputs = list(entry["inputs"])
        self.sample_rate = int(entry["sample_rate"])
        self.hop_length = int(entry["hop_length"])
        self.num_units = int(entry["num_units"])
        self.num_pitch = int(entry.get("num_pitch", 0))
        self.num_style_codes = int(entry.get("num_style_codes", 0))
        self.num_speakers = int(entry.get("num_speakers", 0))
        self.num_styles = int(entry.get("num_styles", 0))
        self.pitch_upsample = int(entry.get("pitch_upsample", 0))
        self.style_upsample = int(entry.get("style_upsample", 0))
        self.default_style = entry.get("default_style")
        context = entry["context_frames"]
        self.context_frames: tuple[int, int] = (int(context["left"]), int(context["right"]))
        units = (duration_entry or {}).get("context_units", {"left": 0, "right": 0})
        self.duration_context: tuple[int, int] = (int(units["left"]), int(units["right"]))

    @classmethod
    def from_bundle(cls, bundle, providers: Sequence | None = None, n_threads: int | None = None) -> "Vocoder":
        """Open the vocoder of ``bundle`` (a :class:`Bundle` or its directory)."""
        if not isinstance(bundle, Bundle):
            bundle = Bundle(bundle)
        entry = bundle.component("vocoder")
        threads = n_threads or default_threads()
        names = [p[0] if isinstance(p, tuple) else p for p in providers or ["CPUExecutionProvider"]]
        # ORT's blocked (NCHWc) convolutions split work over channel blocks, of which the
        # 16-64-channel layers have 1-4: a second intra-op thread gains little. Windows of
        # the sequence run side by side on one thread each scale instead (see _render).
        workers = threads if entry.get("layout") == "blocked" and names == ["CPUExecutionProvider"] else 1
        generator = create_session(bundle.engine_path("vocoder"), providers, 1 if workers > 1 else threads)
        duration, duration_entry = None, None
        if bundle.has("vocoder_duration"):
            duration_entry = bundle.component("vocoder_duration")
            duration = create_session(bundle.path("vocoder_duration"), providers, 1)
        return cls(generator, duration, entry, duration_entry, workers=workers)

    # ------------------------------------------------------------------ properties

    @property
    def speakers(self) -> list[str]:
        """Speaker names (speakers.txt); ``speaker_id`` indexes this list."""
        return list(self._entry.get("speakers", []))

    @property
    def styles(self) -> list[str]:
        """Global style names (Base: styles.txt); ``style_id`` indexes this list."""
        return list(self._entry.get("styles", []))

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
    def latency_frames(self) -> tuple[int, int]:
        """Look-ahead of :meth:`stream`: (generator frames, duration-predictor units)."""
        return self.context_frames[1], self.duration_context[1] if self.has_duration else 0

    # ------------------------------------------------------------------ checks

    def _global_inputs(self, speaker_id: int, style_id: int | None) -> dict[str, np.ndarray]:
        feeds = {}
        if "speaker" in self._inputs:
            if not (isinstance(speaker_id, (int, np.integer)) and 0 <= speaker_id < self.num_speakers):
                names = self.speakers
                listing = f" ({', '.join(f'{i}={n}' for i, n in enumerate(names))})" if names else ""
                raise ModelError(
                    f"speaker_id {speaker_id!r} is out of range: this vocoder has speakers "
                    f"0..{self.num_speakers - 1}{listing}."
                )
            feeds["speaker"] = np.array([speaker_id], dtype=np.int64)
        if "style_id" in self._inputs:
            style_id = self.default_style if style_id is None else style_id
            if not (isinstance(style_id, (int, np.integer)) and 0 <= style_id < self.num_styles):
                raise ModelError(f"style_id {style_id!r} is out of range: this vocoder has styles "
                                 f"0..{self.num_styles - 1} ({', '.join(self.styles[:12])}...).")
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
        units = _as_ids(hubert, "hubert")
        _check_range(units, self.num_units, "hubert")
        self._use_duration(True)
        if units.size == 0:
            return np.zeros(0, dtype=np.int64)
        return self._duration.run(None, {"units": units})[0].astype(np.int64)

    def _generate(self, frames: dict[str, np.ndarray | None], globals_: dict) -> np.ndarray:
        feeds = {"units": np.ascontiguousarray(frames["units"], dtype=np.int64)}
        if self.has_pitch:
            feeds["pitch"] = np.ascontiguousarray(frames["pitch"], dtype=np.int64)
        if self.has_style:
            feeds["style_codes"] = np.ascontiguousarray(frames["style"], dtype=np.int64)
        feeds.update(globals_)
        return self._generator.run(None, feeds)[0]

    def _render(self, frames: dict[str, np.ndarray | None], start: int, end: int, globals_: dict) -> np.ndarray:
        """Audio of frames ``[start, end)`` of ``frames`` (per-frame arrays).

        The arrays must begin at the sequence's start or at least ``context_frames[0]``
        before ``start``, and end at the sequence's end or at least ``context_frames[1]``
        after ``end``. The range is cut into segments, each synthesized from its own
        context window (exact), to bound memory and to run in parallel (``workers``).
        """
        total = len(frames["units"])
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
            return audio[(first - lo) * self.hop_length:last]

        spans = list(zip(bounds, bounds[1:]))
        if len(spans) > 1 and self._workers > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="vocoder")
            return np.concatenate(list(self._pool.map(segment, spans)))
        return np.concatenate([segment(span) for span in spans])

    # ------------------------------------------------------------------ offline

    def decode(self, hubert, pitch=None, style=None, speaker_id: int = DEFAULT_SPEAKER,
               dur_pred: bool = True, style_id: int | None = None) -> np.ndarray:
        """Audio (float32, 16 kHz) for units, following the reference's decode rule.

        ``hubert``, ``pitch``, ``style``: one id per unit, as ``string_to_units`` gives them
        (ints, numeric strings, or a space-separated string). Units are used as given, not
        deduplicated. If ``pitch`` has a different count than ``hubert`` (resynthesis of
        encoder output at the streams' own rates), durations are not predicted and pitch and
        style codes are repeated up to the unit rate; otherwise, with ``dur_pred``, each unit
        lasts the predicted number of frames. Base ignores pitch/style; ``style_id`` picks
        Base's global style (default 8, conversational).
        """
        units = _as_ids(hubert, "hubert")
        if units.size == 0:
            raise UnitsError("No hubert units to decode.")
        _check_range(units, self.num_units, "hubert")
        globals_ = self._global_inputs(speaker_id, style_id)
        frames = len(units)
        if self.has_pitch and pitch is not None and len(_as_ids(pitch, "pitch")) != frames:
            dur_pred = False
        use_dur = self._use_duration(dur_pred)
        streams = {}
        for name, codes, size, ratio in (("pitch", pitch, self.num_pitch, self.pitch_upsample),
                                         ("style", style, self.num_style_codes, self.style_upsample)):
            if not size:
                continue
            if codes is None:
                raise UnitsError(f"This vocoder (Expressive) needs {name} codes along with the hubert units.")
            codes = _as_ids(codes, name)
            _check_range(codes, size, name)
            if len(codes) != frames:
                if use_dur:
                    raise UnitsError(f"{len(codes)} {name} codes for {frames} hubert units: with duration "
                                     "prediction every unit needs its own code.")
                codes = _upsample(codes, frames, ratio, name)
            streams[name] = codes
        if use_dur:
            reps = self.durations(units)
            units = np.repeat(units, reps)
            streams = {k: np.repeat(v, reps) for k, v in streams.items()}
        frames = {"units": units, "pitch": streams.get("pitch"), "style": streams.get("style")}
        return self._render(frames, 0, len(units), globals_)

    # ------------------------------------------------------------------ streaming

    def stream(self, frames: Iterable, speaker_id: int = DEFAULT_SPEAKER, dur_pred: bool = True,
               chunk_frames: int = 25, style_id: int | None = None,
               first_chunk_frames: int | None = None) -> Iterator[np.ndarray]:
        """Yield audio chunks while ``(hubert, pitch, style)`` frames arrive.

        Each frame is one unit with the pitch and style codes in force (``None`` until the
        first one is seen: such frames wait and take the first code, as in the reference;
        Base ignores them; a bare int is a hubert-only frame). Chunks hold ``chunk_frames``
        vocoder frames (40 ms each) and are exactly the offline :meth:`decode` of the same
        frames, cut in pieces. A chunk is yielded as soon as its right context exists:
        ``context_frames[1]`` frames after it and, with ``dur_pred``, the durations of its
        units, which need ``duration_context[1]`` units after them. ``first_chunk_frames``
        (default ``chunk_frames``) sizes the first chunk alone: a small one starts playback
        sooner, larger later ones cost less context recomputation per second of audio.
        """
        first_chunk_frames = chunk_frames if first_chunk_frames is None else first_chunk_frames
        for name, value in (("chunk_frames", chunk_frames), ("first_chunk_frames", first_chunk_frames)):
            if not (isinstance(value, int) and value >= 1):
                raise ModelError(f"{name} must be a positive integer, not {value!r}.")
        globals_ = self._global_inputs(speaker_id, style_id)
        use_dur = self._use_duration(dur_pred)
        g_left, g_right = self.context_frames
        d_left, d_right = self.duration_context
        units: list[int] = []           # per unit, codes filled in
        codes: dict[str, list[int]] = {"pitch": [], "style": []}
        waiting: list[tuple] = []       # frames before the first pitch/style code
        first = {"pitch": None, "style": None}
        expanded = {"units": [], "pitch": [], "style": []}  # per vocoder frame
        state = {"timed": 0, "emitted": 0}  # units with durations, vocoder frames yielded
        needs = [name for name, size in (("pitch", self.num_pitch), ("style", self.num_style_codes)) if size]

        def release():
            # A missing code repeats the previous one; frames before the first code take it.
            for hu, pi, st in waiting:
                units.append(hu)
                for name, value in (("pitch", pi), ("style", st)):
                    if name in needs:
                        previous = codes[name][-1] if codes[name] else first[name]
                        codes[name].append(previous if value is None else value)
            waiting.clear()

        def emit(final: bool) -> Iterator[np.ndarray]:
            count = len(units)
            target = count if final else max(0, count - d_right) if use_dur else count
            timed = state["timed"]
            if target > timed:
                new = slice(timed, target)
                if use_dur:
                    lo, hi = max(0, timed - d_left), min(count, target + d_right)
                    reps = self._duration.run(None, {"units": np.asarray(units[lo:hi], dtype=np.int64)})[0]
                    reps = reps[timed - lo:target - lo].astype(np.int64)
                else:
                    reps = np.ones(target - timed, dtype=np.int64)
                expanded["units"].extend(np.repeat(units[new], reps).tolist())
                for name in needs:
                    expanded[name].extend(np.repeat(codes[name][new], reps).tolist())
                state["timed"] = target
            total = len(expanded["units"])
            while state["emitted"] < total:
                start = state["emitted"]
                end = start + (first_chunk_frames if start == 0 else chunk_frames)
                if not final and end + g_right > total:
                    return
                end = min(end, total)
                lo, hi = max(0, start - g_left), min(total, end + g_right)
                window = {k: np.asarray(v[lo:hi], dtype=np.int64) if v else None for k, v in expanded.items()}
                state["emitted"] = end
                yield self._render(window, start - lo, end - lo, globals_)

        for index, frame in enumerate(frames):
            hu, pi, st = self._check_frame(frame, index, needs)
            if first["pitch"] is None:
                first["pitch"] = pi
            if first["style"] is None:
                first["style"] = st
            waiting.append((hu, pi, st))
            if all(first[name] is not None for name in needs):
                # The first code seen also stands for the frames that came before it.
                release()
                yield from emit(final=False)
        if waiting:
            if "pitch" in needs and first["pitch"] is None:
                raise UnitsError("The stream ended without any pitch code: this vocoder (Expressive) needs "
                                 "pitch codes ([Pi*] tokens) with the hubert units.")
            if "style" in needs and first["style"] is None:
                first["style"] = MOST_COMMON_STYLES[0]
                log.info("no style code in the stream; using style %d", first["style"])
            release()
        yield from emit(final=True)

    def _check_frame(self, frame, index: int, needs: list[str]) -> tuple[int, int | None, int | None]:
        if isinstance(frame, (int, np.integer)):
            frame = (frame,)
        try:
            values = list(frame) + [None] * (3 - len(frame))
            if len(values) != 3:
                raise ValueError
            hu, pi, st = (None if v is None else int(v) for v in values)
        except (TypeError, ValueError):
            raise UnitsError(f"Frame {index} is {frame!r}: expected (hubert, pitch or None, style or None).") from None
        if hu is None:
            raise UnitsError(f"Frame {index} has no hubert unit.")
        for name, value, size in (("hubert", hu, self.num_units), ("pitch", pi, self.num_pitch),
                                  ("style", st, self.num_style_codes)):
            if value is not None and (name == "hubert" or name in needs) and not 0 <= value < size:
                raise UnitsError(f"Frame {index}: {name} id {value} is outside this vocoder's table: "
                                 f"valid ids are 0..{size - 1}.")
        return hu, pi, st


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
