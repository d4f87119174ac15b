"""Real-time factor of the full-size unit HiFi-GAN (random weights), per ONNX export layout
and against PyTorch eager: the measurement behind the vocoder's default ``blocked`` layout.

    python -m spiritlm_edge.bench.vocoder_layouts --variant expressive --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from spiritlm_edge.export.random_speech import full_size_vocoder
from spiritlm_edge.export.vocoder import (
    BASE_DEFAULT_STYLE,
    DEFAULT_SPEAKER,
    LAYOUTS,
    SAMPLE_RATE,
    export_onnx,
    fold_weight_norm,
)
from spiritlm_edge.runtime.vocoder import Vocoder


def benchmark(
    variant: str = "expressive",
    seconds: float = 9.0,
    threads: int = 2,
    runs: int = 5,
    layouts: Sequence[str] = LAYOUTS,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Real-time factor of the full-size vocoder (random weights): ONNX Runtime through
    :class:`~spiritlm_edge.runtime.vocoder.Vocoder` for each export layout, and PyTorch
    eager. Times one synthesis of ``seconds`` of audio (durations given, i.e. generator
    only); returns {name: {"median_s", "min_s", "rtf"}} (rtf from the median)."""
    torch.set_num_threads(threads)
    model = full_size_vocoder(variant, seed)
    frames = int(round(seconds * SAMPLE_RATE / model.config.hop_length))
    rng = np.random.default_rng(seed)
    hubert = rng.integers(0, model.config.num_embeddings, frames)
    pitch = rng.integers(0, max(1, model.config.num_f0_tokens), frames)
    style = rng.integers(0, max(1, model.config.num_style_tokens), frames)
    audio_s = frames * model.config.hop_length / SAMPLE_RATE

    def timed(run) -> dict[str, float]:
        run()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        return {"median_s": median, "min_s": min(times), "rtf": median / audio_s}

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in layouts:
            export_onnx(None, variant, Path(tmp) / layout, model=model, layout=layout)
            vocoder = Vocoder.from_bundle(Path(tmp) / layout, n_threads=threads)
            results[f"onnxruntime-{layout}"] = timed(
                lambda vocoder=vocoder: vocoder.decode(hubert, pitch, style, dur_pred=False)
            )
    inputs = {"speaker": torch.tensor([DEFAULT_SPEAKER])}
    if model.config.num_f0_tokens:
        inputs.update(pitch=torch.as_tensor(pitch), style_codes=torch.as_tensor(style))
    if model.config.multistyle:
        inputs["style_id"] = torch.tensor([BASE_DEFAULT_STYLE])
    units = torch.as_tensor(hubert)
    reference = fold_weight_norm(model, polyphase=False)  # as the reference runs it

    def eager():
        with torch.inference_mode():
            reference(units, **inputs)

    results["pytorch-eager"] = timed(eager)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Real-time factor of the full-size unit HiFi-GAN.")
    parser.add_argument("--variant", default="expressive", choices=("base", "expressive"))
    parser.add_argument("--seconds", type=float, default=9.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    for name, r in benchmark(args.variant, args.seconds, args.threads, args.runs).items():
        print(f"{name:26s} median {r['median_s']:.3f} s  min {r['min_s']:.3f} s  RTF {r['rtf']:.4f}")


if __name__ == "__main__":
    main()
