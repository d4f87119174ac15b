"""Real-time factor of the full-size unit HiFi-GAN (random weights), per ONNX export layout
and against PyTorch eager: the measurement behind the vocoder's default ``blocked`` layout;
with ``--streaming``, streamed against offline cost (stateful graph per layout and thread
count, and the windowed streaming of older bundles) and the first chunk's latency.

    python -m spiritlm_edge.bench.vocoder_layouts --variant expressive --threads 2
    python -m spiritlm_edge.bench.vocoder_layouts --streaming --chunk-frames 5 10 25
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
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
from spiritlm_edge.runtime.bundle import Bundle, StreamingVocoderConfig
from spiritlm_edge.runtime.onnx_session import create_session
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
            export_onnx(None, variant, Path(tmp) / layout, model=model, layout=layout, streaming=False)
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


def _frames(n: int, config, rng) -> list[tuple[int, int | None, int | None]]:
    hubert = rng.integers(0, config.num_embeddings, n).tolist()
    pitch = rng.integers(0, config.num_f0_tokens, n).tolist() if config.num_f0_tokens else [None] * n
    style = rng.integers(0, config.num_style_tokens, n).tolist() if config.num_style_tokens else [None] * n
    return list(zip(hubert, pitch, style, strict=True))


def _stream_once(
    vocoder: Vocoder, frames: list, chunk_frames: int, first_chunk_frames: int
) -> tuple[float, float, float]:
    """(total s, first chunk s after the last frame it needed, CPU s of this process): every
    frame ready at once, handed over one by one as the vocoder pulls them."""
    pulled: list[float] = []

    def arriving():
        for frame in frames:
            pulled.append(time.perf_counter())
            yield frame

    start, cpu = time.perf_counter(), time.process_time()
    first = math.nan
    for chunk in vocoder.stream(
        arriving(), dur_pred=False, chunk_frames=chunk_frames, first_chunk_frames=first_chunk_frames
    ):
        if math.isnan(first):
            first = time.perf_counter() - pulled[-1]
        del chunk
    return time.perf_counter() - start, first, time.process_time() - cpu


def streaming_benchmark(
    variant: str = "expressive",
    seconds: float = 9.0,
    threads: int = 2,
    runs: int = 5,
    chunk_frames: Sequence[int] = (5, 10, 25),
    first_chunk_frames: int = 8,
    stream_layouts: Sequence[str] = LAYOUTS,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Streamed against offline cost of the full-size vocoder (random weights), side by side:
    offline :meth:`Vocoder.decode` (the bundle's default blocked generator), the stateful
    streaming graph in each layout of ``stream_layouts`` with 1 and ``threads`` intra-op
    threads, and the windowed streaming of bundles without it. Every frame is ready at once
    (durations given): the stream's cost is what it takes from the LM's decode on a CPU.
    Returns rows of {"name", "chunk_frames", "median_s", "ratio" (to offline), "cpu_s" (CPU
    time of this process: robust when other processes share the cores), "cpu_ratio",
    "first_ms"}."""
    model = full_size_vocoder(variant, seed)
    config = model.config
    hop = config.hop_length
    n = int(round(seconds * SAMPLE_RATE / hop))
    frames = _frames(n, config, np.random.default_rng(seed))
    hubert, pitch, style = (np.array(v) if v[0] is not None else None for v in zip(*frames, strict=True))

    def median(run) -> tuple[float, float, float]:
        run()
        results = [run() for _ in range(runs)]
        total, first, cpu = (statistics.median(r[i] for r in results) for i in range(3))
        return total, first, cpu

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for layout in stream_layouts:
            export_onnx(None, variant, Path(tmp) / layout, model=model, stream_layout=layout)
        offline = Vocoder.from_bundle(Path(tmp) / stream_layouts[0], n_threads=threads)

        def decode() -> tuple[float, float, float]:
            start, cpu = time.perf_counter(), time.process_time()
            offline.decode(hubert, pitch, style, dur_pred=False)
            return time.perf_counter() - start, math.nan, time.process_time() - cpu

        offline_s, _, offline_cpu = median(decode)
        rows.append(
            {"name": "offline decode", "chunk_frames": None, "median_s": offline_s, "ratio": 1.0, "cpu_s": offline_cpu}
        )
        windowed = Vocoder(offline._generator, offline._duration, offline.config, workers=offline._workers)
        candidates = [("windowed stream (old bundles)", windowed)]
        for layout in stream_layouts:
            bundle = Bundle(Path(tmp) / layout)
            path = bundle.path("vocoder_stream")
            sessions = [(f"{n} thread{'s' * (n > 1)}", create_session(path, None, n)) for n in sorted({1, threads})]
            if threads > 1:
                # ONNX Runtime's parallel executor can run a level's resblocks (independent
                # branches until their sum) side by side, one thread each.
                options = ort.SessionOptions()
                options.intra_op_num_threads, options.inter_op_num_threads = 1, threads
                options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
                parallel = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                sessions.append((f"{threads} parallel branches", parallel))
                # Intra-op threads that sleep at once instead of spinning between operators.
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                calm = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                sessions.append((f"{threads} threads, no spinning", calm))
            for label, session in sessions:
                stateful = Vocoder(
                    offline._generator,
                    None,
                    offline.config,
                    workers=offline._workers,
                    stream_generator=session,
                    stream_config=bundle.config("vocoder_stream", StreamingVocoderConfig),
                )
                candidates.append((f"stateful {layout}, {label}", stateful))
        for name, vocoder in candidates:
            for size in chunk_frames:
                total, first, cpu = median(lambda v=vocoder, s=size: _stream_once(v, frames, s, first_chunk_frames))
                rows.append(
                    {
                        "name": name,
                        "chunk_frames": size,
                        "median_s": total,
                        "ratio": total / offline_s,
                        "cpu_s": cpu,
                        "cpu_ratio": cpu / offline_cpu,
                        "first_ms": 1e3 * first,
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Real-time factor of the full-size unit HiFi-GAN.")
    parser.add_argument("--variant", default="expressive", choices=("base", "expressive"))
    parser.add_argument("--seconds", type=float, default=9.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--streaming", action="store_true", help="streamed vs offline cost instead")
    parser.add_argument("--chunk-frames", type=int, nargs="+", default=[5, 10, 25])
    parser.add_argument("--first-chunk-frames", type=int, default=8)
    parser.add_argument("--stream-layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    args = parser.parse_args(argv)
    if args.streaming:
        rows = streaming_benchmark(
            args.variant,
            args.seconds,
            args.threads,
            args.runs,
            args.chunk_frames,
            args.first_chunk_frames,
            args.stream_layouts,
        )
        print(f"{args.seconds:g} s of audio, {args.threads} threads, median of {args.runs}")
        for r in rows:
            chunk = "" if r["chunk_frames"] is None else f"chunk {r['chunk_frames']:3d}"
            first = f"  first chunk {r['first_ms']:6.1f} ms" if "first_ms" in r else ""
            cpu = f"  CPU {r['cpu_s']:.3f} s" + (f" x{r['cpu_ratio']:.2f}" if "cpu_ratio" in r else "")
            print(f"{r['name']:36s} {chunk:9s} {r['median_s']:.3f} s  x{r['ratio']:.2f} offline{cpu}{first}")
        return
    for name, r in benchmark(args.variant, args.seconds, args.threads, args.runs).items():
        print(f"{name:26s} median {r['median_s']:.3f} s  min {r['min_s']:.3f} s  RTF {r['rtf']:.4f}")


if __name__ == "__main__":
    main()
