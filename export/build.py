"""``spiritlm-edge build``: one command from a checkpoint root to a complete bundle.

A bundle holds every engine the runtime needs: the speech ONNX models, the LM's GGUF
(which carries its tokenizer) and the Silero VAD model for the live loop, each recorded
with its hash in ``bundle.json``. It can be copied to a device that has only the edge
install.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from spiritlm_edge.export.checkpoints import CheckpointPaths, check_variant, resolve_checkpoint_root
from spiritlm_edge.export.lm import export_lm
from spiritlm_edge.export.speech import export_speech
from spiritlm_edge.quant.llama_quantize import check_quant
from spiritlm_edge.runtime.bundle import add_component, read_manifest
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
