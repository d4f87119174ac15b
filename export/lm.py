"""The Spirit LM language model checkpoint: loading its configuration and checking its
tokenizer files (random-weight copies are written by ``export/random_lm.py``).

The release (spec sections 1-2) is a Llama-2 7B ``LlamaForCausalLM`` directory::

    spiritlm_model/spirit-lm-<variant>-7b/
        config.json  generation_config.json  pytorch_model.bin (bf16)
        special_tokens_map.json  tokenizer_config.json  tokenizer.model

Its vocabulary is the SentencePiece text vocabulary followed, in this order, by
``[Text] [Speech] [Hu0..Hu500]`` (+ ``[Pi0..Pi63] [St0..St99]`` for Expressive), and the
embedding matrix is padded to a multiple of 256 rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from spiritlm_edge.export.checkpoints import (
    CheckpointPaths,
    check_variant,
    get_key,
    load_json,
    require_file,
)
from spiritlm_edge.runtime.errors import CheckpointError
from spiritlm_edge.runtime.tokenizer import SpiritTokenizer

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
        raise CheckpointError(f"LM config {config_path} has model_type={model_type!r}; Spirit LM is a 'llama' model.")

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
