"""``spiritlm-edge build``: one command from a checkpoint root to a complete bundle.

A bundle holds every engine the runtime needs: the speech ONNX models, the LM's GGUF
(which carries its tokenizer) and the Silero VAD model for the live loop, each recorded
with its hash in ``bundle.json``. It can be copied to a device that has only the edge
install.

This is the one module of ``export/`` above ``quant/``: the LM reaches the bundle through
the GGUF converter and llama.cpp's quantizer.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tqdm import tqdm

from spiritlm_edge.export.checkpoints import CheckpointPaths, check_variant, resolve_checkpoint_root
from spiritlm_edge.export.lm import load_lm_config
from spiritlm_edge.export.speech import export_speech
from spiritlm_edge.quant.gguf_convert import convert_lm
from spiritlm_edge.quant.llama_quantize import CONVERTER_TYPES, check_quant, quantize_gguf
from spiritlm_edge.runtime.bundle import add_component, read_manifest
from spiritlm_edge.runtime.gguf_file import FORMAT_VERSION as GGUF_FORMAT_VERSION
from spiritlm_edge.runtime.vad import BUNDLE_COMPONENT, MODEL_FILE, packaged_model_path

log = logging.getLogger(__name__)


def add_vad(bundle_dir: str | Path) -> bool:
    """Copy the Silero VAD ONNX model (MIT) of the installed ``silero-vad`` package into
    the bundle. Returns False, with a warning, where that package is not installed: the
    bundle then still works for files, and ``run --mic`` needs ``--vad-model``."""
    source = packaged_model_path()
    if source is None:
        log.warning("silero-vad is not installed: the bundle gets no VAD model (pip install --no-deps silero-vad)")
        return False
    bundle_dir = Path(bundle_dir)
    shutil.copyfile(source, bundle_dir / MODEL_FILE)
    add_component(bundle_dir, BUNDLE_COMPONENT, {"file": MODEL_FILE, "source": "silero-vad (MIT)"})
    return True


def export_lm(
    checkpoints: str | Path | CheckpointPaths,
    variant: str,
    bundle_dir: str | Path,
    quant: str = "Q4_K_M",
    n_threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Convert the ``variant`` LM to ``bundle_dir/lm-<quant>.gguf`` and record it in the
    bundle as component ``lm``. The GGUF carries the tokenizer (see runtime/tokenizer.py).

    F32/F16/BF16 are written by the converter; Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0 are made
    from an exact BF16 intermediate by llama.cpp's quantizer (deleted afterwards).
    """
    quant = check_quant(quant)
    check_variant(variant)
    paths = checkpoints if isinstance(checkpoints, CheckpointPaths) else CheckpointPaths(Path(checkpoints))
    cfg = load_lm_config(paths, variant)
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    name = f"lm-{quant}.gguf"
    target = bundle_dir / name

    bar = None
    if progress:
        bar = tqdm(desc="converting LM", unit="tensor", leave=False)

    def on_tensor(done, total, tensor_name):
        if bar is not None:
            bar.total = total
            bar.update(1)

    try:
        if quant in CONVERTER_TYPES:
            convert_lm(cfg.lm_dir, target, quant, variant=variant, progress=on_tensor)
        else:
            intermediate = bundle_dir / f".lm-BF16-{quant}.gguf"
            try:
                convert_lm(cfg.lm_dir, intermediate, "BF16", variant=variant, progress=on_tensor)
                if bar is not None:
                    bar.close()
                    bar = None
                quantize_gguf(intermediate, target, quant, n_threads=n_threads, progress=progress)
            finally:
                intermediate.unlink(missing_ok=True)
    finally:
        if bar is not None:
            bar.close()
    add_component(
        bundle_dir,
        "lm",
        {
            "file": name,
            "quant": quant,
            "format": "gguf",
            "spiritlm_format_version": GGUF_FORMAT_VERSION,
            "context_length": cfg.context_length,
            "n_vocab": cfg.vocab_size,
            "tokenizer": "embedded (spiritlm.tokenizer.* GGUF metadata)",
        },
        variant=variant,
    )
    return target


def build_bundle(
    checkpoints: str | Path | None,
    variant: str,
    out: str | Path,
    quant: str = "Q4_K_M",
    fcpe_weights: str | Path | None = None,
    n_threads: int | None = None,
    vocoder_layout: str = "blocked",
) -> dict:
    """Export speech engines, LM and VAD of ``variant`` into bundle ``out``; returns the manifest."""
    check_variant(variant)
    check_quant(quant)  # before minutes of speech export
    paths = CheckpointPaths(resolve_checkpoint_root(checkpoints))
    out = Path(out)
    export_speech(paths.root, variant, out, fcpe_weights=fcpe_weights, vocoder_layout=vocoder_layout)
    export_lm(paths, variant, out, quant=quant, n_threads=n_threads)
    add_vad(out)
    return read_manifest(out)
