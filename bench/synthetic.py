"""Full-size random-weight bundles for benchmarks: the released shapes, without the gated weights.

``build_synthetic_bundle("base-7b")`` writes, once, a checkpoint root in the release's
formats with random weights of exactly the released sizes, and builds a bundle from it
with the ordinary exporters (``export/build.py``), cached under the user cache directory::

    <user cache>/spiritlm-edge/synthetic-base-7b/
        checkpoints/          speech_tokenizer/ + spiritlm_model/ (random, release formats)
        bundle-Q4_K_M/        the bundle (ONNX speech engines + Q4_K_M GGUF + VAD)
        synthetic.json        what was built, when, how long it took

* speech: HuBERT base 25 Hz (12 layers, 768), the pitch VQ-VAE, the wav2vec2-base style
  encoder and the unit HiFi-GAN at the release's size, from each component's own
  full-size writer;
* LM: Llama-2 7B (32 layers, 4096 hidden, 11008 FFN, 32 heads) with a 32 000-piece text
  vocabulary followed by the speech tokens (32 512 embedding rows for Base, 32 768 for
  Expressive), written as ``model.safetensors`` (a release-supported weight format) tensor by
  tensor, so it needs no more RAM than one tensor; then converted and quantized by the same
  code path as the real checkpoint.

Timing does not depend on weight values (dense kernels do the same work whatever the
numbers), so the speed figures are those of the real model; the answers are babble.
Random values are drawn once (a few MB of bf16) and reused tensor after tensor: drawing
7 billion normal numbers would take longer than the whole build.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SYNTHETIC_MODELS = {"base-7b": "base", "expressive-7b": "expressive"}
# Llama-2 7B, as in the released spirit-lm-*-7b/config.json
LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_layers": 32, "num_heads": 32,
             "num_kv_heads": 32, "context_length": 4096}
TEXT_VOCAB = 32000  # Llama-2's SentencePiece vocabulary
_POOL_ELEMENTS = 1 << 22  # 8 MB of random bf16, reused with a random rotation per tensor
_WRITE_ELEMENTS = 1 << 24  # 32 MB per write call

# Rough figures for the build on a 2-core x86 CPU (measured here), to tell the user up front.
_BUILD_MINUTES = {"speech": 4, "lm_write": 2, "lm_convert": 4, "quantize": 12}


def synthetic_dir(name: str, cache_dir: str | os.PathLike | None = None, lm_layers: int | None = None) -> Path:
    """``<user cache>/spiritlm-edge/synthetic-<name>`` (or under ``cache_dir``); a model
    cut to ``lm_layers`` LM layers gets its own ``-<n>layers`` directory."""
    check_name(name)
    if cache_dir is None:
        from platformdirs import user_cache_dir

        cache_dir = user_cache_dir("spiritlm-edge")
    suffix = "" if lm_layers in (None, LLAMA2_7B["num_layers"]) else f"-{lm_layers}layers"
    return Path(cache_dir) / f"synthetic-{name}{suffix}"


def check_name(name: str) -> str:
    if name not in SYNTHETIC_MODELS:
        from spiritlm_edge.runtime.errors import ModelError

        raise ModelError(f"Unknown synthetic model {name!r}: choose {' or '.join(SYNTHETIC_MODELS)}.")
    return SYNTHETIC_MODELS[name]


def lm_parameter_count(variant: str, cfg: dict = LLAMA2_7B) -> int:
    rows = embedding_rows(variant)
    h, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_layers"]
    kv = cfg["num_kv_heads"] * h // cfg["num_heads"]
    per_layer = 2 * h * h + 2 * kv * h + 3 * h * f + 2 * h
    return 2 * rows * h + n * per_layer + h


def embedding_rows(variant: str, text_vocab: int = TEXT_VOCAB) -> int:
    from spiritlm_edge.export.lm import EMBEDDING_ROW_MULTIPLE, speech_token_strings

    tokens = text_vocab + len(speech_token_strings(variant))
    return -(-tokens // EMBEDDING_ROW_MULTIPLE) * EMBEDDING_ROW_MULTIPLE


def lm_config(lm_layers: int | None = None) -> dict:
    """Llama-2 7B's shapes, or the same layers but only ``lm_layers`` of them (for machines
    where the 7B does not fit: every per-layer figure stays that of the real model)."""
    cfg = dict(LLAMA2_7B)
    if lm_layers is not None:
        if not 1 <= lm_layers <= LLAMA2_7B["num_layers"]:
            from spiritlm_edge.runtime.errors import ModelError

            raise ModelError(f"lm_layers must be 1..{LLAMA2_7B['num_layers']}, got {lm_layers}.")
        cfg["num_layers"] = lm_layers
    return cfg


def build_plan(name: str, quant: str = "Q4_K_M", lm_layers: int | None = None) -> str:
    """What building ``name`` costs: disk, RAM, time (said before starting)."""
    variant = check_name(name)
    cfg = lm_config(lm_layers)
    params = lm_parameter_count(variant, cfg)
    bf16_gb = params * 2 / 1e9
    share = params / lm_parameter_count(variant)
    minutes = _BUILD_MINUTES["speech"] + math.ceil(share * sum(v for k, v in _BUILD_MINUTES.items() if k != "speech"))
    layers = "" if lm_layers is None else f" cut to {cfg['num_layers']} layers"
    return (
        f"building synthetic {name}{layers} ({quant}) once: random weights, released shapes; LM {params / 1e9:.2f} B "
        f"parameters. Disk: {bf16_gb:.1f} GB checkpoint (kept, for --reference-lm) + {bf16_gb:.1f} GB BF16 "
        f"GGUF (temporary) + the {quant} GGUF. RAM: under 2 GB (tensor by tensor). Time: about "
        f"{minutes} minutes on 2 CPU cores (quantization is most of it), less with more cores."
    )


# -- the tokenizer ------------------------------------------------------------------------


def _piece(piece: str, score: float, piece_type: int) -> bytes:
    """One SentencePiece ``ModelProto.pieces`` record (field 1), hand-encoded."""
    from spiritlm_edge.export.lm import _varint

    text = piece.encode("utf-8")
    body = b"\x0a" + _varint(len(text)) + text + b"\x15" + struct.pack("<f", score) + b"\x18" + _varint(piece_type)
    return b"\x0a" + _varint(len(body)) + body


def write_tokenizer(lm_dir: Path, variant: str, seed: int, text_vocab: int = TEXT_VOCAB) -> int:
    """The release's tokenizer layout at full size: ``text_vocab`` SentencePiece pieces, then
    the speech tokens as user-defined pieces. A small BPE model is trained (so encoding and
    decoding behave like Llama's) and padded with never-merged filler pieces to the full count,
    which puts every speech token at its released id. Returns the token count."""
    from spiritlm_edge.export.lm import speech_token_strings, train_tiny_sentencepiece, write_tiny_tokenizer

    # The tiny writer lays down tokenizer_config.json / special_tokens_map.json as released;
    # tokenizer.model is then replaced by the full-size one.
    write_tiny_tokenizer(lm_dir, variant, seed)
    trained = 1000
    model = train_tiny_sentencepiece(seed, trained)
    normal, user_defined = 1, 4
    model += b"".join(_piece(f"\u2581synth{i}", -1e4 - i, normal) for i in range(text_vocab - trained))
    model += b"".join(_piece(token, 0.0, user_defined) for token in speech_token_strings(variant))
    (lm_dir / "tokenizer.model").write_bytes(model)
    return text_vocab + len(speech_token_strings(variant))


# -- the weights --------------------------------------------------------------------------


def _lm_tensors(cfg: dict, rows: int) -> list[tuple[str, tuple[int, ...], float | None]]:
    """(name, shape, std or None for a norm weight of ones), in LlamaForCausalLM's order."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_kv_heads"] * h // cfg["num_heads"]
    tensors = [("model.embed_tokens.weight", (rows, h), 1.0)]
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
    import numpy as np
    import torch

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
        for name, shape, std in tensors:
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


def write_random_lm(paths, variant: str, seed: int = 0, cfg: dict = LLAMA2_7B, text_vocab: int = TEXT_VOCAB,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """A ``spirit-lm-<variant>-7b`` directory in the release's format (config, tokenizer
    files, ``model.safetensors``) with random weights of the shapes in ``cfg``."""
    from spiritlm_edge.export.checkpoints import check_variant

    check_variant(variant)
    lm_dir = paths.lm_dir(variant)
    lm_dir.mkdir(parents=True, exist_ok=True)
    n_tokens = write_tokenizer(lm_dir, variant, seed, text_vocab)
    rows = embedding_rows(variant, text_vocab)
    assert rows >= n_tokens
    config = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": cfg["hidden_size"],
        "initializer_range": 0.02, "intermediate_size": cfg["intermediate_size"],
        "max_position_embeddings": cfg["context_length"], "model_type": "llama",
        "num_attention_heads": cfg["num_heads"], "num_hidden_layers": cfg["num_layers"],
        "num_key_value_heads": cfg["num_kv_heads"], "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": rows,
    }
    (lm_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    (lm_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (lm_dir / "pytorch_model.bin").unlink(missing_ok=True)  # the tiny writer's; safetensors is ours
    write_random_safetensors(lm_dir / "model.safetensors", _lm_tensors(cfg, rows), seed, progress)
    return lm_dir


def write_full_size_checkpoints(root: str | os.PathLike, variant: str, seed: int = 0,
                                lm_cfg: dict = LLAMA2_7B, text_vocab: int = TEXT_VOCAB) -> Path:
    """A checkpoint root with every component of ``variant`` at the release's size, random."""
    from spiritlm_edge.export import hubert, vocoder
    from spiritlm_edge.export.checkpoints import CheckpointPaths

    paths = CheckpointPaths(Path(root))
    steps = [("HuBERT base 25 Hz + quantizer", lambda s: hubert.write_tiny(paths, variant, s, size="full"))]
    if variant == "expressive":
        from spiritlm_edge.export import pitch, style

        steps += [("pitch VQ-VAE", lambda s: pitch.write_full_size_random(paths, s)),
                  ("wav2vec2-base style encoder", lambda s: style.write_tiny(paths, variant, s, size="full"))]
    steps += [("unit HiFi-GAN", lambda s: vocoder.write_random(paths, variant, s, size="full")),
              ("Llama-2 7B LM", lambda s: write_random_lm(paths, variant, s, lm_cfg, text_vocab, _lm_progress()))]
    for offset, (label, write) in enumerate(steps):
        start = time.perf_counter()
        write(seed * 1000 + offset)
        log.info("wrote random %s in %.0f s", label, time.perf_counter() - start)
    return paths.root


def _lm_progress():
    last = [0.0]

    def report(done, total):
        if done / total - last[0] >= 0.1 or done == total:
            last[0] = done / total
            log.info("  LM weights %3.0f%% written", 100 * done / total)

    return report


def build_synthetic_bundle(name: str, quant: str = "Q4_K_M", cache_dir: str | os.PathLike | None = None,
                           rebuild: bool = False, n_threads: int | None = None, seed: int = 0,
                           keep_checkpoints: bool = True, lm_layers: int | None = None) -> tuple[Path, Path | None]:
    """The cached synthetic bundle ``name`` in ``quant``, built first if needed.

    Returns (bundle directory, checkpoint root or None if it was not kept). A build that
    was interrupted is started again from the beginning of the missing part.
    ``lm_layers`` keeps only that many of the 7B's 32 layers (every other shape unchanged).
    """
    from spiritlm_edge.quant.llama_quantize import check_quant

    variant = check_name(name)
    quant = check_quant(quant)
    cfg = lm_config(lm_layers)
    home = synthetic_dir(name, cache_dir, lm_layers)
    root, bundle_dir, record = home / "checkpoints", home / f"bundle-{quant}", home / f"synthetic-{quant}.json"
    if record.is_file() and (bundle_dir / "bundle.json").is_file() and not rebuild:
        return bundle_dir, (root if (root / ".complete").is_file() else None)
    try:
        from spiritlm_edge.export.build import build_bundle
    except ImportError as exc:
        raise ImportError(f"building a synthetic bundle needs the export extra ({exc.name} is missing)",
                          name=exc.name) from exc
    log.info("%s", build_plan(name, quant, lm_layers))
    start = time.perf_counter()
    if rebuild or not (root / ".complete").is_file():
        shutil.rmtree(root, ignore_errors=True)
        write_full_size_checkpoints(root, variant, seed, lm_cfg=cfg)
        (root / ".complete").write_text("random weights, released shapes\n")
    written = time.perf_counter() - start
    shutil.rmtree(bundle_dir, ignore_errors=True)
    build_bundle(root, variant, bundle_dir, quant=quant, n_threads=n_threads)
    info = {
        "name": name, "variant": variant, "quant": quant, "weights": "synthetic (random, released shapes)",
        "seed": seed, "lm_layers": cfg["num_layers"], "lm_parameters": lm_parameter_count(variant, cfg), "built": time.strftime("%Y-%m-%d %H:%M:%S"),
        "checkpoint_seconds": round(written, 1), "total_seconds": round(time.perf_counter() - start, 1),
    }
    record.write_text(json.dumps(info, indent=2) + "\n")
    if not keep_checkpoints:
        shutil.rmtree(root, ignore_errors=True)
        return bundle_dir, None
    return bundle_dir, root


def synthetic_info(bundle_dir: str | os.PathLike) -> dict | None:
    """The build record of a synthetic bundle (None for a bundle of real weights)."""
    bundle_dir = Path(bundle_dir)
    quant = bundle_dir.name.removeprefix("bundle-")
    record = bundle_dir.parent / f"synthetic-{quant}.json"
    return json.loads(record.read_text()) if record.is_file() else None
