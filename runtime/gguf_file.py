"""The Spirit LM GGUF file: our ``spiritlm.*`` metadata schema, and reading a file back.

A bundle's LM is one GGUF that llama.cpp runs and that also describes itself to us: the
variant, where the modality and unit tokens sit, and the exact tokenizer files (so the
runtime tokenizes like the reference from the GGUF alone). The converter
(``quant/gguf_convert.py``) writes these keys and the runtime reads them, so both take the
key names and the format version from here, the lowest layer they share.

Files are read with gguf-py's memory-mapped :class:`gguf.GGUFReader`. What this module adds
is checking a file before llama.cpp sees it: one that is not a GGUF, is truncated, or was
not written by our converter is a clear :class:`BundleError`, never a crash inside llama.cpp.
GGUFReader parses metadata arrays element by element, so a 7B's 32 768-token vocabulary
(tokens, scores, types) costs seconds at load.
"""

from __future__ import annotations

import base64
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import gguf

from spiritlm_edge.runtime.errors import BundleError
from spiritlm_edge.runtime.units import SpeechVocab

# Version of the spiritlm.* keys. 1 stored tokenizer.model as a uint8 array, which gguf-py
# parses element by element (about 10 s for the release's 760 KB model); 2 stores it as a
# base64 string. Files of both versions are read.
FORMAT_VERSION = 2
GGUF_VERSIONS = (2, 3)  # GGUF container versions llama.cpp and gguf-py read
_EXPORT_HINT = "Copy it again or rebuild it with `spiritlm-edge export lm`."


class Keys:
    """Our metadata keys, beside llama.cpp's ``general.*``, ``llama.*`` and ``tokenizer.ggml.*``."""

    FORMAT_VERSION = "spiritlm.format_version"
    VARIANT = "spiritlm.variant"
    EMBEDDING_ROWS = "spiritlm.embedding_rows"  # the embedding matrix's (padded) row count

    class Token:
        """Token ids of the modality markers and the first id and count of each unit kind."""

        TEXT = "spiritlm.token.text"
        SPEECH = "spiritlm.token.speech"
        HUBERT_FIRST = "spiritlm.token.hubert_first"
        HUBERT_COUNT = "spiritlm.token.hubert_count"
        PITCH_FIRST = "spiritlm.token.pitch_first"
        PITCH_COUNT = "spiritlm.token.pitch_count"
        STYLE_FIRST = "spiritlm.token.style_first"
        STYLE_COUNT = "spiritlm.token.style_count"

    class Tokenizer:
        """The checkpoint's tokenizer files, verbatim (see ``runtime/tokenizer.py``)."""

        SENTENCEPIECE_MODEL = "spiritlm.tokenizer.sentencepiece_model"  # tokenizer.model bytes, base64
        ADDED_TOKENS = "spiritlm.tokenizer.added_tokens"  # JSON list of AddedToken fields
        CLEAN_UP_TOKENIZATION_SPACES = "spiritlm.tokenizer.clean_up_tokenization_spaces"


def encode_sentencepiece_model(model_proto: bytes) -> str:
    """The value written under :attr:`Keys.Tokenizer.SENTENCEPIECE_MODEL`."""
    return base64.b64encode(model_proto).decode("ascii")


def decode_sentencepiece_model(value: Any) -> bytes:
    """``tokenizer.model`` bytes from either version's value (base64 string or byte array)."""
    if isinstance(value, str):
        return base64.b64decode(value, validate=True)
    return bytes(value)


class TensorInfo(NamedTuple):
    shape: tuple[int, ...]  # ggml order: the fastest-varying dimension first
    ggml_type: gguf.GGMLQuantizationType
    n_bytes: int


@dataclass
class GGUFInfo:
    """What :func:`read_gguf` learned from a GGUF file without loading its tensors."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    file_bytes: int


def read_gguf(path: str | os.PathLike) -> GGUFInfo:
    """Metadata and tensor table of a GGUF; a :class:`BundleError` unless the file is a
    complete GGUF (the tensor data included)."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"GGUF file {path} does not exist.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(24)
    if len(header) < 4 or header[:4] != b"GGUF":
        raise BundleError(f"{path} is not a GGUF file (no GGUF magic). Export the LM with `spiritlm-edge export lm`.")
    if len(header) < 24:
        raise BundleError(f"{path} is truncated (its GGUF header is incomplete). {_EXPORT_HINT}")
    version, n_tensors, n_kv = struct.unpack("<IQQ", header[4:])
    if version not in GGUF_VERSIONS:
        raise BundleError(f"{path} is GGUF version {version}; only versions 2 and 3 are supported.")
    if n_tensors > size or n_kv > size:
        # gguf-py would walk the whole file looking for that many entries
        raise BundleError(f"{path} has an impossible GGUF header (corrupted file). {_EXPORT_HINT}")
    try:
        reader = gguf.GGUFReader(path)
        metadata = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
        tensors = {
            t.name: TensorInfo(tuple(int(d) for d in t.shape), t.tensor_type, int(t.n_bytes)) for t in reader.tensors
        }
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as exc:
        # gguf-py's errors for bytes that run past the end of the file or make no sense
        raise BundleError(f"{path} is truncated or corrupted ({exc}). {_EXPORT_HINT}") from None
    if size < end:
        raise BundleError(f"{path} is truncated: its tensors need {end} bytes but the file has {size}. {_EXPORT_HINT}")
    return GGUFInfo(path, version, metadata, tensors, size)


def read_spiritlm_gguf(path: str | os.PathLike) -> GGUFInfo:
    """:func:`read_gguf`, and check it is a Spirit LM GGUF written by our converter."""
    info = read_gguf(path)
    meta = info.metadata
    if Keys.FORMAT_VERSION not in meta:
        raise BundleError(
            f"{info.path} is a GGUF without Spirit LM metadata (spiritlm.* keys): it was not made by "
            "spiritlm-edge, so its speech tokens and tokenizer are unknown. Convert the checkpoint "
            "with `spiritlm-edge export lm`."
        )
    if int(meta[Keys.FORMAT_VERSION]) > FORMAT_VERSION:
        raise BundleError(
            f"{info.path} has {Keys.FORMAT_VERSION} {meta[Keys.FORMAT_VERSION]}; this "
            f"spiritlm-edge reads up to {FORMAT_VERSION}. Upgrade spiritlm-edge."
        )
    if meta.get("general.architecture") != "llama":
        raise BundleError(f"{info.path}: architecture {meta.get('general.architecture')!r}, expected 'llama'.")
    return info


def vocab_from_metadata(meta: dict[str, Any], n_vocab: int) -> SpeechVocab:
    """The speech-token layout recorded by the converter."""
    pitch = int(meta[Keys.Token.PITCH_COUNT])
    style = int(meta[Keys.Token.STYLE_COUNT])
    text_id = int(meta[Keys.Token.TEXT])
    return SpeechVocab(
        n_text=text_id,
        text_id=text_id,
        speech_id=int(meta[Keys.Token.SPEECH]),
        hubert_start=int(meta[Keys.Token.HUBERT_FIRST]),
        hubert_count=int(meta[Keys.Token.HUBERT_COUNT]),
        pitch_start=int(meta[Keys.Token.PITCH_FIRST]) if pitch else None,
        pitch_count=pitch,
        style_start=int(meta[Keys.Token.STYLE_FIRST]) if style else None,
        style_count=style,
        size=n_vocab,
    )
