"""HuBERT's real-time factor alone, per ONNX export form, side by side in one run: the
measurement behind exporting the front end's convs as 2-D convs (``conv_dims=2``) and behind
the sessions' memory settings (runtime/onnx_session.py).

    python -m spiritlm_edge.bench.encoder --threads 2 --runs 7
    python -m spiritlm_edge.bench.encoder --checkpoints ~/.cache/spiritlm-edge/synthetic-base-7b/checkpoints

Without ``--checkpoints`` a release-size HuBERT with random weights is written to a temporary
folder (export/random_speech.py). Each form is exported from the same checkpoint and run in a
session set as the runtime's (and, for "before", as it was: memory patterns on, the arena kept
between runs); runs alternate between the forms so that a busy machine slows all alike, and the
units of each form are compared with the first's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from spiritlm_edge.export import hubert as H
from spiritlm_edge.export import random_speech
from spiritlm_edge.export.checkpoints import CheckpointPaths
from spiritlm_edge.runtime.audio import BUNDLED_CLIP, SAMPLE_RATE, load_audio
from spiritlm_edge.runtime.bundle import Bundle, EncoderConfig
from spiritlm_edge.runtime.cpu_buffers import cpu_model
from spiritlm_edge.runtime.hubert import HubertEngine
from spiritlm_edge.runtime.onnx_session import release_activations

# name -> (export_onnx's conv_dims, memory patterns on, each run hands its activations back)
FORMS = {
    "conv1d, patterns, arena kept (before)": (1, True, False),
    "conv2d, arena kept (now, runs <= 15 s)": (2, False, False),
    "conv2d, activations released": (2, False, True),
}


def _runner(engine: HubertEngine, release: bool):
    options = release_activations() if release else None  # None: ORT's default, the arena kept
    return lambda samples: engine.session.run(["units"], {"audio": samples[None]}, options)[0]


def _open(folder: Path, threads: int, mem_pattern: bool) -> tuple[Any, EncoderConfig, Path]:
    """A session of its own (create_session shares one per file), set as create_session does
    (before this change: with memory patterns)."""
    bundle = Bundle(folder)
    path = bundle.engine_path("hubert")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_mem_pattern = mem_pattern
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, bundle.config("hubert", EncoderConfig), path


def benchmark(
    checkpoints: Path | None = None,
    audio: Path | None = None,
    threads: int = 2,
    runs: int = 7,
    forms: Sequence[str] = tuple(FORMS),
) -> dict[str, dict[str, Any]]:
    """Median wall time, RTF and process CPU time per form, and whether its units equal the first form's."""
    samples = load_audio(audio if audio is not None else BUNDLED_CLIP)
    seconds = len(samples) / SAMPLE_RATE
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="encoder-bench-") as tmp:
        if checkpoints is None:
            checkpoints = Path(tmp) / "checkpoints"
            random_speech.write_hubert(CheckpointPaths(checkpoints), size="full")
        engines = {}
        for name in forms:
            conv_dims, mem_pattern, release = FORMS[name]
            folder = Path(tmp) / f"conv{conv_dims}d"
            if not folder.exists():
                H.export_onnx(CheckpointPaths(checkpoints), "base", folder, conv_dims=conv_dims)
            engines[name] = _runner(HubertEngine(*_open(folder, threads, mem_pattern)), release)
        first = None
        for name, engine in engines.items():  # warm-up; the units to compare
            units = engine(samples)
            first = units if first is None else first
            results[name] = {"units_equal_first": bool(np.array_equal(units, first)), "wall": [], "cpu": []}
        for _ in range(runs):
            for name, engine in engines.items():
                start, cpu = time.perf_counter(), time.process_time()
                engine(samples)
                results[name]["wall"].append(time.perf_counter() - start)
                results[name]["cpu"].append(time.process_time() - cpu)
        engines.clear()
    for r in results.values():
        wall = statistics.median(r.pop("wall"))
        r.update(median_s=wall, rtf=wall / seconds, cpu_s=statistics.median(r.pop("cpu")), audio_s=seconds)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="HuBERT's real-time factor per ONNX export form.")
    parser.add_argument("--checkpoints", type=Path, help="a checkpoint root (default: release-size random weights)")
    parser.add_argument("--audio", type=Path, help="default: the bundled LibriSpeech clip")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    results = benchmark(args.checkpoints, args.audio, args.threads, args.runs)
    print(f"HuBERT on {cpu_model()}, {args.threads} threads, {args.runs} alternating runs per form")
    for name, r in results.items():
        print(
            f"{name:36s} median {r['median_s']:.3f} s  RTF {r['rtf']:.4f}  CPU {r['cpu_s']:.3f} s  "
            f"units equal to the first form: {r['units_equal_first']}"
        )


if __name__ == "__main__":
    main()
