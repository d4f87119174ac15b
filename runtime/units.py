"""The speech-unit protocol: unit streams <-> prompt strings, prompts, output splitting.

Pure Python + numpy. Spirit LM writes speech as unit tokens inside its text:
``[HuN]`` phonetic units (HuBERT, 25 Hz), ``[PiN]`` pitch (12.5 Hz) and ``[StN]`` style
(1 Hz) for Expressive, with ``[Text]`` / ``[Speech]`` switching modality. The names follow
the Spirit LM reference (``units_to_string``, ``string_to_units``, ``split_speech_and_text``,
...) so its users feel at home; where the reference is lenient about malformed tokens
(``[Human]`` counted as speech, say) this module follows the format's rules instead.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from spiritlm_edge.runtime.errors import ModelError, UnitsError

log = logging.getLogger(__name__)

__all__ = [
    "HUBERT_RATE",
    "PITCH_RATE",
    "STYLE_RATE",
    "MOST_COMMON_STYLES",
    "TEXT_PREFIX",
    "SPEECH_PREFIX",
    "OutputModality",
    "PitchFallback",
    "SpeechVocab",
    "unit_ids",
    "units_to_string",
    "string_to_units",
    "iter_unit_frames",
    "last_pitch_code",
    "split_speech_and_text",
    "count_hubert_units",
    "does_start_with_speech_token",
    "does_end_with_speech_token",
    "find_prompt_last_speech_start_position",
    "build_prompt",
    "common_style",
    "forbidden_token_ids",
    "allowed_token_ids",
]

# Token rates (tokens per second) used to interleave the streams. Hubert uses 24.99, not
# 25, as the reference does: Hubert frame j sits at j/24.99 s, just after a pitch or style
# token that 25 would tie with it; from frame 2499 (~100 s) on, 25 would order differently.
HUBERT_RATE = 24.99
PITCH_RATE = 12.5
STYLE_RATE = 1.0
# The "pitch but no style" rule. The reference (spiritlm/speech_tokenizer/spiritlm_tokenizer.py,
# string_to_units) draws one of these three styles uniformly at random, once per decoded string,
# when a string has [Pi] tokens but no [St] token, so that its Expressive vocoder, which needs a
# style code per frame, can still speak. We match it because the vocoder was trained on what
# those styles sound like and a user of the reference expects the same variety; the one
# difference is that our draw takes a seedable generator (``rng``), so that a seeded generate()
# is reproducible. This module is the only place the rule lives (see _FrameAssembler.finish).
MOST_COMMON_STYLES = (71, 68, 98)

TEXT_PREFIX = "[Text]"
SPEECH_PREFIX = "[Speech]"

# stream key -> token prefix, in the order the streams are merged at equal times
_STREAMS = (("style", "St"), ("pitch", "Pi"), ("hubert", "Hu"))
_KIND_OF_PREFIX = {"Hu": "hubert", "Pi": "pitch", "St": "style"}
_RATES = {"hubert": HUBERT_RATE, "pitch": PITCH_RATE, "style": STYLE_RATE}
_DEDUP = {"hubert": True, "pitch": True, "style": False}

_UNIT_RE = re.compile(r"\[(Hu|Pi|St)(\d+)\]")
_MARKER_OR_UNIT_RE = re.compile(r"\[(?:Text|Speech)\]|\[(?:Hu|Pi|St)\d+\]")
# what may start a unit token that is cut between two streamed items
_PARTIAL_UNIT_RE = re.compile(r"\[(?:(?:Hu|Pi|St)\d*|[HPS])?")
_SPACE_RE = re.compile(r"\s+")


class OutputModality(enum.Enum):
    """What the model may generate after the prompt."""

    TEXT = "TEXT"
    SPEECH = "SPEECH"
    ARBITRARY = "ARBITRARY"

    @classmethod
    def parse(cls, value: OutputModality | str) -> OutputModality:
        """The member for ``value``: a member or its name in any case ("text", "Speech")."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value.strip().upper() in cls.__members__:
            return cls[value.strip().upper()]
        names = ", ".join(repr(m.name.lower()) for m in cls)
        raise ModelError(f"output_modality must be one of {names} (or OutputModality), got {value!r}")


# --------------------------------------------------------------------------------------
# Vocabulary


@dataclass(frozen=True)
class SpeechVocab:
    """Where the speech pieces sit in the LM vocabulary.

    Ids below ``n_text`` are the SentencePiece text vocabulary; then come ``[Text]``,
    ``[Speech]``, ``[Hu0..]``, and for Expressive ``[Pi0..]``, ``[St0..]``, all contiguous.
    Embedding rows from ``n_real`` to ``size`` are padding with no piece.
    """

    n_text: int
    text_id: int
    speech_id: int
    hubert_start: int
    hubert_count: int
    pitch_start: int | None
    pitch_count: int
    style_start: int | None
    style_count: int
    size: int

    @classmethod
    def from_pieces(cls, piece_to_id: Mapping[str, int], size: int) -> SpeechVocab:
        """Find the special pieces in a tokenizer's piece -> id map and check their layout.

        ``size`` is the number of embedding rows. Raises ``UnitsError`` naming the piece or
        id that breaks the layout of spec section 2.
        """
        for marker in (TEXT_PREFIX, SPEECH_PREFIX):
            if marker not in piece_to_id:
                raise UnitsError(
                    f"the tokenizer has no {marker!r} piece: this is not a Spirit LM tokenizer "
                    "(check tokenizer.model / tokenizer_config.json of the checkpoint)"
                )
        text_id, speech_id = int(piece_to_id[TEXT_PREFIX]), int(piece_to_id[SPEECH_PREFIX])
        units: dict[str, dict[int, int]] = {"hubert": {}, "pitch": {}, "style": {}}
        others_above = []
        for piece, idx in piece_to_id.items():
            m = _UNIT_RE.fullmatch(piece)
            if m and (m.group(2) == "0" or not m.group(2).startswith("0")):
                units[_KIND_OF_PREFIX[m.group(1)]][int(m.group(2))] = int(idx)
            elif piece not in (TEXT_PREFIX, SPEECH_PREFIX) and int(idx) >= text_id:
                others_above.append((int(idx), piece))
        if text_id <= 0:
            raise UnitsError(f"[Text] has id {text_id}: the text vocabulary must come before it")
        if speech_id != text_id + 1:
            raise UnitsError(f"[Speech] has id {speech_id}, expected {text_id + 1} (right after [Text])")

        def contiguous(kind: str, prefix: str, start: int) -> int:
            ids = units[kind]
            for n in range(len(ids)):
                if n not in ids:
                    raise UnitsError(f"[{prefix}{n}] is missing although [{prefix}{max(ids)}] exists")
                if ids[n] != start + n:
                    raise UnitsError(
                        f"[{prefix}{n}] has id {ids[n]}, expected {start + n}: "
                        f"[{prefix}*] pieces must be contiguous and start at id {start}"
                    )
            return len(ids)

        hubert_start = speech_id + 1
        hubert_count = contiguous("hubert", "Hu", hubert_start)
        if hubert_count == 0:
            raise UnitsError("the tokenizer has no [HuN] pieces: this is not a Spirit LM tokenizer")
        pitch_start = style_start = None
        pitch_count = style_count = 0
        if units["pitch"] or units["style"]:
            if not (units["pitch"] and units["style"]):
                have, lack = ("[PiN]", "[StN]") if units["pitch"] else ("[StN]", "[PiN]")
                raise UnitsError(f"the tokenizer has {have} pieces but no {lack}: Expressive needs both")
            pitch_start = hubert_start + hubert_count
            pitch_count = contiguous("pitch", "Pi", pitch_start)
            style_start = pitch_start + pitch_count
            style_count = contiguous("style", "St", style_start)
        vocab = cls(
            text_id,
            text_id,
            speech_id,
            hubert_start,
            hubert_count,
            pitch_start,
            pitch_count,
            style_start,
            style_count,
            int(size),
        )
        if vocab.size < vocab.n_real:
            raise UnitsError(
                f"the embedding has {vocab.size} rows but the tokenizer needs {vocab.n_real} "
                "(last piece id + 1): tokenizer and weights do not belong together"
            )
        # other pieces may sit in the padding rows (a padded GGUF vocab names them), not
        # among the speech pieces
        clash = [(idx, piece) for idx, piece in others_above if idx < vocab.n_real]
        if clash:
            idx, piece = min(clash)
            raise UnitsError(
                f"piece {piece!r} has id {idx}, among [Text], [Speech] and the unit pieces "
                f"(ids {text_id}..{vocab.n_real - 1}): the text vocabulary must come before them"
            )
        top = max(int(i) for i in piece_to_id.values())
        if top >= vocab.size:
            raise UnitsError(f"a piece has id {top} but the embedding has only {vocab.size} rows")
        return vocab

    @property
    def variant(self) -> str:
        """ "expressive" when pitch and style pieces exist, else "base"."""
        return "expressive" if self.pitch_count else "base"

    @property
    def n_real(self) -> int:
        """One past the last id that has a piece; ids from here to ``size`` are padding."""
        if self.style_start is not None:
            return self.style_start + self.style_count
        return self.hubert_start + self.hubert_count

    def count(self, kind: str) -> int:
        """Number of units of ``kind`` ("hubert", "pitch", "style"; 0 if absent)."""
        return {"hubert": self.hubert_count, "pitch": self.pitch_count, "style": self.style_count}[_kind(kind)]

    def ids(self, kind: str) -> range:
        """The token ids of all units of ``kind`` (empty range if absent)."""
        kind = _kind(kind)
        start = {"hubert": self.hubert_start, "pitch": self.pitch_start, "style": self.style_start}[kind]
        return range(0) if start is None else range(start, start + self.count(kind))

    def is_speech_unit(self, token_id: int) -> bool:
        """True for ``[HuN]``, ``[PiN]``, ``[StN]`` ids."""
        return self.hubert_start <= token_id < self.n_real

    def token_id(self, kind: str, n: int) -> int:
        """Token id of unit ``n`` of ``kind`` ("hubert"/"Hu", "pitch"/"Pi", "style"/"St")."""
        kind = _kind(kind)
        self.check_unit(kind, n)
        return self.ids(kind)[n]

    def unit_of(self, token_id: int) -> tuple[str, int] | None:
        """``(kind, n)`` for a unit id, None for any other id."""
        for kind in ("hubert", "pitch", "style"):
            r = self.ids(kind)
            if token_id in r:
                return kind, token_id - r.start
        return None

    def check_unit(self, kind: str, n: int) -> None:
        """Raise ``UnitsError`` unless unit ``n`` of ``kind`` exists in this vocabulary."""
        kind = _kind(kind)
        count = self.count(kind)
        if not 0 <= n < count:
            prefix = dict((k, p) for k, p in _STREAMS)[kind]
            have = f"0..{count - 1}" if count else f"none ({self.variant} model)"
            raise UnitsError(f"[{prefix}{n}] is outside the model's vocabulary: {kind} units are {have}")


def _kind(kind: str) -> str:
    if kind in _RATES:
        return kind
    if kind in _KIND_OF_PREFIX:
        return _KIND_OF_PREFIX[kind]
    raise UnitsError(f"unknown unit kind {kind!r}: use 'hubert', 'pitch' or 'style' (or 'Hu', 'Pi', 'St')")


# --------------------------------------------------------------------------------------
# Units -> string


def unit_ids(value: object, what: str = "units", size: int | None = None) -> np.ndarray:
    """One stream of unit ids as a 1-D int64 array: the one parser of unit ids.

    ``value`` is a space-separated string ("78 42 81"), a sequence of integers or of
    decimal strings, or a 1-D integer array (numpy, or anything ``np.asarray`` takes, a
    torch tensor included). With ``size``, every id must lie in ``0..size-1``. Anything
    else raises ``UnitsError`` naming ``what`` and the offending value.
    """
    if isinstance(value, str):
        value = value.split()
    if isinstance(value, (list, tuple)):
        parsed = []
        for position, item in enumerate(value):
            if isinstance(item, str) and item.isdecimal():
                item = int(item)
            if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
                raise UnitsError(f"{what} must hold non-negative integer ids, found {item!r} at position {position}")
            parsed.append(int(item))
        ids = np.array(parsed, dtype=np.int64)
    else:
        try:
            ids = np.asarray(value)
        except (TypeError, ValueError):
            ids = np.asarray(None)
        if ids.size == 0 and ids.ndim == 1:
            ids = ids.astype(np.int64)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise UnitsError(
                f"{what} must be a space-separated string or a 1-D sequence of integer ids, "
                f"got {type(value).__name__} of {ids.dtype} with shape {ids.shape}"
            )
        ids = ids.astype(np.int64)
    if ids.size and ids.min() < 0:
        position = int(np.argmax(ids < 0))
        raise UnitsError(f"{what} holds a negative id ({int(ids[position])}) at position {position}")
    if size is not None and ids.size and ids.max() >= size:
        position = int(np.argmax(ids >= size))
        raise UnitsError(
            f"{what} id {int(ids[position])} at position {position} is outside the table: valid ids are "
            f"0..{size - 1}. Were these units made for another model?"
        )
    return ids


def units_to_string(
    units: Mapping[str, object],
    has_pitch: bool = False,
    has_style: bool = False,
    vocab: SpeechVocab | None = None,
) -> str:
    """Interleave unit streams into the LM's prompt string (spec section 5).

    ``units`` maps "hubert" (and "pitch", "style" when asked for) to space-separated unit
    strings or integer sequences. Hubert and pitch are deduplicated; tokens are ordered by
    time (index / rate), ties in the order style, pitch, hubert. With ``vocab``, units
    outside the model's vocabulary raise ``UnitsError``.
    """
    wanted = {"hubert": True, "pitch": has_pitch, "style": has_style}
    times: list[np.ndarray] = []
    tokens: list[str] = []
    for key, prefix in _STREAMS:
        if not wanted[key]:
            continue
        if key not in units:
            why = "" if key == "hubert" else f", but has_{key}=True"
            raise UnitsError(f"units has no {key!r} stream (has {sorted(units)}){why}")
        values = unit_ids(units[key], f"units[{key!r}]")
        if vocab is not None and values.size:
            vocab.check_unit(key, int(values.max()))
        index = np.arange(values.size)
        if _DEDUP[key] and values.size:
            keep = np.ones(values.size, dtype=bool)
            keep[1:] = values[1:] != values[:-1]
            values, index = values[keep], index[keep]
        # index / rate in float64, as the reference computes it, so ties break identically
        times.append(index / _RATES[key])
        tokens.extend(f"[{prefix}{v}]" for v in values.tolist())
    all_times = np.concatenate(times)
    # streams were appended in merge order, so a stable sort on time alone is the rule
    perm = np.argsort(all_times, kind="stable")
    return "".join(tokens[i] for i in perm.tolist())


# --------------------------------------------------------------------------------------
# String -> units (offline and streaming share _FrameAssembler)


def _make_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise UnitsError(f"rng must be None, an int seed or a numpy Generator, got {type(rng).__name__}")


def common_style(rng=None) -> int:
    """One of MOST_COMMON_STYLES, drawn uniformly from ``rng`` (None, an int seed or a numpy
    Generator): the style of speech that has pitch codes but no style code."""
    return int(MOST_COMMON_STYLES[int(_make_rng(rng).integers(len(MOST_COMMON_STYLES)))])


def last_pitch_code(prompt: str | None) -> int | None:
    """The last ``[PiN]`` code in ``prompt`` (None if it has none): the pitch an Expressive
    answer without pitch codes continues with (spec section 5)."""
    last = None
    for m in _UNIT_RE.finditer(prompt or ""):
        if m.group(1) == "Pi":
            last = m
    return None if last is None else int(last.group(2))


class PitchFallback:
    """The pitch code for Expressive speech that has Hubert units but no pitch code at all.

    The reference fails there (a KeyError in its vocoder); spec section 5 defines ours: the
    last pitch code of the prompt's speech, else the bundle's neutral pitch code (what its
    pitch VQ-VAE gives a flat voiced contour). One object serves one turn: it logs a warning
    the first time it is used and stays quiet after that, however many chunks the turn has.
    """

    def __init__(self, code: int, source: str):
        if not (isinstance(code, (int, np.integer)) and code >= 0):
            raise UnitsError(f"a fallback pitch code must be a non-negative integer, got {code!r}")
        self.code = int(code)
        self.source = source
        self.used = False

    @classmethod
    def for_prompt(cls, prompt: str | None, neutral_code: int) -> PitchFallback:
        """The prompt's last pitch code if it has one, else ``neutral_code``."""
        code = last_pitch_code(prompt)
        if code is None:
            return cls(neutral_code, "the bundle's neutral pitch code")
        return cls(code, "the prompt's last pitch code")

    def take(self, hubert_units: int) -> int:
        """The code, warning once per object that it stands in for missing pitch codes."""
        if not self.used:
            log.warning(
                "Expressive speech with %d Hubert units has no pitch code ([Pi*] token): speaking it with %s, [Pi%d]",
                hubert_units,
                self.source,
                self.code,
            )
        self.used = True
        return self.code

    def __repr__(self) -> str:
        return f"PitchFallback(code={self.code}, source={self.source!r})"


def _resolve_variant(variant: str | None, vocab: SpeechVocab | None) -> str | None:
    if variant is not None:
        variant = str(variant).lower()
        if variant not in ("base", "expressive"):
            raise ModelError(f"variant must be 'base' or 'expressive', got {variant!r}")
        if vocab is not None and vocab.variant != variant:
            raise ModelError(f"variant {variant!r} does not match the vocabulary, which is {vocab.variant!r}")
        return variant
    return vocab.variant if vocab is not None else None


class _FrameAssembler:
    """Turns unit tokens into (hubert, pitch, style) frames, emitting each once it is final.

    Rules (spec section 5): every [HuN] is a frame with the latest pitch/style seen so far;
    frames before the first pitch (style) take the first pitch (style) seen; Expressive
    speech that never has a pitch code takes ``pitch_fallback``'s (when given); if pitch
    exists but style never appears, one of MOST_COMMON_STYLES is drawn once, at the end.
    """

    def __init__(
        self, rng, vocab: SpeechVocab | None, variant: str | None, pitch_fallback: PitchFallback | None = None
    ):
        self.rng = rng
        self.vocab = vocab
        self.pitch_fallback = pitch_fallback
        self.hubert_only = _resolve_variant(variant, vocab) == "base"
        if self.hubert_only and pitch_fallback is not None:
            raise ModelError("pitch_fallback is for Expressive speech; Base has Hubert units only")
        self.pitch: int | None = None  # latest seen
        self.style: int | None = None
        self.first_pitch: int | None = None
        self.first_style: int | None = None
        self.pending: list[list] = []  # frames still waiting for their first pitch/style
        self.carry = ""  # start of a token cut at the end of the last item
        self.consumed = 0  # characters of input consumed (for error messages)

    def _ready(self) -> bool:
        return self.hubert_only or (self.first_pitch is not None and self.first_style is not None)

    def feed(self, text: str) -> list[tuple]:
        if not isinstance(text, str):
            raise UnitsError(f"unit tokens must be strings like '[Hu12]', got {type(text).__name__}")
        buf = self.carry + text
        pos = 0
        out: list[tuple] = []
        while pos < len(buf):
            m = _UNIT_RE.match(buf, pos)
            if m is None:
                space = _SPACE_RE.match(buf, pos)
                if space is not None:
                    pos = space.end()
                    continue
                partial = _PARTIAL_UNIT_RE.match(buf, pos)
                if partial is not None and partial.end() == len(buf):
                    break  # a token cut in two: wait for the rest
                bad = buf[pos : pos + 20]
                raise UnitsError(
                    f"not a speech unit token at character {self.consumed + pos}: {bad!r}; "
                    "expected [HuN], [PiN] or [StN] (split text from speech with split_speech_and_text)"
                )
            self._token(m.group(1), int(m.group(2)), out)
            pos = m.end()
        self.consumed += pos
        self.carry = buf[pos:]
        return out

    def _token(self, prefix: str, n: int, out: list) -> None:
        kind = _KIND_OF_PREFIX[prefix]
        if self.vocab is not None:
            self.vocab.check_unit(kind, n)
        if kind == "hubert":
            frame = [n, self.pitch, self.style]
            if self._ready():
                out.append(tuple(frame))
            else:
                self.pending.append(frame)
            return
        if self.hubert_only:
            raise UnitsError(f"[{prefix}{n}] in a Base model's speech: Base has Hubert units only")
        slot = 1 if kind == "pitch" else 2
        if kind == "pitch":
            if self.first_pitch is None:
                self.first_pitch = n
            self.pitch = n
        else:
            if self.first_style is None:
                self.first_style = n
            self.style = n
        for frame in self.pending:
            if frame[slot] is None:
                frame[slot] = n
        if self._ready():
            out.extend(tuple(f) for f in self.pending)
            self.pending.clear()

    def finish(self) -> list[tuple]:
        if self.carry:
            raise UnitsError(f"the unit stream ends inside a token: {self.carry!r}")
        if self.first_pitch is None and self.pending and self.pitch_fallback is not None:
            self.first_pitch = self.pitch_fallback.take(len(self.pending))
        if self.first_pitch is not None and self.first_style is None:
            self.first_style = common_style(self.rng)
        out = []
        for hubert, pitch, style in self.pending:
            out.append(
                (hubert, self.first_pitch if pitch is None else pitch, self.first_style if style is None else style)
            )
        self.pending.clear()
        return out


def iter_unit_frames(
    tokens: Iterable[str],
    rng=None,
    *,
    vocab: SpeechVocab | None = None,
    variant: str | None = None,
    pitch_fallback: PitchFallback | None = None,
) -> Iterator[tuple[int, int | None, int | None]]:
    """Yield ``(hubert, pitch, style)`` frames from unit tokens as they arrive.

    ``tokens`` yields strings: one token ("[Hu12]"), several concatenated, or any cut of
    the stream (a token split over two items is joined); whitespace is ignored. pitch
    and style are None when the stream has none.

    When a frame is yielded:
    - ``variant="base"`` (or a Base ``vocab``): at once, as ``(hubert, None, None)``;
      [Pi]/[St] tokens raise ``UnitsError``.
    - otherwise: at once if a pitch and a style token have both been seen already. Frames
      before that are held until both have appeared (they then take the first ones), or
      until the end of ``tokens``. A stream that never has a style is therefore held to
      the end, where the "pitch but no style" rule draws one of MOST_COMMON_STYLES from
      ``rng`` (a numpy Generator or an int seed). In practice Spirit LM writes [St] and
      [Pi] first, so nothing is held. Expressive speech without any pitch code is held to
      the end too, where it takes ``pitch_fallback``'s code (or stays None without one).
    Collecting every frame gives exactly what ``string_to_units`` returns.
    """
    assembler = _FrameAssembler(rng, vocab, variant, pitch_fallback)
    for item in tokens:
        yield from assembler.feed(item)
    yield from assembler.finish()


def string_to_units(
    s: str,
    rng=None,
    *,
    vocab: SpeechVocab | None = None,
    variant: str | None = None,
    pitch_fallback: PitchFallback | None = None,
) -> dict[str, str]:
    """Unit string -> per-frame streams for the vocoder (spec section 5), as the reference.

    Returns ``{"hubert": "78 42 ...", "pitch": "...", "style": "..."}`` (space-separated
    strings, one entry per [HuN]); "pitch" if a pitch token occurs (or, for Hubert units
    without one, ``pitch_fallback`` is given), "style" if a style token occurs or pitch
    does (then a common style drawn from ``rng``).
    """
    assembler = _FrameAssembler(rng, vocab, variant, pitch_fallback)
    frames = assembler.feed(s) + assembler.finish()
    units = {"hubert": " ".join(str(f[0]) for f in frames)}
    if assembler.first_pitch is not None:
        units["pitch"] = " ".join(str(f[1]) for f in frames)
    if assembler.first_style is not None:
        units["style"] = " ".join(str(f[2]) for f in frames)
    return units


# --------------------------------------------------------------------------------------
# Generated output (spec section 7)


def split_speech_and_text(generated: str) -> list[tuple[str, str]]:
    """Split generated output into ``(chunk, "t" | "s")`` runs, in order.

    ``[Text]``/``[Speech]`` are dropped; runs of ``[HuN]``/``[PiN]``/``[StN]`` are speech;
    everything else, whitespace and a stray "[" included, is text and kept verbatim.
    Neighbouring pieces of the same kind merge (also across a dropped marker); no chunk
    is empty.
    """
    chunks: list[tuple[str, str]] = []

    def add(content: str, kind: str) -> None:
        if not content:
            return
        if chunks and chunks[-1][1] == kind:
            chunks[-1] = (chunks[-1][0] + content, kind)
        else:
            chunks.append((content, kind))

    pos = 0
    for m in _MARKER_OR_UNIT_RE.finditer(generated):
        add(generated[pos : m.start()], "t")
        if m.group(0) not in (TEXT_PREFIX, SPEECH_PREFIX):
            add(m.group(0), "s")
        pos = m.end()
    add(generated[pos:], "t")
    return chunks


def count_hubert_units(s: str) -> int:
    """Number of well-formed ``[HuN]`` tokens in ``s``."""
    return sum(1 for m in _UNIT_RE.finditer(s) if m.group(1) == "Hu")


def does_start_with_speech_token(s: str | None) -> bool:
    """True if ``s`` starts with a ``[HuN]``, ``[PiN]`` or ``[StN]`` token."""
    return s is not None and _UNIT_RE.match(s) is not None


def does_end_with_speech_token(s: str | None) -> bool:
    """True if ``s`` ends with a ``[HuN]``, ``[PiN]`` or ``[StN]`` token."""
    return s is not None and re.search(r"\[(?:Hu|Pi|St)\d+\]\Z", s) is not None


def find_prompt_last_speech_start_position(s: str) -> int | None:
    """Index where the last run of adjacent unit tokens in ``s`` begins; None if none.

    The run need not reach the end of ``s`` (as in the reference); callers check
    ``does_end_with_speech_token`` first.
    """
    run_start = prev_end = None
    for m in _UNIT_RE.finditer(s):
        if m.start() != prev_end:
            run_start = m.start()
        prev_end = m.end()
    return run_start


# --------------------------------------------------------------------------------------
# Prompts and forced modality (spec sections 2 and 3)


def _content_kind(content_type) -> str:
    name = content_type.name if isinstance(content_type, enum.Enum) else content_type
    if isinstance(name, str):
        kind = {"T": "t", "TEXT": "t", "S": "s", "SPEECH": "s"}.get(name.strip().upper())
        if kind is not None:
            return kind
    raise ModelError(f"content type must be 'text' or 'speech' (or 't'/'s'), got {content_type!r}")


def build_prompt(
    inputs: Sequence,
    output_modality: OutputModality | str,
    vocab: SpeechVocab | None = None,
) -> str:
    """Join interleaved inputs into one prompt string (spec section 3).

    ``inputs``: ``(content_type, content)`` pairs (or objects with ``.content_type`` and
    ``.content``); content_type is "t"/"s"/"text"/"speech" in any case or an enum with
    such a name; content is text, or a unit string for speech. A ``[Text]``/``[Speech]``
    prefix is written when the modality changes (and before the first segment). For a TEXT
    or SPEECH output the matching prefix is appended unless the last segment already has
    that modality (so empty inputs give "[Text]" / "[Speech]", ARBITRARY gives "").
    Speech content that is not made of unit tokens raises ``UnitsError``.
    """
    modality = OutputModality.parse(output_modality)
    parts, prev = [], None
    for i, item in enumerate(inputs):
        if hasattr(item, "content_type") and hasattr(item, "content"):
            content_type, content = item.content_type, item.content
        else:
            try:
                content_type, content = item
            except (TypeError, ValueError):
                raise ModelError(f"inputs[{i}] must be a (content_type, content) pair, got {item!r}") from None
        kind = _content_kind(content_type)
        if not isinstance(content, str):
            raise ModelError(
                f"inputs[{i}] content must be a string (text, or a unit string for speech), "
                f"got {type(content).__name__}; encode audio to units first"
            )
        if kind == "s":
            # validates the tokens (and their range with a vocab); cheap next to the LM
            assembler = _FrameAssembler(0, vocab, None)
            assembler.feed(content)
            assembler.finish()
        if kind != prev:
            parts.append(TEXT_PREFIX if kind == "t" else SPEECH_PREFIX)
        parts.append(content)
        prev = kind
    if modality is OutputModality.TEXT and prev != "t":
        parts.append(TEXT_PREFIX)
    elif modality is OutputModality.SPEECH and prev != "s":
        parts.append(SPEECH_PREFIX)
    return "".join(parts)


def forbidden_token_ids(
    variant: str | None,
    output_modality: OutputModality | str,
    vocab: SpeechVocab,
) -> list[int]:
    """Token ids to ban so that generation stays in ``output_modality`` (sorted).

    As the reference: TEXT bans [Text], [Speech] and every [HuN] (Expressive also [PiN],
    [StN]); SPEECH bans [Text], [Speech] and the whole text vocabulary (EOS included, so
    speech runs to the token limit); ARBITRARY bans nothing. Beyond the reference, TEXT and
    SPEECH also ban the padding rows (``vocab.n_real`` .. ``vocab.size - 1``): they have no
    piece, so a sampled one could not be decoded. ``variant`` None means ``vocab.variant``.
    """
    _resolve_variant(variant, vocab)
    modality = OutputModality.parse(output_modality)
    if modality is OutputModality.ARBITRARY:
        return []
    padding = list(range(vocab.n_real, vocab.size))
    if modality is OutputModality.TEXT:
        # ids from [Text] up to the last unit are exactly the specials and the units
        return list(range(vocab.text_id, vocab.n_real)) + padding
    return list(range(vocab.n_text)) + [vocab.text_id, vocab.speech_id] + padding


def allowed_token_ids(
    variant: str | None,
    output_modality: OutputModality | str,
    vocab: SpeechVocab,
) -> list[int]:
    """The complement of ``forbidden_token_ids`` in ``range(vocab.size)`` (sorted).

    Shorter for SPEECH (just the unit ids), which suits a logit-bias allow list.
    """
    banned = forbidden_token_ids(variant, output_modality, vocab)
    if not banned:
        return list(range(vocab.size))
    mask = np.ones(vocab.size, dtype=bool)
    mask[banned] = False
    return np.flatnonzero(mask).tolist()
