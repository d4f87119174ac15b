"""Random-weight Spirit LM language models in the release's format: tiny ones for tests and
the demo, Llama-2 7B-sized ones for benchmarks.

Both write a real ``spirit-lm-<variant>-7b`` directory (config, tokenizer files, weights)
that the ordinary loaders and the GGUF converter read as they read the release. The
tokenizer is a real SentencePiece BPE model trained on pseudo-English, with the speech
tokens appended as the release has them; the full-size one is padded with never-merged
filler pieces so that every speech token sits at its released id.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from spiritlm_edge.export.checkpoints import CheckpointPaths, check_variant
from spiritlm_edge.export.lm import EMBEDDING_ROW_MULTIPLE, speech_token_strings

_POOL_ELEMENTS = 1 << 22  # 8 MB of random bf16, reused with a random rotation per tensor
_WRITE_ELEMENTS = 1 << 24  # 32 MB per write call
# SentencePiece piece types (sentencepiece_model.proto)
NORMAL, USER_DEFINED = 1, 4


# -- tokenizers ------------------------------------------------------------------------------


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


def _sentencepiece_piece(piece: str, score: float = 0.0, piece_type: int = USER_DEFINED) -> bytes:
    """One ``ModelProto.pieces`` record (field 1), hand-encoded.

    Appending such records to a serialized model extends its piece list in order, the
    way a vocabulary is extended after training; no protobuf library needed.
    """
    text = piece.encode("utf-8")
    body = b"\x0a" + _varint(len(text)) + text  # piece
    body += b"\x15" + struct.pack("<f", score)  # score
    body += b"\x18" + _varint(piece_type)  # type
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
        model += b"".join(_sentencepiece_piece(t) for t in extra)
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


def write_full_size_tokenizer(lm_dir: Path, variant: str, seed: int, text_vocab: int) -> int:
    """The release's tokenizer layout at full size: ``text_vocab`` SentencePiece pieces, then
    the speech tokens as user-defined pieces. A small BPE model is trained (so encoding and
    decoding behave like Llama's) and padded with never-merged filler pieces to the full count,
    which puts every speech token at its released id. Returns the token count."""
    # The tiny writer lays down tokenizer_config.json / special_tokens_map.json as released;
    # tokenizer.model is then replaced by the full-size one.
    write_tiny_tokenizer(lm_dir, variant, seed)
    trained = 1000
    model = train_tiny_sentencepiece(seed, trained)
    model += b"".join(_sentencepiece_piece(f"\u2581synth{i}", -1e4 - i, NORMAL) for i in range(text_vocab - trained))
    model += b"".join(_sentencepiece_piece(token) for token in speech_token_strings(variant))
    (lm_dir / "tokenizer.model").write_bytes(model)
    return text_vocab + len(speech_token_strings(variant))


def embedding_rows(variant: str, text_vocab: int) -> int:
    """The released embedding row count: text vocabulary + speech tokens, padded."""
    tokens = text_vocab + len(speech_token_strings(variant))
    return -(-tokens // EMBEDDING_ROW_MULTIPLE) * EMBEDDING_ROW_MULTIPLE


# -- weights -----------------------------------------------------------------------------------


def _write_llama_config(lm_dir: Path, cfg: dict, rows: int) -> dict:
    """config.json and generation_config.json as released, with the shapes of ``cfg``
    (hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, context_length)
    and ``rows`` embedding rows; returns the config."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": cfg["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": cfg["intermediate_size"],
        "max_position_embeddings": cfg["context_length"],
        "model_type": "llama",
        "num_attention_heads": cfg["num_heads"],
        "num_hidden_layers": cfg["num_layers"],
        "num_key_value_heads": cfg["num_kv_heads"],
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
    return config


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


def write_tiny_lm(
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
    shapes = {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_layers": num_layers,
        "num_heads": heads,
        "num_kv_heads": heads // 2 if variant == "expressive" else heads,
        "context_length": 4096,
    }
    config = _write_llama_config(lm_dir, shapes, rows)
    torch.save(tiny_state_dict(config, seed, n_tokens), lm_dir / "pytorch_model.bin")
    return lm_dir


def _lm_tensors(cfg: dict, rows: int) -> list[tuple[str, tuple[int, ...], float | None]]:
    """(name, shape, std or None for a norm weight of ones), in LlamaForCausalLM's order."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_kv_heads"] * h // cfg["num_heads"]
    tensors: list[tuple[str, tuple[int, ...], float | None]] = [("model.embed_tokens.weight", (rows, h), 1.0)]
    for i in range(cfg["num_layers"]):
        p = f"model.layers.{i}."
        tensors += [
            (p + "self_attn.q_proj.weight", (h, h), h**-0.5),
            (p + "self_attn.k_proj.weight", (kv, h), h**-0.5),
            (p + "self_attn.v_proj.weight", (kv, h), h**-0.5),
            (p + "self_attn.o_proj.weight", (h, h), h**-0.5),
            (p + "mlp.gate_proj.weight", (f, h), h**-0.5),
            (p + "mlp.up_proj.weight", (f, h), h**-0.5),
            (p + "mlp.down_proj.weight", (h, f), f**-0.5),
            (p + "input_layernorm.weight", (h,), None),
            (p + "post_attention_layernorm.weight", (h,), None),
        ]
    tensors += [("model.norm.weight", (h,), None), ("lm_head.weight", (rows, h), h**-0.5)]
    return tensors


def write_random_safetensors(path: Path, tensors, seed: int, progress: Callable[[int, int], None] | None = None) -> int:
    """Stream random bf16 tensors into a safetensors file; returns its size in bytes.

    Memory: one 8 MB pool of random numbers (per standard deviation) and one 32 MB write
    buffer, whatever the model size.
    """
    generator = torch.Generator().manual_seed(seed)
    unit = torch.randn(_POOL_ELEMENTS, generator=generator)
    pools: dict[float | None, np.ndarray] = {}

    def pool(std):
        if std not in pools:
            values = torch.ones(_POOL_ELEMENTS) if std is None else unit * std
            pools[std] = values.to(torch.bfloat16).view(torch.int16).numpy()
        return pools[std]

    header, offset = {}, 0
    for name, shape, _ in tensors:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", "note": "spiritlm-edge synthetic: random weights"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".part")
    total = sum(math.prod(s) for _, s, _ in tensors)
    done = 0
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _name, shape, std in tensors:
            values = pool(std)
            n = math.prod(shape)
            start = int(rng.integers(_POOL_ELEMENTS))
            rotated = np.concatenate([values[start:], values[:start]])
            reps = -(-min(n, _WRITE_ELEMENTS) // _POOL_ELEMENTS)
            block = np.tile(rotated, reps)
            written = 0
            while written < n:
                k = min(n - written, block.size)
                f.write(block[:k].tobytes())
                written += k
            done += n
            if progress is not None:
                progress(done, total)
    os.replace(tmp, path)
    return path.stat().st_size


def write_random_lm(
    paths: CheckpointPaths,
    variant: str,
    seed: int,
    cfg: dict,
    text_vocab: int,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """A ``spirit-lm-<variant>-7b`` directory in the release's format (config, tokenizer
    files, ``model.safetensors``) with random weights of the shapes in ``cfg``."""
    check_variant(variant)
    lm_dir = paths.lm_dir(variant)
    lm_dir.mkdir(parents=True, exist_ok=True)
    n_tokens = write_full_size_tokenizer(lm_dir, variant, seed, text_vocab)
    rows = embedding_rows(variant, text_vocab)
    assert rows >= n_tokens
    _write_llama_config(lm_dir, cfg, rows)
    (lm_dir / "pytorch_model.bin").unlink(missing_ok=True)  # the tiny writer's; safetensors is ours
    write_random_safetensors(lm_dir / "model.safetensors", _lm_tensors(cfg, rows), seed, progress)
    return lm_dir
