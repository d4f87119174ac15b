"""The language model's tokenizer: text + speech-unit strings <-> LM token ids.

It gives the ids the reference gets from transformers' slow
``LlamaTokenizer(add_bos_token=True, add_eos_token=False)`` in its default legacy mode,
using only ``sentencepiece``. The speech tokens can be stored two ways and both are
honoured exactly as transformers does:

* as user-defined pieces inside ``tokenizer.model``: SentencePiece itself keeps them
  atomic, so ``"[Speech][Hu12]"`` becomes ``▁ [Speech] [Hu12]`` (the dummy prefix ``▁``
  is a token of its own);
* as added tokens in ``tokenizer_config.json`` (``added_tokens_decoder``): the text is
  first split on them (leftmost, longest match), their ``lstrip``/``rstrip``/
  ``single_word`` flags eat neighbouring spaces, and each remaining text segment is
  encoded by SentencePiece separately, dummy prefix included.

Decoding mirrors ``tokenizer.decode(ids, skip_special_tokens=True)``.

In a bundle the tokenizer travels inside the LM's GGUF file (``spiritlm.tokenizer.*``
keys hold the exact ``tokenizer.model`` bytes and the added-token table), so the LM and
its tokenizer can never be mismatched and a bundle needs no extra files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from spiritlm_edge.runtime.bundle import Bundle
from spiritlm_edge.runtime.errors import BundleError, CheckpointError, UnitsError
from spiritlm_edge.runtime.gguf_file import Keys, decode_sentencepiece_model, read_spiritlm_gguf
from spiritlm_edge.runtime.units import SpeechVocab

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
SPIECE_UNDERLINE = "\u2581"
_UNIT_TOKEN = re.compile(r"\[(?:Hu|Pi|St)\d+\]")
_BRACKETED = re.compile(r"\[[A-Za-z]+\d*\]")
# transformers' `clean_up_tokenization` (applied only when the config asks for it).
_CLEANUPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


@dataclass(frozen=True)
class AddedToken:
    """A token that transformers splits the text on before SentencePiece sees it."""

    id: int
    content: str
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    special: bool = False


def _token_content(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def resolve_added_tokens(
    sp: spm.SentencePieceProcessor, tokenizer_config: dict, special_tokens_map: dict, where: str = ""
) -> list[AddedToken]:
    """The added-token table transformers builds from the two JSON files.

    ``added_tokens_decoder`` entries keep their stripping flags; the bos/eos/unk/pad
    tokens and ``additional_special_tokens`` not listed there are added with the id
    SentencePiece gives them. ``special`` is set for exactly those named special tokens:
    they are the ones ``decode(skip_special_tokens=True)`` drops (an entry's own
    ``"special": true`` does not make transformers' slow tokenizer skip it).
    """
    specials = []
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        content = _token_content(special_tokens_map.get(name, tokenizer_config.get(name)))
        if content is None and name != "pad_token":
            content = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}[name]
        if content:
            specials.append(content)
    extra = (
        special_tokens_map.get("additional_special_tokens") or tokenizer_config.get("additional_special_tokens") or []
    )
    specials += [c for c in map(_token_content, extra) if c]

    tokens: dict[int, AddedToken] = {}
    for key, entry in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        try:
            token_id = int(key)
            tokens[token_id] = AddedToken(
                id=token_id,
                content=str(entry["content"]),
                lstrip=bool(entry.get("lstrip", False)),
                rstrip=bool(entry.get("rstrip", False)),
                single_word=bool(entry.get("single_word", False)),
                special=str(entry["content"]) in specials,
            )
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"tokenizer_config.json{where}: added_tokens_decoder entry {key!r} is malformed "
                "(expected an integer key and a dict with 'content')."
            ) from None
    listed = {t.content for t in tokens.values()}
    for content in specials:
        if content in listed:
            continue
        token_id = sp.piece_to_id(content)
        if token_id == sp.unk_id() and content != sp.id_to_piece(sp.unk_id()):
            # transformers would append it after the vocabulary; the release has no such token.
            raise CheckpointError(
                f"Special token {content!r}{where} is neither a SentencePiece piece nor listed in "
                "tokenizer_config.json's added_tokens_decoder."
            )
        tokens[token_id] = AddedToken(id=token_id, content=content, special=True)
        listed.add(content)
    return sorted(tokens.values(), key=lambda t: t.id)


class SpiritTokenizer:
    """LM tokenizer of one Spirit LM checkpoint (Base or Expressive)."""

    def __init__(
        self,
        model_proto: bytes,
        added_tokens: Sequence[AddedToken] = (),
        *,
        clean_up_tokenization_spaces: bool = False,
        variant: str | None = None,
        source: str = "tokenizer",
        embedding_rows: int | None = None,
    ):
        self.source = source
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_proto)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError for bad protos
            raise CheckpointError(f"{source}: not a SentencePiece model ({exc}).") from None
        self.added_tokens = list(added_tokens)
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.n_pieces = self.sp.get_piece_size()

        self._added_by_id = {t.id: t for t in self.added_tokens}
        self._added_by_content = {t.content: t for t in self.added_tokens}
        self._strippers = any(t.lstrip or t.rstrip or t.single_word for t in self.added_tokens)
        self._special_ids = {t.id for t in self.added_tokens if t.special}
        # Leftmost-longest split on added tokens (what transformers' Trie does). A regex
        # alternation of ~700 tokens is slow, so bracketed tokens ([Text], [Hu12], ...) are
        # found by one generic pattern plus a dict look-up; the few others by alternation.
        others = sorted((c for c in self._added_by_content if not _BRACKETED.fullmatch(c)), key=len, reverse=True)
        self._others = re.compile("|".join(map(re.escape, others))) if others else None
        self._has_bracketed = any(_BRACKETED.fullmatch(c) for c in self._added_by_content)
        parts = ([_BRACKETED.pattern] if self._has_bracketed else []) + (
            [self._others.pattern] if self._others is not None else []
        )
        self._candidates = re.compile("|".join(parts)) if parts else None
        # SentencePiece pieces whose string is an added token resolve to the added id.
        self._remap = {}
        for token in self.added_tokens:
            piece_id = self.sp.piece_to_id(token.content)
            if piece_id != token.id and self.sp.id_to_piece(piece_id) == token.content:
                self._remap[piece_id] = token.id

        size = max([self.n_pieces] + [t.id + 1 for t in self.added_tokens])
        pieces: list[str | None] = [self.sp.id_to_piece(i) if i < self.n_pieces else None for i in range(size)]
        for token in self.added_tokens:
            pieces[token.id] = token.content
        missing = [i for i, t in enumerate(pieces) if t is None]
        if missing:
            raise CheckpointError(
                f"{source}: token ids {missing[:5]} have no piece and no added token (the "
                "vocabulary has holes); the tokenizer files are inconsistent."
            )
        self._id_to_token: list[str] = [t for t in pieces if t is not None]  # all of them: no holes
        self.piece_to_id = {t: i for i, t in reversed(list(enumerate(self._id_to_token)))}
        for token in self.added_tokens:
            self.piece_to_id[token.content] = token.id
        try:
            self.vocab = SpeechVocab.from_pieces(self.piece_to_id, max(size, embedding_rows or 0))
        except UnitsError as exc:
            raise CheckpointError(f"{source}: {exc}.") from None
        if variant is not None:
            self._check_variant(variant)
        self.bos_id = self._special_id("bos", self.sp.bos_id(), "<s>")
        self.eos_id = self._special_id("eos", self.sp.eos_id(), "</s>")
        self.unk_id = self.sp.unk_id()
        self._unit_ids = {piece: i for piece, i in self.piece_to_id.items() if _UNIT_TOKEN.fullmatch(piece)}
        # Decoded as they are, outside SentencePiece: non-special added tokens and special
        # ones past the SentencePiece vocabulary (transformers' "legacy added tokens").
        self._legacy_added = {t.content for t in self.added_tokens if (not t.special) or t.id >= self.n_pieces}
        self._all_special = {t.content for t in self.added_tokens if t.special}

    # -- construction ----------------------------------------------------------------

    @classmethod
    def from_dir(cls, lm_dir: str | os.PathLike, variant: str | None = None) -> SpiritTokenizer:
        """From a checkpoint's LM directory (tokenizer.model + the two JSON files)."""
        lm_dir = Path(lm_dir)
        for name in TOKENIZER_FILES:
            if not (lm_dir / name).is_file():
                raise CheckpointError(
                    f"Missing tokenizer file {lm_dir / name}: the LM directory must hold "
                    f"{', '.join(TOKENIZER_FILES)} as released."
                )
        configs = []
        for name in TOKENIZER_FILES[1:]:
            try:
                configs.append(json.loads((lm_dir / name).read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{lm_dir / name} is not valid JSON: {exc}.") from None
        tokenizer_config, special_tokens_map = configs
        return cls.from_files(
            (lm_dir / "tokenizer.model").read_bytes(),
            tokenizer_config,
            special_tokens_map,
            variant=variant,
            source=str(lm_dir),
        )

    @classmethod
    def from_files(
        cls,
        model_proto: bytes,
        tokenizer_config: dict,
        special_tokens_map: dict,
        variant: str | None = None,
        source: str = "tokenizer",
    ) -> SpiritTokenizer:
        """From the contents of the three tokenizer files."""
        if tokenizer_config.get("legacy") is False:
            raise CheckpointError(
                f"{source}: tokenizer_config.json sets legacy=false; the Spirit LM reference "
                "tokenizes in legacy mode and spiritlm-edge implements only that."
            )
        if tokenizer_config.get("add_prefix_space") is False:
            raise CheckpointError(f"{source}: add_prefix_space=false is not supported (Spirit LM uses true).")
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model_proto)
        except Exception as exc:
            raise CheckpointError(f"{source}/tokenizer.model is not a SentencePiece model ({exc}).") from None
        added = resolve_added_tokens(sp, tokenizer_config, special_tokens_map, f" in {source}")
        return cls(
            model_proto,
            added,
            clean_up_tokenization_spaces=bool(tokenizer_config.get("clean_up_tokenization_spaces", False)),
            variant=variant,
            source=source,
        )

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> SpiritTokenizer:
        """From the ``spiritlm.tokenizer.*`` metadata of a GGUF written by our converter."""
        meta = read_spiritlm_gguf(path).metadata
        return cls.from_metadata(meta, source=str(path))

    @classmethod
    def from_metadata(cls, meta: dict, source: str = "GGUF") -> SpiritTokenizer:
        """From GGUF metadata (:class:`~spiritlm_edge.runtime.gguf_file.Keys`)."""
        try:
            proto = decode_sentencepiece_model(meta[Keys.Tokenizer.SENTENCEPIECE_MODEL])
            table = json.loads(meta[Keys.Tokenizer.ADDED_TOKENS])
            clean = bool(meta.get(Keys.Tokenizer.CLEAN_UP_TOKENIZATION_SPACES, False))
        except KeyError as exc:
            raise BundleError(
                f"{source} has no {exc.args[0]} metadata: it was not written by spiritlm-edge's "
                "converter. Re-export it with `spiritlm-edge export lm`."
            ) from None
        except (ValueError, TypeError) as exc:  # bad base64 or JSON
            raise BundleError(
                f"{source}: its spiritlm.tokenizer metadata is corrupted ({exc}). Re-export it with "
                "`spiritlm-edge export lm`."
            ) from None
        added = [AddedToken(**entry) for entry in table]
        return cls(
            proto,
            added,
            clean_up_tokenization_spaces=clean,
            variant=meta.get(Keys.VARIANT),
            source=source,
            embedding_rows=meta.get(Keys.EMBEDDING_ROWS),
        )

    @classmethod
    def from_bundle(cls, bundle) -> SpiritTokenizer:
        """From a bundle's LM GGUF (``bundle`` is a :class:`Bundle` or its directory)."""
        if not isinstance(bundle, Bundle):
            bundle = Bundle(bundle)
        return cls.from_gguf(bundle.path("lm"))

    def added_tokens_json(self) -> str:
        """The added-token table as stored in GGUF metadata."""
        return json.dumps([t.__dict__ for t in self.added_tokens], sort_keys=True)

    def _special_id(self, name: str, sp_id: int, default: str) -> int:
        for token in self.added_tokens:
            if token.special and token.content == default:
                return token.id
        if sp_id < 0:
            raise CheckpointError(f"{self.source}: the tokenizer has no {name} token.")
        return sp_id

    def _check_variant(self, variant: str) -> None:
        vocab = self.vocab
        expressive = variant == "expressive"
        has_expressive = vocab.pitch_count > 0 or vocab.style_count > 0
        if expressive and (vocab.pitch_count != 64 or vocab.style_count != 100):
            raise CheckpointError(
                f"{self.source}: an Expressive tokenizer needs [Pi0..Pi63] and [St0..St99]; "
                f"found {vocab.pitch_count} pitch and {vocab.style_count} style tokens. "
                "Is this the Base checkpoint?"
            )
        if not expressive and has_expressive:
            raise CheckpointError(
                f"{self.source}: a Base tokenizer has no [Pi*]/[St*] tokens but this one has; "
                "is this the Expressive checkpoint?"
            )

    # -- encoding --------------------------------------------------------------------

    def _sp_encode(self, text: str) -> list[int]:
        ids = self.sp.encode(text)
        if self._remap:
            ids = [self._remap.get(i, i) for i in ids]
        return ids

    def _split_added(self, text: str) -> list[str]:
        """``text`` cut into text, token, text, ... on added tokens (leftmost, longest)."""
        parts, pos, last = [], 0, 0
        while self._candidates is not None:
            m = self._candidates.search(text, pos)
            if m is None:
                break
            start, end = m.span()
            if m.group() not in self._added_by_content:
                end = start  # a bracketed non-token: only another token may start here
            if self._others is not None:
                other = self._others.match(text, start)
                if other is not None and other.end() > end:
                    end = other.end()
            if end == start:
                pos = start + 1
                continue
            if start > last:
                parts.append(text[last:start])
            parts.append(text[start:end])
            last = pos = end
        if last < len(text):
            parts.append(text[last:])
        return parts

    def _segments(self, text: str) -> list[str]:
        """transformers' added-token split, with the tokens' stripping flags applied."""
        parts = self._split_added(text)
        if not self._strippers:
            return parts
        for i, part in enumerate(parts):
            token = self._added_by_content.get(part)
            if token is None:
                continue
            left = parts[i - 1] if i > 0 else None
            right = parts[i + 1] if i < len(parts) - 1 else None
            if token.rstrip and right:
                parts[i + 1] = right.lstrip()
            if token.lstrip and left:
                parts[i - 1] = left.rstrip()
            if token.single_word and left and left[-1] != " ":
                parts[i - 1] += part
                parts[i] = ""
            elif token.single_word and right and right[0] != " ":
                parts[i + 1] = part + parts[i + 1]
                parts[i] = ""
        return parts

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` (with BOS first unless ``add_bos`` is False)."""
        ids = [self.bos_id] if add_bos else []
        for part in self._segments(text):
            if not part:
                continue
            token = self._added_by_content.get(part)
            if token is not None:
                ids.append(token.id)
            else:
                ids.extend(self._sp_encode(part))
        return ids

    def encode_units(self, units: str) -> list[int]:
        """Ids of a string made only of ``[HuN]``/``[PiN]``/``[StN]`` tokens, without
        SentencePiece: a dictionary look-up per token.

        These are the ids the tokens get inside any prompt (they are atomic in both
        storage ways); what precedes them (BOS, the dummy-prefix ``▁`` or ``[Speech]``)
        is up to the caller, :meth:`encode` does it the reference's way.
        """
        tokens = _UNIT_TOKEN.findall(units)
        if sum(map(len, tokens)) != len(units):
            bad = _UNIT_TOKEN.sub("", units)
            raise UnitsError(f"Unit string contains {bad[:40]!r}, which is not [HuN]/[PiN]/[StN] tokens.")
        try:
            return [self._unit_ids[t] for t in tokens]
        except KeyError as exc:
            raise UnitsError(
                f"Unit token {exc.args[0]} is not in this model's vocabulary "
                f"({self.vocab.hubert_count} Hubert, {self.vocab.pitch_count} pitch, "
                f"{self.vocab.style_count} style units)."
            ) from None

    # -- decoding --------------------------------------------------------------------

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < len(self._id_to_token):
            raise UnitsError(
                f"Token id {token_id} is outside the tokenizer's vocabulary (0..{len(self._id_to_token) - 1})."
            )
        return self._id_to_token[token_id]

    def _pieces_to_string(self, pieces: list[str]) -> str:
        # The dummy prefix of the first piece is dropped, SentencePiece joins the rest.
        if pieces[0].startswith(SPIECE_UNDERLINE):
            pieces = [pieces[0][1:]] + pieces[1:]
        return self.sp.decode(pieces)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, as ``LlamaTokenizer.decode(ids, skip_special_tokens=True)``."""
        sub_texts: list[str] = []
        run: list[str] = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id in self._special_ids:
                continue
            token = self.id_to_token(token_id)
            if token in self._all_special:
                continue
            if token in self._legacy_added:
                if run:
                    text = self._pieces_to_string(run)
                    if text:
                        sub_texts.append(text)
                    run = []
                sub_texts.append(token)
            else:
                run.append(token)
        if run:
            sub_texts.append(self._pieces_to_string(run))
        text = " ".join(sub_texts)
        if self.clean_up_tokenization_spaces:
            for old, new in _CLEANUPS:
                text = text.replace(old, new)
        return text

    def __len__(self) -> int:
        return len(self._id_to_token)

    def __repr__(self) -> str:
        return f"SpiritTokenizer({self.source!r}, {len(self)} tokens)"
