"""What ``SpiritLM.generate_stream`` yields while a turn is produced.

An app embedding the runtime reacts to three kinds of event, in order of arrival:
text as it is decoded, audio as soon as the streaming vocoder has it, and one
``TurnEnd`` with the per-stage timings of the turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TextDelta:
    """New text produced by the LM (append it to what came before)."""

    text: str


@dataclass
class AudioChunk:
    """New float32 mono 16 kHz samples (play them right after the previous chunk)."""

    samples: np.ndarray
    sample_rate: int = 16000


@dataclass
class TurnEnd:
    """The turn is complete. ``timings`` holds seconds per stage (encode, prefill,
    decode, vocoder, first_audio, ...) and counts (prompt_tokens, new_tokens); ``text``
    and ``audio`` are the whole answer."""

    timings: dict[str, float] = field(default_factory=dict)
    text: str = ""
    audio: np.ndarray | None = None
    generated: str = ""  # the raw generated string (text and [Hu..] unit tokens)
