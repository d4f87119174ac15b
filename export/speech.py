"""``spiritlm-edge export speech``: every speech engine of a variant into one bundle.

Each component module (hubert, pitch, style, vocoder) exports its own ONNX graphs and
records them in ``bundle.json``; this module runs the ones the variant needs and writes
the bundle-wide facts (variant, sample rate, token rates).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from spiritlm_edge.export import hubert, pitch, style, vocoder
from spiritlm_edge.export.checkpoints import CheckpointPaths, check_variant, resolve_checkpoint_root
from spiritlm_edge.runtime.audio import SAMPLE_RATE
from spiritlm_edge.runtime.bundle import update_manifest

log = logging.getLogger(__name__)

# Spec section 5: the rates at which unit streams are laid out in the LM's prompt.
TOKEN_RATES = {"hubert": 24.99, "pitch": 12.5, "style": 1.0}


def export_speech(
    checkpoints: str | Path | None,
    variant: str,
    out: str | Path,
    fcpe_weights: str | Path | None = None,
    opset: int = 17,
    vocoder_layout: str = "blocked",
) -> dict:
    """Export the speech engines of ``variant`` into bundle directory ``out``; returns the manifest.

    ``vocoder_layout``: "blocked" (2-D convolutions arranged for ONNX Runtime's x86 CPU
    kernels, the fastest there) or "plain" (1-D, for GPU / TensorRT and ARM targets).
    """
    check_variant(variant)
    paths = CheckpointPaths(resolve_checkpoint_root(checkpoints))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Written first so that a variant clash is caught before minutes of export.
    update_manifest(out, variant=variant)
    steps = [("HuBERT + quantizer", lambda: hubert.export_onnx(paths, variant, out, opset=opset))]
    if variant == "expressive":
        steps += [
            (
                "FCPE + pitch VQ-VAE",
                lambda: pitch.export_onnx(paths, variant, out, opset=opset, fcpe_weights=fcpe_weights),
            ),
            ("style encoder", lambda: style.export_onnx(paths, variant, out, opset=opset)),
        ]
    steps.append(
        ("unit HiFi-GAN", lambda: vocoder.export_onnx(paths, variant, out, opset=opset, layout=vocoder_layout))
    )
    for label, step in steps:
        start = time.perf_counter()
        step()
        log.info("exported %s in %.1f s", label, time.perf_counter() - start)
    rates = {k: v for k, v in TOKEN_RATES.items() if variant == "expressive" or k == "hubert"}
    return update_manifest(out, variant=variant, sample_rate=SAMPLE_RATE, token_rates=rates)
