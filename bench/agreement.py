"""How often streamed units agree with whole-turn units: the measure for choosing the
streaming encoder's window (``runtime/speech.py``, :class:`StreamingWindow`).

::

    spiritlm-edge agreement --bundle BUNDLE question1.wav question2.wav ...
    spiritlm-edge agreement --bundle BUNDLE --stream-window 2.0:1.0:0.75 *.wav

Each file is encoded twice: whole, as the reference does, and as a live turn is while it is
spoken (one window per step, the encoder keeping up with real time). For every unit stream
it prints the share of frames with the same unit, and for the prompt the share of
deduplicated tokens that match (``difflib``'s ratio: 2 x matched / total). The released
weights are not on our machines: the figures of a random-weight bundle (``--synthetic``
builds) are a lower bound, not a quality figure, since trained HuBERT is far more local.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spiritlm_edge.runtime.audio import SAMPLE_RATE, load_audio
from spiritlm_edge.runtime.speech import SpeechTokenizer, StreamingEncoder, StreamingWindow
from spiritlm_edge.runtime.units import units_to_string

_TOKEN_RE = re.compile(r"\[(?:Hu|Pi|St)\d+\]")


@dataclass
class Agreement:
    """One file's (or all files') agreement between streamed and whole-turn units."""

    name: str
    seconds: float
    frames: dict[str, tuple[int, int]] = field(default_factory=dict)  # stream -> (equal, total)
    tokens: tuple[int, int] = (0, 0)  # deduplicated prompt tokens: (matched x 2, streamed + whole)

    def frame_share(self, stream: str) -> float:
        equal, total = self.frames.get(stream, (0, 0))
        return equal / total if total else float("nan")

    @property
    def token_share(self) -> float:
        matched, total = self.tokens
        return matched / total if total else float("nan")

    def add(self, other: Agreement) -> None:
        self.seconds += other.seconds
        for stream, (equal, total) in other.frames.items():
            mine = self.frames.get(stream, (0, 0))
            self.frames[stream] = (mine[0] + equal, mine[1] + total)
        self.tokens = (self.tokens[0] + other.tokens[0], self.tokens[1] + other.tokens[1])


def compare(
    speech: SpeechTokenizer, audio: np.ndarray, window: StreamingWindow | None = None, name: str = ""
) -> Agreement:
    """Agreement of one recording (16 kHz float32)."""
    whole = {k: np.array(v.split(), dtype=np.int64) for k, v in speech.encode_units(audio).items()}
    encoder = StreamingEncoder(speech, window)
    encoder.encode_string(audio)
    streamed = {k: np.asarray(v, dtype=np.int64) for k, v in encoder.codes.items()}
    result = Agreement(name, audio.size / SAMPLE_RATE)
    for stream, reference in whole.items():
        ours = streamed[stream]
        # the same audio gives the same number of frames; compare the overlap if not
        n = min(len(ours), len(reference))
        result.frames[stream] = (int((ours[:n] == reference[:n]).sum()), max(len(ours), len(reference)))
    has_pitch, has_style = speech.has_pitch, speech.has_style
    a = _TOKEN_RE.findall(units_to_string(whole, has_pitch=has_pitch, has_style=has_style))
    b = _TOKEN_RE.findall(encoder.text)
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    matched = sum(block.size for block in matcher.get_matching_blocks())
    result.tokens = (2 * matched, len(a) + len(b))
    return result


def measure(
    bundle: str | Path, files: Sequence[str | Path], window: StreamingWindow | None = None, threads: int | None = None
) -> tuple[list[Agreement], Agreement]:
    """Per-file agreements and their frame-weighted total."""
    speech = SpeechTokenizer(bundle, n_threads=threads)
    results = [compare(speech, load_audio(path), window, Path(path).name) for path in files]
    total = Agreement("all", 0.0)
    for result in results:
        total.add(result)
    return results, total


def format_report(results: list[Agreement], total: Agreement, window: StreamingWindow, synthetic: bool) -> str:
    streams = list(total.frames)
    header = ["file", "seconds"] + [f"{s} frames" for s in streams] + ["prompt tokens (dedup)"]
    rows = [header]
    for r in [*results, total]:
        rows.append(
            [r.name, f"{r.seconds:.1f}"]
            + [f"{100 * r.frame_share(s):.1f}%" for s in streams]
            + [f"{100 * r.token_share:.1f}%"]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        f"window: {window.left_s:g} s left, {window.step_s:g} s steps, {window.lookahead_s:g} s look-ahead "
        "(streamed as if spoken, the encoder keeping up)"
    )
    if synthetic:
        lines.append("random-weight bundle: agreement of random weights, a lower bound, not a quality figure")
    return "\n".join(lines)
