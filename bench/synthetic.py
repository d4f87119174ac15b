"""Full-size random-weight bundles for benchmarks: the released shapes, without the gated weights.

``build_synthetic_bundle("base-7b")`` writes, once, a checkpoint root in the release's
formats with random weights of exactly the released sizes, and builds a bundle from it
with the ordinary exporters (``export/build.py``), cached under the user cache directory::

    <user cache>/spiritlm-edge/synthetic-base-7b/
        checkpoints/          speech_tokenizer/ + spiritlm_model/ (random, release formats)
        bundle-Q4_K_M/        the bundle (ONNX speech engines + Q4_K_M GGUF + VAD)
        synthetic.json        what was built, when, how long it took

* speech: HuBERT base 25 Hz (12 layers, 768), the pitch VQ-VAE, the wav2vec2-base style
  encoder and the unit HiFi-GAN at the release's size, from ``export/random_speech.py``;
* LM: Llama-2 7B (32 layers, 4096 hidden, 11008 FFN, 32 heads) with a 32 000-piece text
  vocabulary followed by the speech tokens (32 512 embedding rows for Base, 32 768 for
  Expressive), written by ``export/random_lm.py`` as ``model.safetensors`` (a release-supported weight format) tensor by
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
import time
from pathlib import Path

from platformdirs import user_cache_dir

from spiritlm_edge.quant.llama_quantize import check_quant
from spiritlm_edge.runtime.errors import ModelError

log = logging.getLogger(__name__)

SYNTHETIC_MODELS = {"base-7b": "base", "expressive-7b": "expressive"}
# Llama-2 7B, as in the released spirit-lm-*-7b/config.json
LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_layers": 32,
    "num_heads": 32,
    "num_kv_heads": 32,
    "context_length": 4096,
}
TEXT_VOCAB = 32000  # Llama-2's SentencePiece vocabulary

# Rough figures for the build on a 2-core x86 CPU (measured here), to tell the user up front.
_BUILD_MINUTES = {"speech": 4, "lm_write": 2, "lm_convert": 4, "quantize": 12}


def synthetic_dir(name: str, cache_dir: str | os.PathLike | None = None, lm_layers: int | None = None) -> Path:
    """``<user cache>/spiritlm-edge/synthetic-<name>`` (or under ``cache_dir``); a model
    cut to ``lm_layers`` LM layers gets its own ``-<n>layers`` directory."""
    check_name(name)
    if cache_dir is None:
        cache_dir = user_cache_dir("spiritlm-edge")
    suffix = "" if lm_layers in (None, LLAMA2_7B["num_layers"]) else f"-{lm_layers}layers"
    return Path(cache_dir) / f"synthetic-{name}{suffix}"


def check_name(name: str) -> str:
    if name not in SYNTHETIC_MODELS:
        raise ModelError(f"Unknown synthetic model {name!r}: choose {' or '.join(SYNTHETIC_MODELS)}.")
    return SYNTHETIC_MODELS[name]


def lm_parameter_count(variant: str, cfg: dict = LLAMA2_7B) -> int:
    rows = embedding_rows(variant)
    h, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_layers"]
    kv = cfg["num_kv_heads"] * h // cfg["num_heads"]
    per_layer = 2 * h * h + 2 * kv * h + 3 * h * f + 2 * h
    return 2 * rows * h + n * per_layer + h


def embedding_rows(variant: str, text_vocab: int = TEXT_VOCAB) -> int:
    # export/ needs torch (the export extra): planning and building import it, a run does not
    from spiritlm_edge.export import random_lm

    return random_lm.embedding_rows(variant, text_vocab)


def lm_config(lm_layers: int | None = None) -> dict:
    """Llama-2 7B's shapes, or the same layers but only ``lm_layers`` of them (for machines
    where the 7B does not fit: every per-layer figure stays that of the real model)."""
    cfg = dict(LLAMA2_7B)
    if lm_layers is not None:
        if not 1 <= lm_layers <= LLAMA2_7B["num_layers"]:
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


def _lm_progress():
    last = [0.0]

    def report(done, total):
        if done / total - last[0] >= 0.1 or done == total:
            last[0] = done / total
            log.info("  LM weights %3.0f%% written", 100 * done / total)

    return report


def build_synthetic_bundle(
    name: str,
    quant: str = "Q4_K_M",
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    n_threads: int | None = None,
    seed: int = 0,
    keep_checkpoints: bool = True,
    lm_layers: int | None = None,
) -> tuple[Path, Path | None]:
    """The cached synthetic bundle ``name`` in ``quant``, built first if needed.

    Returns (bundle directory, checkpoint root or None if it was not kept). A build that
    was interrupted is started again from the beginning of the missing part.
    ``lm_layers`` keeps only that many of the 7B's 32 layers (every other shape unchanged).
    """
    variant = check_name(name)
    quant = check_quant(quant)
    cfg = lm_config(lm_layers)
    home = synthetic_dir(name, cache_dir, lm_layers)
    root, bundle_dir, record = home / "checkpoints", home / f"bundle-{quant}", home / f"synthetic-{quant}.json"
    if record.is_file() and (bundle_dir / "bundle.json").is_file() and not rebuild:
        return bundle_dir, (root if (root / ".complete").is_file() else None)
    try:  # export/ needs torch (the export extra); this module is imported by every benchmark run
        from spiritlm_edge.export.build import build_bundle
        from spiritlm_edge.export.tiny import write_full_size_checkpoints
    except ImportError as exc:
        raise ImportError(
            f"building a synthetic bundle needs the export extra ({exc.name} is missing)", name=exc.name
        ) from exc
    log.info("%s", build_plan(name, quant, lm_layers))
    start = time.perf_counter()
    if rebuild or not (root / ".complete").is_file():
        shutil.rmtree(root, ignore_errors=True)
        write_full_size_checkpoints(root, variant, seed, lm_cfg=cfg, text_vocab=TEXT_VOCAB, lm_progress=_lm_progress())
        (root / ".complete").write_text("random weights, released shapes\n")
    written = time.perf_counter() - start
    shutil.rmtree(bundle_dir, ignore_errors=True)
    build_bundle(root, variant, bundle_dir, quant=quant, n_threads=n_threads)
    info = {
        "name": name,
        "variant": variant,
        "quant": quant,
        "weights": "synthetic (random, released shapes)",
        "seed": seed,
        "lm_layers": cfg["num_layers"],
        "lm_parameters": lm_parameter_count(variant, cfg),
        "built": time.strftime("%Y-%m-%d %H:%M:%S"),
        "checkpoint_seconds": round(written, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
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
