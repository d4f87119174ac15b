"""The Spirit LM language model checkpoint: loading its configuration, checking its
tokenizer files, and writing tiny random-weight copies in the release's format.

The release (spec sections 1-2) is a Llama-2 7B ``LlamaForCausalLM`` directory::

    spiritlm_model/spirit-lm-<variant>-7b/
        config.json  generation_config.json  pytorch_model.bin (bf16)
        special_tokens_map.json  tokenizer_config.json  tokenizer.model

Its vocabulary is the SentencePiece text vocabulary followed, in this order, by
``[Text] [Speech] [Hu0..Hu500]`` (+ ``[Pi0..Pi63] [St0..St99]`` for Expressive), and the
embedding matrix is padded to a multiple of 256 rows.
"""

from __future__ import annotations

import io
import json
import logging
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from spiritlm_edge.export.checkpoints import (
    CheckpointPaths,
    check_variant,
    get_key,
    load_json,
    require_file,
)
from spiritlm_edge.runtime.errors import CheckpointError

log = logging.getLogger(__name__)

LM_FILES = (
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "tokenizer.model",
)
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")
# The release pads the embedding rows to a multiple of this (32503 -> 32512, 32667 -> 32768).
EMBEDDING_ROW_MULTIPLE = 256


@dataclass(frozen=True)
class LMConfig:
    """The hyper-parameters of a Spirit LM checkpoint that the GGUF converter needs."""

    lm_dir: Path
    variant: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int  # embedding rows (padded)
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    bos_token_id: int
    eos_token_id: int
    tie_word_embeddings: bool
    weights_path: Path

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def speech_token_strings(variant: str) -> list[str]:
    """The tokens that follow the text vocabulary, in the release's order (spec section 2)."""
    tokens = ["[Text]", "[Speech]"] + [f"[Hu{i}]" for i in range(501)]
    if check_variant(variant) == "expressive":
        tokens += [f"[Pi{i}]" for i in range(64)] + [f"[St{i}]" for i in range(100)]
    return tokens


def find_weights(lm_dir: Path) -> Path:
    for name in WEIGHT_FILES:
        if (lm_dir / name).is_file():
            return lm_dir / name
    raise CheckpointError(
        f"Missing LM weights: {lm_dir} has neither {' nor '.join(WEIGHT_FILES)}. "
        "Copy the release's spirit-lm-*-7b directory completely."
    )


def load_lm_config(paths: CheckpointPaths | Path, variant: str) -> LMConfig:
    """Read and check ``config.json`` and the tokenizer files of the ``variant`` LM.

    ``paths`` is a checkpoint root (:class:`CheckpointPaths`) or the LM directory itself.
    Checks: every file present, a Llama config, a tokenizer whose speech tokens follow
    the text vocabulary in the release's order, and an embedding at least as large as
    the tokenizer.
    """
    from spiritlm_edge.runtime.tokenizer import SpiritTokenizer

    check_variant(variant)
    lm_dir = paths.lm_dir(variant) if isinstance(paths, CheckpointPaths) else Path(paths)
    if not lm_dir.is_dir():
        raise CheckpointError(
            f"LM directory {lm_dir} does not exist: expected spiritlm_model/spirit-lm-{variant}-7b "
            "under the checkpoint root."
        )
    for name in LM_FILES:
        require_file(lm_dir / name, f"LM file {name}")
    weights = find_weights(lm_dir)
    config_path = lm_dir / "config.json"
    config = load_json(config_path, "LM config")
    model_type = config.get("model_type")
    if model_type != "llama":
        raise CheckpointError(
            f"LM config {config_path} has model_type={model_type!r}; Spirit LM is a 'llama' model."
        )

    def key(name):
        return get_key(config, name, config_path, "LM config")

    hidden = int(key("hidden_size"))
    heads = int(key("num_attention_heads"))
    if hidden % heads:
        raise CheckpointError(f"LM config {config_path}: hidden_size {hidden} is not a multiple of heads {heads}.")
    cfg = LMConfig(
        lm_dir=lm_dir,
        variant=variant,
        hidden_size=hidden,
        intermediate_size=int(key("intermediate_size")),
        num_layers=int(key("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        vocab_size=int(key("vocab_size")),
        context_length=int(config.get("max_position_embeddings", 4096)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        bos_token_id=int(config.get("bos_token_id", 1)),
        eos_token_id=int(config.get("eos_token_id", 2)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        weights_path=weights,
    )
    if config.get("rope_scaling"):
        raise CheckpointError(
            f"LM config {config_path} sets rope_scaling={config['rope_scaling']!r}; Spirit LM uses none "
            "and the converter does not support it."
        )
    tokenizer = SpiritTokenizer.from_dir(lm_dir, variant=variant)
    if tokenizer.vocab.size > cfg.vocab_size:
        raise CheckpointError(
            f"The LM tokenizer in {lm_dir} has {tokenizer.vocab.size} tokens but config.json's "
            f"vocab_size is {cfg.vocab_size}: the tokenizer files and the model do not belong together. "
            "Re-download the spirit-lm directory as released."
        )
    return cfg


# ---------------------------------------------------------------------------------------
# Tiny checkpoints


def _tiny_corpus(seed: int, n_lines: int = 600) -> list[str]:
    """A few KB of pseudo-English with digits, punctuation and some non-ASCII, for BPE."""
    rng = random.Random(seed)
    syllables = (
        "the an in on at re de co pro ex ter al ing ed er est ly ment tion ous able sp ir it "
        "lm ma ki no ra so ta ve wo yu za ch sh th ph qu ou ea ai oo ee ar or ur ic ly ful"
    ).split()
    words = []
    for _ in range(400):
        words.append("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))))
    extras = ["café", "naïve", "über", "año", "日本", "語", "Ж", "ß", "—", "€5", "3.14", "2024"]
    lines = []
    for _ in range(n_lines):
        n = rng.randint(3, 14)
        sentence = [rng.choice(words) if rng.random() > 0.08 else rng.choice(extras) for _ in range(n)]
        sentence[0] = sentence[0].capitalize()
        text = " ".join(sentence) + rng.choice([".", "?", "!", ",", ":", ";"])
        if rng.random() < 0.2:
            text += f" {rng.randint(0, 9999)}"
        lines.append(text)
    return lines


def train_tiny_sentencepiece(seed: int, vocab_size: int = 1000) -> bytes:
    """A real SentencePiece BPE model trained like Llama's (byte fallback, split digits,
    identity normaliser, dummy prefix, whitespace kept), with ``vocab_size`` pieces."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tiny_corpus(seed)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _protobuf_user_defined_piece(piece: str) -> bytes:
    """One ``ModelProto.pieces`` entry (field 1) of type USER_DEFINED, hand-encoded.

    Appending such records to a serialized model extends its piece list in order, the
    way a vocabulary is extended after training; no protobuf library needed.
    """
    text = piece.encode("utf-8")
    body = b"\x0a" + _varint(len(text)) + text  # piece
    body += b"\x15" + struct.pack("<f", 0.0)  # score
    body += b"\x18" + _varint(4)  # type = USER_DEFINED
    return b"\x0a" + _varint(len(body)) + body


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _added_token(content: str, special: bool, normalized: bool) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def write_tiny_tokenizer(
    lm_dir: Path, variant: str, seed: int, text_vocab_size: int = 1000, storage: str = "pieces"
) -> int:
    """Write tokenizer.model, tokenizer_config.json and special_tokens_map.json.

    ``storage`` chooses where the speech tokens live: ``"pieces"`` appends them as
    user-defined SentencePiece pieces to tokenizer.model; ``"added"`` lists them as
    added tokens in tokenizer_config.json (``added_tokens_decoder``), the way
    ``tokenizer.add_tokens`` + ``save_pretrained`` stores them. Returns the token count.
    """
    if storage not in ("pieces", "added"):
        raise ValueError(f"storage must be 'pieces' or 'added', not {storage!r}")
    model = train_tiny_sentencepiece(seed, text_vocab_size)
    extra = speech_token_strings(variant)
    decoder = {
        "0": _added_token("<unk>", True, False),
        "1": _added_token("<s>", True, False),
        "2": _added_token("</s>", True, False),
    }
    if storage == "pieces":
        model += b"".join(_protobuf_user_defined_piece(t) for t in extra)
    else:
        for offset, token in enumerate(extra):
            decoder[str(text_vocab_size + offset)] = _added_token(token, False, True)
    (lm_dir / "tokenizer.model").write_bytes(model)
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    }
    (lm_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (lm_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return text_vocab_size + len(extra)


def tiny_state_dict(config: dict, seed: int, n_tokens: int) -> dict[str, torch.Tensor]:
    """Random bf16 weights with the names of ``LlamaForCausalLM.state_dict()``.

    Scales are chosen so that the residual stream changes layer to layer and the output
    distribution is peaked (greedy decoding is then not decided by rounding noise). The
    padding rows (``n_tokens`` and up) are zero, so the model never prefers them.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = config["hidden_size"]
    inter = config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    rows = config["vocab_size"]

    def normal(*shape, std):
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    def norm_weight():
        return (1.0 + 0.1 * torch.randn(hidden, generator=gen)).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": normal(rows, hidden, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = normal(hidden, hidden, std=hidden**-0.5)
        sd[p + "self_attn.k_proj.weight"] = normal(kv, hidden, std=hidden**-0.5)
        sd[p + "self_attn.v_proj.weight"] = normal(kv, hidden, std=hidden**-0.5)
        sd[p + "self_attn.o_proj.weight"] = normal(hidden, hidden, std=hidden**-0.5)
        sd[p + "mlp.gate_proj.weight"] = normal(inter, hidden, std=hidden**-0.5)
        sd[p + "mlp.up_proj.weight"] = normal(inter, hidden, std=hidden**-0.5)
        sd[p + "mlp.down_proj.weight"] = normal(hidden, inter, std=inter**-0.5)
        sd[p + "input_layernorm.weight"] = norm_weight()
        sd[p + "post_attention_layernorm.weight"] = norm_weight()
    sd["model.norm.weight"] = norm_weight()
    # Each token prefers one successor (a fixed random permutation): its output row leans
    # towards the input embedding of the current token. Distributions are then peaked, so
    # greedy continuations are not decided by f16 rounding, while attention and MLP still
    # move the logits of every other token.
    embed = sd["model.embed_tokens.weight"].float()
    successor = torch.randperm(n_tokens, generator=gen)
    head = torch.randn(rows, hidden, generator=gen) * 0.25
    head[successor] += 1.5 * embed[:n_tokens] / hidden**0.5
    sd["lm_head.weight"] = head.to(torch.bfloat16)
    sd["model.embed_tokens.weight"][n_tokens:] = 0
    sd["lm_head.weight"][n_tokens:] = 0
    return sd


def write_tiny(
    paths: CheckpointPaths,
    variant: str = "base",
    seed: int = 0,
    *,
    tokenizer_storage: str = "pieces",
    text_vocab_size: int = 1000,
    hidden_size: int = 256,
    num_layers: int = 2,
) -> Path:
    """Write a tiny ``spirit-lm-<variant>-7b`` directory in the release's format.

    Llama architecture with hidden size 256 (llama.cpp's k-quants need rows that are a
    multiple of 256), head_dim 64, 2 layers; Expressive uses grouped-query attention
    (2 KV heads) so that the converter's K permutation is exercised with n_kv != n_head.
    """
    check_variant(variant)
    lm_dir = paths.lm_dir(variant)
    lm_dir.mkdir(parents=True, exist_ok=True)
    n_tokens = write_tiny_tokenizer(lm_dir, variant, seed, text_vocab_size, tokenizer_storage)
    rows = -(-n_tokens // EMBEDDING_ROW_MULTIPLE) * EMBEDDING_ROW_MULTIPLE
    heads = hidden_size // 64
    config = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": 2 * hidden_size,
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": heads // 2 if variant == "expressive" else heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": rows,
    }
    (lm_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    (lm_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    torch.save(tiny_state_dict(config, seed, n_tokens), lm_dir / "pytorch_model.bin")
    return lm_dir
