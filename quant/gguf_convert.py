"""Spirit LM checkpoint -> GGUF (llama architecture) for llama.cpp, streamed.

The converter reads the release's ``spirit-lm-<variant>-7b`` directory and writes one
self-describing GGUF: llama hyper-parameters, tensors under llama.cpp's names (Q and K
rows permuted the way llama.cpp's rotary embedding expects for Hugging Face weights),
the full vocabulary with SentencePiece scores and token types, and our own ``spiritlm.*``
keys (:class:`~spiritlm_edge.runtime.gguf_file.Keys`): the variant, where the modality and
unit tokens sit, and the exact tokenizer files (``tokenizer.model`` bytes and the added-token table) so that the runtime
tokenizes like the reference from the GGUF alone.

Weights are streamed: ``pytorch_model.bin`` is memory-mapped (``torch.load(mmap=True)``)
or ``model.safetensors`` opened lazily, tensor infos are written first, then each tensor
is converted and written on its own, so peak memory is about one tensor (a 7B bf16
checkpoint converts in well under 1 GB of RAM).

Quantized files (Q4_K_M, ...) are made from the BF16 GGUF by llama.cpp's own quantizer,
see :mod:`spiritlm_edge.quant.llama_quantize`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open

from spiritlm_edge.export.checkpoints import CheckpointPaths, shape_mismatches
from spiritlm_edge.export.lm import LMConfig, load_lm_config
from spiritlm_edge.runtime.errors import CheckpointError, ModelError
from spiritlm_edge.runtime.gguf_file import FORMAT_VERSION, Keys, encode_sentencepiece_model
from spiritlm_edge.runtime.tokenizer import SpiritTokenizer

log = logging.getLogger(__name__)

# outtype -> (GGML tensor type name, llama.cpp file type id)
OUTTYPES = {"F32": ("F32", 0), "F16": ("F16", 1), "BF16": ("BF16", 32), "Q8_0": ("Q8_0", 7)}

# llama.cpp token types (llama_token_type / gguf TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for a ``LlamaForCausalLM`` tensor (None: not stored)."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None  # recomputed by llama.cpp from rope.freq_base
    parts = hf_name.split(".")
    if len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        layer, module = parts[2], ".".join(parts[3:5])
        per_layer = {
            "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate",
            "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down",
        }
        if module in per_layer:
            return f"blk.{layer}.{per_layer[module]}.weight"
    if len(parts) == 5 and parts[:2] == ["model", "layers"]:
        norms = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
        if parts[3] in norms and parts[4] == "weight":
            return f"blk.{parts[2]}.{norms[parts[3]]}.weight"
    raise CheckpointError(
        f"Unexpected tensor {hf_name!r} in the LM weights: not a LlamaForCausalLM parameter. "
        "Is this the Spirit LM checkpoint?"
    )


def rope_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder Q/K rows from HF's rotate-half layout to llama.cpp's interleaved pairs.

    HF keeps each head's first-half and second-half rotary dims apart; llama.cpp rotates
    adjacent pairs, so row ``h*d + 2*i + j`` must take HF row ``h*d + j*d/2 + i``.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


class _WeightSource:
    """Lazy, tensor-by-tensor access to ``pytorch_model.bin`` or ``model.safetensors``."""

    def __init__(self, path: Path):
        self.path = path
        self._st: Any = None  # safetensors' lazy file handle
        self._sd: dict[str, torch.Tensor] | None = None  # or a memory-mapped state dict
        if path.suffix == ".safetensors":
            try:
                self._st = safe_open(str(path), framework="pt")
            except Exception as exc:
                raise CheckpointError(f"Cannot read LM weights {path}: {exc}. Re-download the file.") from None
            self.names = list(self._st.keys())
            self._shapes = {n: tuple(self._st.get_slice(n).get_shape()) for n in self.names}
        else:
            try:
                self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise CheckpointError(f"Cannot read LM weights {path}: {exc}. Re-download the file.") from None
                # Old (non-zip) torch files cannot be mapped: read them whole.
                log.warning("%s is not memory-mappable; loading it fully into RAM", path)
                self._sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointError(
                    f"Cannot read LM weights {path}: {type(exc).__name__}: {str(exc)[:300]}. Re-download the file."
                ) from None
            if not isinstance(self._sd, dict):
                raise CheckpointError(f"LM weights {path} hold a {type(self._sd).__name__}, expected a state dict.")
            self.names = list(self._sd)
            self._shapes = {n: tuple(t.shape) for n, t in self._sd.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        if self._st is not None:
            return self._st.get_tensor(name)
        assert self._sd is not None
        return self._sd[name]


def _expected_shapes(cfg: LMConfig) -> dict[str, tuple[int, ...]]:
    h, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    shapes = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
                p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
                p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    return shapes


def _check_weights(source: _WeightSource, cfg: LMConfig) -> list[str]:
    expected = _expected_shapes(cfg)
    present = [n for n in source.names if not n.endswith("rotary_emb.inv_freq")]
    problems = shape_mismatches(expected, {n: tuple(source.shape(n)) for n in present}, limit=4)
    if problems:
        raise CheckpointError(
            f"LM weights {source.path} do not match {cfg.lm_dir / 'config.json'}: "
            + " | ".join(problems)
            + ". The files do not belong together; re-download the checkpoint."
        )
    return list(expected)  # a fixed order: re-running the conversion gives the same bytes


def vocab_arrays(tokenizer, rows: int) -> tuple[list[str], list[float], list[int]]:
    """Token strings, scores and llama.cpp token types for all ``rows`` embedding rows."""
    sp = tokenizer.sp
    tokens, scores, types = [], [], []
    added = {t.id: t for t in tokenizer.added_tokens}
    for i in range(rows):
        if i in added and (i >= tokenizer.n_pieces or not (sp.is_unknown(i) or sp.is_control(i))):
            token = added[i]
            tokens.append(token.content)
            scores.append(0.0)
            types.append(CONTROL if token.special else USER_DEFINED)
        elif i < tokenizer.n_pieces:
            tokens.append(sp.id_to_piece(i))
            scores.append(float(sp.get_score(i)))
            if sp.is_unknown(i):
                types.append(UNKNOWN)
            elif sp.is_control(i):
                types.append(CONTROL)
            elif sp.is_byte(i):
                types.append(BYTE)
            elif sp.is_unused(i):
                types.append(UNUSED)
            elif tokenizer.vocab.text_id <= i < tokenizer.vocab.n_real:
                # speech/modality pieces are user-defined SentencePiece pieces: atomic in llama.cpp
                types.append(USER_DEFINED)
            else:
                types.append(NORMAL)
        else:
            tokens.append(f"[PAD{i}]")  # embedding padding rows: never produced by the tokenizer
            scores.append(-1000.0)
            types.append(UNUSED)
    return tokens, scores, types


def _convert_tensor(name: str, tensor: torch.Tensor, cfg: LMConfig, outtype: str) -> tuple[np.ndarray, object]:
    if name.endswith("q_proj.weight"):
        tensor = rope_permute(tensor, cfg.num_heads)
    elif name.endswith("k_proj.weight"):
        tensor = rope_permute(tensor, cfg.num_kv_heads)
    if tensor.ndim == 1 or outtype == "F32":
        return tensor.to(torch.float32).contiguous().numpy(), None
    if outtype == "F16":
        return tensor.to(torch.float16).contiguous().numpy(), None
    if outtype == "BF16":
        raw = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        return raw, gguf.GGMLQuantizationType.BF16
    if outtype == "Q8_0":
        data = gguf.quants.quantize(tensor.to(torch.float32).numpy(), gguf.GGMLQuantizationType.Q8_0)
        return data, gguf.GGMLQuantizationType.Q8_0
    raise AssertionError(outtype)


def _tensor_nbytes(shape: tuple[int, ...], outtype: str, ndim: int) -> tuple[int, type[np.generic], tuple[int, ...]]:
    if ndim == 1 or outtype == "F32":
        return int(np.prod(shape)) * 4, np.float32, shape
    if outtype == "F16":
        return int(np.prod(shape)) * 2, np.float16, shape
    if outtype == "BF16":
        return int(np.prod(shape)) * 2, np.int16, shape
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
    if shape[-1] % block:
        raise ModelError(f"Q8_0 needs rows that are a multiple of {block}; a tensor has shape {shape}.")
    byte_shape = (*shape[:-1], shape[-1] // block * size)
    return int(np.prod(byte_shape)), np.uint8, byte_shape


def convert_lm(
    lm_dir: str | os.PathLike | CheckpointPaths,
    out_path: str | os.PathLike,
    outtype: str = "F16",
    variant: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Write the LM of ``lm_dir`` (a spirit-lm-*-7b directory, or a checkpoint root with
    ``variant``) as a GGUF at ``out_path``. ``outtype``: F32, F16, BF16 or Q8_0.

    ``progress(done, total, tensor_name)`` is called after each tensor. The file is
    written under a temporary name and renamed at the end, so an interrupted conversion
    never leaves a truncated GGUF behind.
    """
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its INFO lines would interleave with our progress
    outtype = outtype.upper()
    if outtype not in OUTTYPES:
        raise ModelError(
            f"Unsupported GGUF outtype {outtype!r}: the converter writes {', '.join(OUTTYPES)}; "
            "k-quants (Q4_K_M, ...) are made from it with llama.cpp's quantizer "
            "(spiritlm-edge export lm --quant ...)."
        )
    if isinstance(lm_dir, CheckpointPaths):
        if variant is None:
            raise CheckpointError("convert_lm: a checkpoint root needs variant='base' or 'expressive'.")
        lm_dir = lm_dir.lm_dir(variant)
    lm_dir = Path(lm_dir)
    if variant is None:
        variant = "expressive" if "expressive" in lm_dir.name else "base"
    cfg = load_lm_config(lm_dir, variant)
    tokenizer = SpiritTokenizer.from_dir(lm_dir, variant=variant)
    source = _WeightSource(cfg.weights_path)
    names = _check_weights(source, cfg)
    vocab = tokenizer.vocab
    start = time.perf_counter()

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(out_path.name + ".part")
    writer = gguf.GGUFWriter(tmp_path, "llama")
    writer.add_name(f"spirit-lm-{variant}-7b")
    writer.add_file_type(OUTTYPES[outtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(cfg.vocab_size)

    tokens, scores, types = vocab_arrays(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_unk_token_id(tokenizer.unk_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    writer.add_uint32(Keys.FORMAT_VERSION, FORMAT_VERSION)
    writer.add_string(Keys.VARIANT, variant)
    writer.add_uint32(Keys.EMBEDDING_ROWS, cfg.vocab_size)
    writer.add_uint32(Keys.Token.TEXT, vocab.text_id)
    writer.add_uint32(Keys.Token.SPEECH, vocab.speech_id)
    writer.add_uint32(Keys.Token.HUBERT_FIRST, vocab.hubert_start)
    writer.add_uint32(Keys.Token.HUBERT_COUNT, vocab.hubert_count)
    writer.add_uint32(Keys.Token.PITCH_FIRST, vocab.pitch_start or 0)
    writer.add_uint32(Keys.Token.PITCH_COUNT, vocab.pitch_count)
    writer.add_uint32(Keys.Token.STYLE_FIRST, vocab.style_start or 0)
    writer.add_uint32(Keys.Token.STYLE_COUNT, vocab.style_count)
    writer.add_string(Keys.Tokenizer.SENTENCEPIECE_MODEL, encode_sentencepiece_model(tokenizer.model_proto))
    writer.add_string(Keys.Tokenizer.ADDED_TOKENS, tokenizer.added_tokens_json())
    writer.add_bool(Keys.Tokenizer.CLEAN_UP_TOKENIZATION_SPACES, tokenizer.clean_up_tokenization_spaces)

    gguf_names: dict[str, str] = {}
    for name in names:
        shape = source.shape(name)
        nbytes, dtype, byte_shape = _tensor_nbytes(shape, outtype, len(shape))
        raw = (
            None
            if dtype in (np.float32, np.float16)
            else (gguf.GGMLQuantizationType.BF16 if outtype == "BF16" else gguf.GGMLQuantizationType.Q8_0)
        )
        gguf_name = gguf_tensor_name(name)
        assert gguf_name is not None  # _check_weights lists only the tensors a GGUF stores
        gguf_names[name] = gguf_name
        writer.add_tensor_info(
            gguf_names[name],
            byte_shape if raw == gguf.GGMLQuantizationType.Q8_0 else shape,
            np.dtype(dtype),
            nbytes,
            raw_dtype=raw,
        )
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, name in enumerate(names, 1):
            data, _ = _convert_tensor(name, source.get(name), cfg, outtype)
            writer.write_tensor_data(data)
            del data
            if progress is not None:
                progress(done, len(names), gguf_names[name])
        writer.close()
    except BaseException:
        writer.close()
        tmp_path.unlink(missing_ok=True)
        raise
    os.replace(tmp_path, out_path)
    log.info(
        "wrote %s (%s, %.1f MB) in %.1f s",
        out_path,
        outtype,
        out_path.stat().st_size / 1e6,
        time.perf_counter() - start,
    )
    return out_path
