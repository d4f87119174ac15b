"""Few-shot task prompts from the paper (spec section 3): ASR and TTS.

Spirit LM does ASR and TTS by continuation: examples are joined with ``\\n``, each
``[Speech]<units>[Text]transcript`` (ASR) or ``[Text]text[Speech]<units>`` (TTS), and the
query ends with the prefix of the modality to produce. Without examples the prompt is
zero-shot (the query alone); the paper's figures use 10 examples (``--examples``).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from spiritlm_edge.runtime.errors import SpiritLMEdgeError
from spiritlm_edge.runtime.units import SPEECH_PREFIX, TEXT_PREFIX


def read_examples(path: str | os.PathLike) -> list[tuple[Path, str]]:
    """(audio path, transcript) pairs from a TSV file: ``audio<TAB>text`` per line;
    relative audio paths are taken from the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise SpiritLMEdgeError(f"Examples file {path} does not exist.")
    pairs = []
    with open(path, newline="") as f:
        for number, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 2:
                raise SpiritLMEdgeError(f"{path}:{number}: expected 'audio<TAB>text', got {len(row)} fields.")
            audio = Path(row[0])
            pairs.append((audio if audio.is_absolute() else path.parent / audio, row[1].strip()))
    return pairs


def asr_prompt(speech_tokenizer, audio, examples: list[tuple[Path, str]] = ()) -> str:
    """``[Speech]<units>[Text]transcript\\n`` per example, then ``[Speech]<query units>[Text]``."""
    shots = "".join(f"{SPEECH_PREFIX}{speech_tokenizer.encode_string(a)}{TEXT_PREFIX}{text}\n" for a, text in examples)
    return f"{shots}{SPEECH_PREFIX}{speech_tokenizer.encode_string(audio)}{TEXT_PREFIX}"


def tts_prompt(speech_tokenizer, text: str, examples: list[tuple[Path, str]] = ()) -> str:
    """``[Text]text[Speech]<units>\\n`` per example, then ``[Text]<query>[Speech]``."""
    if not text.strip():
        raise SpiritLMEdgeError("Nothing to say: the text is empty.")
    shots = "".join(f"{TEXT_PREFIX}{t}{SPEECH_PREFIX}{speech_tokenizer.encode_string(a)}\n" for a, t in examples)
    return f"{shots}{TEXT_PREFIX}{text}{SPEECH_PREFIX}"
