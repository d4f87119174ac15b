"""Speech-to-speech latency of a bundle: per stage, per turn, memory, and side by side with
llama.cpp driven directly, the PyTorch reference path and the machine's memory bandwidth.

    python bench/latency.py --bundle BUNDLE [--repeat 5] [--warmup 1] [--max-new-tokens 100]
    python bench/latency.py --synthetic base-7b --json bench.json --plot bench.png
    spiritlm-edge bench ...                      (the same code and options)

Every figure is the median and p90 of ``--repeat`` runs after ``--warmup`` runs. Stages are
timed in one interleaved loop (each repetition runs every stage once), so a noisy
neighbour slows all of them alike. Turns are greedy speech-to-speech turns in SPEECH mode,
whose modality constraint bans EOS: every turn generates exactly ``--max-new-tokens``
tokens and runs are comparable.

``--synthetic base-7b|expressive-7b`` builds once (cached under the user cache directory;
needs the export extra) a bundle of the released sizes with random weights: the timings
are the real model's, the output is babble, and the report says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

log = logging.getLogger("spiritlm_edge.bench")

SCHEMA_VERSION = 1
# Targets from the project brief, for a full-size model (synthetic base-7b, Q4_K_M) on a
# 2-core x86 CPU. (figure path in the report, comparison, target, what it is)
GOALS = [
    ("stages.hubert.rtf.median", "<=", 0.05, "HuBERT real-time factor"),
    ("stages.vocoder_offline.rtf.median", "<=", 0.05, "vocoder real-time factor (offline)"),
    ("stages.vocoder_first_chunk.seconds.median", "<=", 0.100,
     "vocoder's first streamed chunk after the units it needs (s)"),
    ("memory.pipeline_peak_rss_gb", "<=", 5.5, "peak RSS of the whole pipeline at n_ctx 2048 (GB)"),
    ("engine_overhead.engine_vs_raw", ">=", 0.95, "our decode tokens/s / llama.cpp direct"),
    ("bandwidth.fraction_of_ceiling", ">=", 0.70, "our decode tokens/s / bandwidth ceiling"),
    ("reference.speedup.hubert", ">=", 1.5, "HuBERT speed-up over PyTorch eager fp32"),
    ("reference.speedup.vocoder", ">=", 1.5, "vocoder speed-up over PyTorch eager fp32"),
    ("reference.speedup.lm_decode", ">=", 3.0, "LM decode speed-up over transformers bf16"),
]


# -- statistics and system facts -----------------------------------------------------------


def summarize(samples: Iterable[float]) -> dict[str, float]:
    """Median, p90 (linear interpolation), min, max and count of ``samples``."""
    values = np.asarray(list(samples), dtype=np.float64)
    if values.size == 0:
        raise ValueError("no samples to summarize")
    return {
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),
        "min": float(values.min()),
        "max": float(values.max()),
        "n": int(values.size),
    }


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[str]:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, GPUs and the versions of every library on the timed path."""
    import psutil

    info = {
        "cpu": _cpu_model(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpus": _gpus(),
        "versions": {d: _version(d) for d in ("spiritlm-edge", "numpy", "onnxruntime", "onnxruntime-gpu",
                                              "llama_cpp_python", "torch", "transformers")},
    }
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    try:
        import llama_cpp

        info["llama_cpp_gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
        info["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    except (ImportError, AttributeError):
        pass
    return info


# -- memory bandwidth ------------------------------------------------------------------------


def measure_bandwidth(megabytes: int = 1024, repeats: int = 5, n_threads: int = 1) -> dict[str, float]:
    """Memory bandwidth the machine delivers: the best of ``repeats`` copies of a
    ``megabytes`` buffer, counted as bytes read + bytes written (STREAM's "copy")
    per second, with 1 thread and with ``n_threads`` threads (numpy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    n = megabytes * (1 << 20)
    src = np.ones(n, dtype=np.uint8)
    dst = np.zeros(n, dtype=np.uint8)
    result = {"buffer_mb": megabytes}
    for threads in sorted({1, max(1, n_threads)}):
        bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
        best = math.inf
        with ThreadPoolExecutor(threads) as pool:
            for _ in range(repeats):
                start = time.perf_counter()
                list(pool.map(lambda b: np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]]), bounds))
                best = min(best, time.perf_counter() - start)
        result[f"copy_gb_per_s_{threads}_threads"] = 2 * n / best / 1e9
    result["gb_per_s"] = max(v for k, v in result.items() if k.startswith("copy_gb_per_s"))
    return result


def decode_bytes_per_token(gguf_path: Path, context_tokens: float) -> dict[str, float]:
    """Bytes one decode step must read: every weight tensor except the token embedding (a
    single row of it is read), plus the K and V cache of ``context_tokens`` positions (f16)."""
    from spiritlm_edge.runtime.lm import GGML_TYPE_SIZES, read_gguf

    info = read_gguf(gguf_path)
    weights = embedding = 0
    for name, (shape, ggml_type, _) in info.tensors.items():
        block, block_bytes = GGML_TYPE_SIZES[ggml_type]
        nbytes = math.prod(shape) // block * block_bytes
        if name == "token_embd.weight":
            embedding = nbytes
        else:
            weights += nbytes
    meta = info.metadata
    layers = int(meta.get("llama.block_count", 0))
    hidden = int(meta.get("llama.embedding_length", 0))
    heads = int(meta.get("llama.attention.head_count", 1))
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    kv = 2 * layers * context_tokens * (hidden // heads * kv_heads) * 2
    return {"weights_bytes": weights, "token_embd_bytes": embedding, "kv_cache_bytes": kv,
            "total_bytes": weights + kv, "gguf_tensor_bytes": weights + embedding}


# -- timing helpers ---------------------------------------------------------------------------


class _Recorder:
    """Samples per named figure, kept only after the warm-up repetitions."""

    def __init__(self):
        self.samples: dict[str, list[float]] = {}
        self.active = False

    def add(self, name: str, value: float) -> None:
        if self.active and value is not None and math.isfinite(value):
            self.samples.setdefault(name, []).append(float(value))

    def time(self, name: str, fn: Callable, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.add(name, time.perf_counter() - start)
        return result

    def summary(self, name: str) -> dict[str, float] | None:
        return summarize(self.samples[name]) if self.samples.get(name) else None


class _ClockedLM:
    """Wraps the pipeline's LanguageModel to time its token iterator: when each token came
    out, and how long the LM itself took for it (the vocoder runs between tokens)."""

    def __init__(self, lm):
        self._lm = lm
        self.token_times: list[float] = []
        self.token_seconds: list[float] = []
        self.token_ids: list[int] = []

    def generate(self, *args, **kwargs) -> Iterator[int]:
        self.token_times, self.token_seconds, self.token_ids = [], [], []
        tokens = self._lm.generate(*args, **kwargs)
        while True:
            start = time.perf_counter()
            try:
                token = next(tokens)
            except StopIteration:
                return
            now = time.perf_counter()
            self.token_times.append(now)
            self.token_seconds.append(now - start)  # the first one holds the prefill
            self.token_ids.append(token)
            yield token

    def __getattr__(self, name):
        return getattr(self._lm, name)


def _pulled(tokens: Iterable[str], clock: list[float]) -> Iterator[str]:
    """``tokens``, recording when each one was handed over."""
    for token in tokens:
        clock.append(time.perf_counter())
        yield token


def _stream_vocoder(speech_tokenizer, tokens: list[str]) -> tuple[float, float, int, float]:
    """Stream ``tokens`` (all available at once) through the vocoder: (total s, first chunk
    after the last unit it needed s, units pulled before the first chunk, audio s)."""
    clock: list[float] = []
    start = time.perf_counter()
    first_latency, first_units, samples = math.nan, 0, 0
    for chunk in speech_tokenizer.decode_stream(_pulled(tokens, clock)):
        if samples == 0:
            first_latency, first_units = time.perf_counter() - clock[-1], len(clock)
        samples += chunk.size
    return time.perf_counter() - start, first_latency, first_units, samples / 16000


# -- the benchmark ------------------------------------------------------------------------------


def _bundle_info(bundle) -> dict[str, Any]:
    from spiritlm_edge.bench.synthetic import synthetic_info

    manifest = bundle.manifest
    components = {name: {"file": e["file"], "mb": round(e["bytes"] / 1e6, 1), **({"quant": e["quant"]} if "quant" in e else {})}
                  for name, e in sorted(bundle.components.items())}
    synthetic = synthetic_info(bundle.dir)
    return {
        "path": str(bundle.dir),
        "variant": bundle.variant,
        "quant": components.get("lm", {}).get("quant"),
        "components": components,
        "weights": ("as given (not marked synthetic)" if not synthetic else "synthetic: random weights, released shapes"
                    + ("" if synthetic.get("lm_layers", 32) == 32 else f", LM cut to {synthetic['lm_layers']} of 32 layers")),
        "synthetic": synthetic,
        "created_by": manifest.get("created_by"),
    }


def _load_engines(bundle, providers, n_threads, n_gpu_layers, n_ctx) -> tuple[Any, dict[str, Any]]:
    """The pipeline, loaded engine by engine to see each one's footprint. Speech sessions
    are cached per process, so the pipeline reuses the ones loaded here."""
    from spiritlm_edge.runtime.hubert import HubertEngine
    from spiritlm_edge.runtime.pipeline import SpiritLM
    from spiritlm_edge.runtime.vocoder import Vocoder

    engines = [("hubert", HubertEngine)]
    if bundle.variant == "expressive":
        from spiritlm_edge.runtime.pitch import PitchEngine
        from spiritlm_edge.runtime.style import StyleEngine

        engines += [("pitch", PitchEngine), ("style", StyleEngine)]
    engines.append(("vocoder", Vocoder))
    footprint: dict[str, Any] = {"baseline_rss_gb": rss_bytes() / 1e9, "engines_after_load_mb": {},
                                 "load_seconds": {}}
    for name, cls in engines:
        before, start = rss_bytes(), time.perf_counter()
        cls.from_bundle(bundle, providers=providers, n_threads=n_threads)
        footprint["load_seconds"][name] = time.perf_counter() - start
        footprint["engines_after_load_mb"][name] = (rss_bytes() - before) / 1e6
    before, start = rss_bytes(), time.perf_counter()
    spirit_lm = SpiritLM(bundle, providers=providers, n_threads=n_threads, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx)
    footprint["load_seconds"]["lm"] = time.perf_counter() - start
    footprint["engines_after_load_mb"]["lm"] = (rss_bytes() - before) / 1e6
    footprint["after_load_rss_gb"] = rss_bytes() / 1e9
    return spirit_lm, footprint


def run_benchmark(
    bundle_dir: str | os.PathLike,
    *,
    repeat: int = 5,
    warmup: int = 1,
    max_new_tokens: int = 100,
    n_threads: int | None = None,
    providers: list[str] | None = None,
    n_gpu_layers: int | None = None,
    n_ctx: int = 2048,
    audio: str | os.PathLike | None = None,
    checkpoints: str | os.PathLike | None = None,
    reference: bool = True,
    reference_lm: bool = False,
    engine_overhead: bool = True,
    bandwidth_mb: int = 1024,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark on ``bundle_dir`` and return the report (see docs/benchmarks.md).

    ``checkpoints``: the checkpoint root the bundle was built from; with it (and torch)
    the reference PyTorch path runs on the same weights. ``reference_lm`` adds
    transformers' LlamaForCausalLM in bf16 (needs RAM for the bf16 weights).
    """
    from spiritlm_edge.runtime.audio import BUNDLED_CLIP, SAMPLE_RATE, load_audio
    from spiritlm_edge.runtime.bundle import Bundle
    from spiritlm_edge.runtime.errors import ModelError
    from spiritlm_edge.runtime.events import AudioChunk, TurnEnd
    from spiritlm_edge.runtime.lm import default_threads
    from spiritlm_edge.runtime.units import OutputModality, build_prompt, string_to_units, units_to_string

    if repeat < 1 or warmup < 0 or max_new_tokens < 1:
        raise ModelError("--repeat and --max-new-tokens must be >= 1 and --warmup >= 0.")
    n_threads = n_threads or default_threads()
    bundle = Bundle(bundle_dir)
    audio_path = Path(audio) if audio else BUNDLED_CLIP
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command,
        "machine": machine_info(),
        "bundle": _bundle_info(bundle),
        "settings": {"repeat": repeat, "warmup": warmup, "max_new_tokens": max_new_tokens, "threads": n_threads,
                     "n_ctx": n_ctx, "providers": providers, "n_gpu_layers": n_gpu_layers,
                     "decoding": "greedy, SPEECH output (EOS banned: exactly max_new_tokens tokens)"},
    }
    samples = load_audio(audio_path)
    audio_s = samples.size / SAMPLE_RATE
    report["settings"]["audio"] = {"path": str(audio_path), "seconds": audio_s}
    import soxr

    samples_44k = soxr.resample(samples, SAMPLE_RATE, 44100).astype(np.float32)

    spirit_lm, footprint = _load_engines(bundle, providers, n_threads, n_gpu_layers, n_ctx)
    speech = spirit_lm.speech_tokenizer
    clocked = _ClockedLM(spirit_lm.lm)
    spirit_lm.lm = clocked
    tokenizer, vocab = spirit_lm.tokenizer, spirit_lm.tokenizer.vocab
    expressive = bundle.variant == "expressive"

    rec = _Recorder()
    answer_tokens: list[str] | None = None
    for iteration in range(warmup + repeat):
        rec.active = iteration >= warmup
        log.info("repetition %d/%d%s", iteration + 1, warmup + repeat, " (warm-up)" if not rec.active else "")
        rec.time("audio_load", load_audio, audio_path)
        rec.time("audio_resample", load_audio, samples_44k, 44100)
        units = {"hubert": rec.time("hubert", speech.hubert, samples)}
        if expressive:
            units["pitch"] = rec.time("pitch", speech.pitch, samples)
            units["style"] = rec.time("style", speech.style, samples)

        def prompt_ids():
            string = units_to_string(units, has_pitch=expressive, has_style=expressive, vocab=vocab)
            return tokenizer.encode(build_prompt([("SPEECH", string)], OutputModality.SPEECH, vocab=vocab))

        ids = rec.time("prompt_build", prompt_ids)

        # the turn: user audio in memory (its end is t=0), greedy SPEECH answer
        spirit_lm.lm.reset()
        start = time.perf_counter()
        first_chunk_at, tokens_at_first_chunk, end = None, 0, None
        for event in spirit_lm.generate_stream([("SPEECH", samples)], output_modality="SPEECH",
                                               max_new_tokens=max_new_tokens, do_sample=False):
            if isinstance(event, AudioChunk) and first_chunk_at is None:
                first_chunk_at = time.perf_counter()
                tokens_at_first_chunk = len(clocked.token_times)
            elif isinstance(event, TurnEnd):
                end = event
        turn_total = time.perf_counter() - start
        t = end.timings
        rec.add("turn_total", turn_total)
        rec.add("turn_encode", t.get("encode_s"))
        # LM figures from our own clock: the pipeline's own timings count calls, not tokens
        n_new, lm_s = len(clocked.token_ids), clocked.token_seconds
        rec.add("lm_prefill", lm_s[0] if lm_s else math.nan)
        rec.add("lm_prefill_tokens_per_s", len(ids) / lm_s[0] if lm_s else math.nan)
        rec.add("lm_decode", sum(lm_s[1:]))
        rec.add("lm_decode_tokens_per_s", (n_new - 1) / sum(lm_s[1:]) if n_new > 1 else math.nan)
        rec.add("turn_vocoder", t.get("vocoder_s"))
        rec.add("new_tokens", n_new)
        rec.add("prompt_tokens", len(ids))
        rec.add("answer_audio_s", t.get("audio_s"))
        if first_chunk_at is not None:
            times = clocked.token_times
            rec.add("time_to_first_audio", first_chunk_at - start)
            rec.add("turn_first_audio_after_first_unit", first_chunk_at - times[0])
            rec.add("turn_first_audio_after_last_token", first_chunk_at - times[tokens_at_first_chunk - 1])
            rec.add("turn_tokens_before_first_audio", tokens_at_first_chunk)
        if t.get("audio_s"):
            rec.add("required_tokens_per_s", n_new / t["audio_s"])
        if answer_tokens is None:
            answer_tokens = [tokenizer.id_to_token(i) for i in clocked.token_ids if vocab.unit_of(i) is not None]
            if expressive and not any(tok.startswith("[Pi") for tok in answer_tokens):
                # an Expressive vocoder needs pitch codes: vocode the question's units instead
                import re

                spoken = units_to_string(units, has_pitch=True, has_style=True, vocab=vocab)
                answer_tokens = re.findall(r"\[(?:Hu|Pi|St)\d+\]", spoken)
            if not answer_tokens:
                raise ModelError("The LM generated no speech units in SPEECH mode: the bundle is broken.")

        # the vocoder on the first turn's answer: offline, then streamed with every unit ready
        answer = string_to_units("".join(answer_tokens), rng=0)
        start = time.perf_counter()
        audio_out = speech.decode(answer)
        elapsed = time.perf_counter() - start
        rec.add("vocoder_offline", elapsed)
        rec.add("vocoder_offline_rtf", elapsed / (audio_out.size / SAMPLE_RATE))
        total, first, pulled, seconds = _stream_vocoder(speech, answer_tokens)
        rec.add("vocoder_streaming", total)
        rec.add("vocoder_streaming_rtf", total / seconds if seconds else math.nan)
        rec.add("vocoder_first_chunk", first)
        rec.add("vocoder_units_before_first_chunk", pulled)
        report.setdefault("_decoded_audio_s", audio_out.size / SAMPLE_RATE)
    footprint["after_turns_rss_gb"] = rss_bytes() / 1e9
    footprint["pipeline_peak_rss_gb"] = peak_rss_bytes() / 1e9
    report["memory"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in footprint.items()}
    report["memory"]["engines_after_load_mb"] = {k: round(v, 1) for k, v in footprint["engines_after_load_mb"].items()}
    report["memory"]["load_seconds"] = {k: round(v, 3) for k, v in footprint["load_seconds"].items()}
    report["memory"]["lm_gguf_mb"] = round(bundle.path("lm").stat().st_size / 1e6, 1)

    stages = _stage_report(rec, audio_s, report.pop("_decoded_audio_s"), expressive)
    report["stages"] = stages
    report["turn"] = _turn_report(rec, bundle, expressive)

    gguf = Path(clocked._lm.path)
    spirit_lm.lm = clocked._lm
    spirit_lm.lm.close()  # the side-by-side runs load their own copies
    del spirit_lm, clocked
    gc.collect()

    if engine_overhead:
        from spiritlm_edge.quant.lm_bench import measure_decode_speed

        log.info("engine overhead: our LM path vs llama.cpp direct (%d tokens x %d)", max_new_tokens, repeat)
        speed = measure_decode_speed(gguf, n_tokens=max_new_tokens, n_threads=n_threads, repeats=repeat,
                                     n_ctx=min(n_ctx, 1024))
        report["engine_overhead"] = {k: v for k, v in speed.items() if k != "gguf"}
        report["engine_overhead"]["note"] = ("same GGUF, threads and prompt; greedy; interleaved repeats; ratios "
                                             "of the best repeats (a shared machine only slows runs down)")

    log.info("memory bandwidth (%d MB copies)", bandwidth_mb)
    bw = measure_bandwidth(bandwidth_mb, n_threads=n_threads)
    prompt_tokens = report["turn"]["prompt_tokens"]
    per_token = decode_bytes_per_token(gguf, prompt_tokens + max_new_tokens / 2)
    bw.update(per_token)
    bw["ceiling_tokens_per_s"] = bw["gb_per_s"] * 1e9 / per_token["total_bytes"]
    ours = stages["lm_decode"]["tokens_per_s"]["median"]
    bw["ours_tokens_per_s"] = ours
    bw["fraction_of_ceiling"] = ours / bw["ceiling_tokens_per_s"]
    if engine_overhead:
        bw["raw_llama_cpp_fraction_of_ceiling"] = (report["engine_overhead"]["tokens_per_s_median"]["raw"]
                                                   / bw["ceiling_tokens_per_s"])
    bw["note"] = ("ceiling = delivered copy bandwidth / bytes read per decode step (all weights but the token "
                  "embedding, plus the f16 KV cache at the turn's mean context)")
    report["bandwidth"] = bw

    report["reference"] = _reference(report, checkpoints, bundle, samples, answer_tokens, ids_for_lm=ids,
                                     speech_dir=bundle_dir, providers=providers, n_threads=n_threads,
                                     repeat=repeat, warmup=warmup, reference=reference,
                                     reference_lm=reference_lm, max_new_tokens=max_new_tokens)
    report["goals"] = evaluate_goals(report)
    return report


def _stage_report(rec: _Recorder, audio_s: float, decoded_s: float, expressive: bool) -> dict[str, Any]:
    def stage(name, **extra):
        entry = {"seconds": rec.summary(name)}
        entry.update({k: v for k, v in extra.items() if v is not None})
        return entry

    def rtf(name, seconds):
        s = rec.summary(name)
        return {"median": s["median"] / seconds, "p90": s["p90"] / seconds}

    stages = {
        "audio_load": stage("audio_load", what="read + decode the file, to mono float32 16 kHz"),
        "audio_resample": stage("audio_resample", what="44.1 kHz array -> 16 kHz (soxr)"),
        "hubert": stage("hubert", rtf=rtf("hubert", audio_s), what="HuBERT + quantizer -> units"),
    }
    if expressive:
        stages["pitch"] = stage("pitch", rtf=rtf("pitch", audio_s), what="FCPE + pitch VQ-VAE -> [Pi] codes")
        stages["style"] = stage("style", rtf=rtf("style", audio_s), what="wav2vec2 style encoder -> [St] codes")
    stages.update({
        "prompt_build": stage("prompt_build", what="units -> prompt string -> token ids"),
        "lm_prefill": stage("lm_prefill", tokens_per_s=rec.summary("lm_prefill_tokens_per_s"),
                            what="prompt prefill + first token (in the turn)"),
        "lm_decode": stage("lm_decode", tokens_per_s=rec.summary("lm_decode_tokens_per_s"),
                           what="token-by-token decode, SPEECH constraint on (in the turn)"),
        "vocoder_offline": stage("vocoder_offline", rtf=rec.summary("vocoder_offline_rtf"),
                                 what="units -> audio in one call (durations + generator)"),
        "vocoder_streaming": stage("vocoder_streaming", rtf=rec.summary("vocoder_streaming_rtf"),
                                   what="the same units streamed, chunk by chunk"),
        "vocoder_first_chunk": stage("vocoder_first_chunk", units_needed=rec.summary("vocoder_units_before_first_chunk"),
                                     what="first streamed chunk after the last unit it needs arrives"),
    })
    stages["vocoder_offline"]["audio_s"] = decoded_s
    return stages


def _turn_report(rec: _Recorder, bundle, expressive: bool) -> dict[str, Any]:
    rates = bundle.manifest.get("token_rates") or {"hubert": 24.99}
    nominal = float(rates.get("hubert", 24.99)) + (float(rates.get("pitch", 0)) + float(rates.get("style", 0))
                                                   if expressive else 0.0)
    sustained = rec.summary("lm_decode_tokens_per_s")
    required = rec.summary("required_tokens_per_s")
    turn = {
        "time_to_first_audio": rec.summary("time_to_first_audio"),
        "first_audio_after_first_unit": rec.summary("turn_first_audio_after_first_unit"),
        "first_audio_after_its_last_token": rec.summary("turn_first_audio_after_last_token"),
        "tokens_before_first_audio": rec.summary("turn_tokens_before_first_audio"),
        "total": rec.summary("turn_total"),
        "encode": rec.summary("turn_encode"),
        "vocoder": rec.summary("turn_vocoder"),
        "new_tokens": rec.summary("new_tokens"),
        "answer_audio_s": rec.summary("answer_audio_s"),
        "prompt_tokens": rec.summary("prompt_tokens")["median"],
        "sustained_tokens_per_s": sustained["median"] if sustained else None,
        "required_tokens_per_s": required["median"] if required else None,
        "nominal_required_tokens_per_s": nominal,
    }
    if sustained and required:
        turn["real_time_margin"] = sustained["median"] / required["median"]
    if sustained:
        turn["nominal_real_time_margin"] = sustained["median"] / nominal
    turn["note"] = ("required = tokens generated per second of answer audio in these turns (random weights set "
                    "the durations); nominal = the spec's stream rates, every unit one 40 ms frame (upper bound)")
    return turn


# -- the reference path ----------------------------------------------------------------------


def _reference(report, checkpoints, bundle, samples, answer_tokens, ids_for_lm, speech_dir, providers, n_threads,
               repeat, warmup, reference, reference_lm, max_new_tokens) -> dict[str, Any]:
    """Our PyTorch modules (fp32 eager) and transformers' Llama (bf16) on the same weights,
    timed alternately with our engines."""
    if not reference and not reference_lm:
        return {"skipped": "--no-reference"}
    if checkpoints is None:
        return {"skipped": "no checkpoint root (--checkpoints, or --synthetic which keeps its own)"}
    try:
        import torch
    except ImportError:
        return {"skipped": "torch is not installed (the export extra)"}
    from spiritlm_edge.export.checkpoints import CheckpointPaths
    from spiritlm_edge.runtime.pipeline import SpeechTokenizer
    from spiritlm_edge.runtime.units import string_to_units

    torch.set_num_threads(n_threads)
    paths = CheckpointPaths(Path(checkpoints))
    variant = bundle.variant
    result: dict[str, Any] = {"torch": torch.__version__, "threads": n_threads, "mode": "fp32 eager, no_grad",
                              "seconds": {}, "ours_seconds": {}, "speedup": {}}
    if reference:
        from spiritlm_edge.export import hubert as ex_hubert
        from spiritlm_edge.export import vocoder as ex_vocoder

        speech = SpeechTokenizer(bundle, providers=providers, n_threads=n_threads)
        answer = string_to_units("".join(answer_tokens), rng=0)
        hub, quantizer = ex_hubert.load_hubert(paths), ex_hubert.load_quantizer(paths)
        vocoder = ex_vocoder.load_vocoder(paths, variant)
        hubert_ids = [int(x) for x in answer["hubert"].split()]
        extra = {k: [int(x) for x in answer[k].split()] for k in ("pitch", "style")
                 if variant == "expressive" and k in answer}
        pairs = [
            ("hubert", lambda: ex_hubert.reference_units(hub, quantizer, samples), lambda: speech.hubert(samples)),
            ("vocoder", lambda: vocoder.synthesize(hubert_ids, **extra), lambda: speech.decode(answer)),
        ]
        if variant == "expressive":
            from spiritlm_edge.export import pitch as ex_pitch
            from spiritlm_edge.export import style as ex_style

            try:
                pitch_ref = ex_pitch.load_pitch_tokenizer(paths)
                pairs.append(("pitch", lambda: pitch_ref(samples), lambda: speech.pitch(samples)))
            except Exception as exc:  # FCPE weights not installed
                result["pitch_skipped"] = str(exc)[:200]
            style_ref = ex_style.load_style_encoder(paths)
            audio_t = torch.from_numpy(samples)
            pairs.append(("style", lambda: style_ref(audio_t), lambda: speech.style(samples)))
        timings: dict[str, list[float]] = {}
        with torch.no_grad():
            for iteration in range(warmup + repeat):
                for name, ref_fn, our_fn in pairs:
                    for key, fn in (("ref_" + name, ref_fn), ("our_" + name, our_fn)):
                        start = time.perf_counter()
                        fn()
                        if iteration >= warmup:
                            timings.setdefault(key, []).append(time.perf_counter() - start)
        for name, _, _ in pairs:
            ref, ours = summarize(timings["ref_" + name]), summarize(timings["our_" + name])
            result["seconds"][name], result["ours_seconds"][name] = ref, ours
            result["speedup"][name] = ref["median"] / ours["median"]
        del hub, quantizer, vocoder, speech
        gc.collect()
    if reference_lm:
        result["lm"] = _reference_lm(paths, variant, ids_for_lm, max_new_tokens, report)
        if "decode_tokens_per_s" in result["lm"]:
            result["speedup"]["lm_decode"] = (report["stages"]["lm_decode"]["tokens_per_s"]["median"]
                                              / result["lm"]["decode_tokens_per_s"]["median"])
            result["speedup"]["lm_prefill"] = (report["stages"]["lm_prefill"]["tokens_per_s"]["median"]
                                               / result["lm"]["prefill_tokens_per_s"]["median"])
    return result


def _reference_lm(paths, variant, ids, max_new_tokens, report) -> dict[str, Any]:
    """transformers' LlamaForCausalLM in bf16 on the checkpoint: prefill of the turn's
    prompt, then greedy decode with the KV cache. One timed run after a short warm-up:
    a 7B in bf16 is slow, and more runs would not change the picture."""
    import psutil
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    lm_dir = paths.lm_dir(variant)
    config = AutoConfig.from_pretrained(lm_dir)
    h, f, n, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    needed = 2 * (n * (4 * h * h + 3 * h * f) + 2 * v * h)  # bf16 weights
    available = psutil.virtual_memory().available
    if needed * 1.15 > available:
        return {"skipped": f"needs about {needed / 1e9:.1f} GB of RAM for bf16 weights, "
                           f"{available / 1e9:.1f} GB available"}
    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(lm_dir, torch_dtype=torch.bfloat16, low_cpu_mem_usage=True).eval()
    load_s = time.perf_counter() - start
    tokens = min(max_new_tokens, 32)
    input_ids = torch.tensor([ids])

    def run(decode_tokens):
        start = time.perf_counter()
        out = model(input_ids, use_cache=True)
        prefill = time.perf_counter() - start
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return prefill, decode_tokens / (time.perf_counter() - start)

    with torch.no_grad():
        run(2)  # warm-up: first-touch of the weights, oneDNN kernel selection
        prefill, decode = run(tokens - 1)
    peak = peak_rss_bytes()
    del model
    gc.collect()
    return {"transformers": _version("transformers"), "dtype": "bfloat16", "load_s": load_s,
            "decode_tokens": tokens, "prompt_tokens": len(ids), "peak_rss_gb": peak / 1e9,
            "prefill_tokens_per_s": summarize([len(ids) / prefill]),
            "decode_tokens_per_s": summarize([decode])}


# -- goals, table, plot ------------------------------------------------------------------------


def _lookup(report: dict, path: str):
    node: Any = report
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, (int, float)) else None


def evaluate_goals(report: dict) -> list[dict[str, Any]]:
    goals = []
    for path, op, target, what in GOALS:
        value = _lookup(report, path)
        met = None if value is None else (value <= target if op == "<=" else value >= target)
        goals.append({"figure": path, "what": what, "target": f"{op} {target}", "value": value, "met": met})
    return goals


def _ms(summary: dict | None) -> tuple[str, str]:
    if not summary:
        return "-", "-"
    return f"{summary['median'] * 1000:.1f}", f"{summary['p90'] * 1000:.1f}"


def format_table(report: dict) -> str:
    """The report as a plain-text table (what ``bench`` prints)."""
    lines = []
    b, s, m = report["bundle"], report["settings"], report["machine"]
    lines.append(f"spiritlm-edge benchmark  {report['date']}")
    lines.append(f"bundle: {b['path']} ({b['variant']}, LM {b['quant']}); weights: {b['weights']}")
    lines.append(f"machine: {m['cpu']}, {m['usable_cores']} usable cores, {m['memory_gb']} GB"
                 + (f", GPU {'; '.join(m['gpus'])}" if m["gpus"] else ""))
    lines.append(f"settings: {s['threads']} threads, n_ctx {s['n_ctx']}, {s['max_new_tokens']} new tokens, "
                 f"median/p90 of {s['repeat']} after {s['warmup']} warm-up; input {s['audio']['seconds']:.2f} s")
    lines.append("")
    rows = [("stage", "median ms", "p90 ms", "rate")]
    for name, entry in report["stages"].items():
        rate = ""
        if "rtf" in entry and entry["rtf"]:
            rate = f"RTF {entry['rtf']['median']:.3f}"
        if "tokens_per_s" in entry and entry["tokens_per_s"]:
            rate = f"{entry['tokens_per_s']['median']:.1f} tok/s"
        if "units_needed" in entry and entry["units_needed"]:
            rate = f"after {entry['units_needed']['median']:.0f} units"
        rows.append((name, *_ms(entry["seconds"]), rate))
    t = report["turn"]
    rows.append(("turn: time to first audio", *_ms(t["time_to_first_audio"]), "end of user audio -> first sample"))
    rows.append(("turn: first audio after 1st unit", *_ms(t["first_audio_after_first_unit"]),
                 f"{t['tokens_before_first_audio']['median']:.0f} tokens" if t["tokens_before_first_audio"] else ""))
    rows.append(("turn: total", *_ms(t["total"]),
                 f"{t['new_tokens']['median']:.0f} tokens, {t['answer_audio_s']['median']:.1f} s audio"
                 if t["answer_audio_s"] else ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    for k, row in enumerate(rows):
        lines.append(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}")
        if k == 0:
            lines.append("-" * (sum(widths) + 6))
    lines.append("")
    if t.get("real_time_margin") is not None:
        lines.append(f"real time: LM sustains {t['sustained_tokens_per_s']:.1f} tok/s; the answer needs "
                     f"{t['required_tokens_per_s']:.1f} tok/s (margin x{t['real_time_margin']:.2f}); at the nominal "
                     f"{t['nominal_required_tokens_per_s']:.1f} tok/s, margin x{t['nominal_real_time_margin']:.2f}")
    mem = report["memory"]
    lines.append(f"memory: peak RSS {mem['pipeline_peak_rss_gb']:.2f} GB; after load "
                 + ", ".join(f"{k} {v:.0f} MB" for k, v in mem["engines_after_load_mb"].items())
                 + f"; LM file {mem['lm_gguf_mb']:.0f} MB (mapped)")
    eo = report.get("engine_overhead")
    if eo:
        best = eo["tokens_per_s_best"]
        lines.append(f"engine overhead (best of {eo['repeats']}, {eo['n_tokens']} tokens): llama.cpp direct "
                     f"{best['raw']:.2f} tok/s, ours {best['arbitrary']:.2f} (x{eo['engine_vs_raw']:.3f}); "
                     f"constrained text {best['text']:.2f}, speech {best['speech']:.2f}")
    bw = report["bandwidth"]
    lines.append(f"bandwidth: {bw['gb_per_s']:.1f} GB/s copy; {bw['total_bytes'] / 1e9:.2f} GB read per token -> "
                 f"ceiling {bw['ceiling_tokens_per_s']:.2f} tok/s; ours {bw['ours_tokens_per_s']:.2f} "
                 f"({bw['fraction_of_ceiling']:.2f} of it)")
    ref = report["reference"]
    if "skipped" in ref:
        lines.append(f"reference path: skipped ({ref['skipped']})")
    else:
        parts = [f"{k} x{v:.2f}" for k, v in ref["speedup"].items()]
        lines.append("speed-up over the reference (PyTorch fp32 eager / transformers bf16): " + ", ".join(parts))
    lines.append("")
    lines.append("goals (full-size model, 2-core CPU):")
    for g in report["goals"]:
        status = "n/a" if g["met"] is None else ("met" if g["met"] else "NOT met")
        value = "-" if g["value"] is None else f"{g['value']:.3f}"
        lines.append(f"  {g['what']:<62} {g['target']:>8}  {value:>8}  {status}")
    return "\n".join(lines)


def plot_report(report: dict, path: str | os.PathLike) -> Path:
    """A PNG of per-stage latency (median bars, p90 whiskers), ours beside the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, medians, p90s = [], [], []
    for name, entry in report["stages"].items():
        names.append(name)
        medians.append(entry["seconds"]["median"] * 1000)
        p90s.append(entry["seconds"]["p90"] * 1000)
    for key, label in (("time_to_first_audio", "turn: first audio"), ("total", "turn: total")):
        if report["turn"].get(key):
            names.append(label)
            medians.append(report["turn"][key]["median"] * 1000)
            p90s.append(report["turn"][key]["p90"] * 1000)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.5))
    y = np.arange(len(names))
    ax.barh(y, medians, xerr=[np.zeros(len(names)), np.maximum(0, np.subtract(p90s, medians))],
            color="#4C72B0", label="spiritlm-edge (median, p90)")
    # the reference path, timed alternately with our engines (its own pairs, same phase)
    ref = report.get("reference", {})
    stage_of = {"hubert": "hubert", "pitch": "pitch", "style": "style", "vocoder": "vocoder_offline"}
    labelled = False
    for name, summary in ref.get("seconds", {}).items():
        if stage_of.get(name) in names:
            i = names.index(stage_of[name])
            ax.barh(i + 0.3, summary["median"] * 1000, height=0.25, color="#DD8452",
                    label=None if labelled else "reference PyTorch fp32 (median)")
            ax.barh(i - 0.3, ref["ours_seconds"][name]["median"] * 1000, height=0.25, color="#55A868",
                    label=None if labelled else "ours, timed alternately with the reference")
            labelled = True
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds (log scale)")
    b = report["bundle"]
    ax.set_title(f"{b['variant']} {b['quant']} ({'synthetic weights' if b['synthetic'] else 'weights as given'}), "
                 f"{report['settings']['threads']} threads")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spiritlm-edge bench",
        description="Speech-to-speech latency of a bundle: per stage, per turn, memory, vs llama.cpp direct, "
                    "vs the PyTorch reference, vs the memory-bandwidth ceiling.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path, help="bundle directory")
    source.add_argument("--synthetic", choices=["base-7b", "expressive-7b"],
                        help="build once (cached) and use a random-weight bundle of the released sizes")
    parser.add_argument("--quant", default="Q4_K_M", help="LM quantization of the --synthetic bundle")
    parser.add_argument("--synthetic-lm-layers", type=int, default=None,
                        help="--synthetic with only N of the 7B's 32 LM layers (where the 7B does not fit)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (median and p90 over them)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens generated per turn (exactly)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every engine (default: cores)")
    parser.add_argument("--n-ctx", type=int, default=2048, help="LM context size")
    parser.add_argument("--providers", default=None, help="ONNX Runtime providers, comma-separated")
    parser.add_argument("--n-gpu-layers", type=int, default=None, help="LM layers on the GPU")
    parser.add_argument("--audio", type=Path, default=None, help="the user's turn (default: the LibriSpeech clip)")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="checkpoint root of the bundle, for the reference path (--synthetic: its own)")
    parser.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference path")
    parser.add_argument("--reference-lm", action="store_true",
                        help="also time transformers' LlamaForCausalLM in bf16 (RAM: 2 bytes per parameter)")
    parser.add_argument("--no-engine-overhead", action="store_true", help="skip the llama.cpp-direct comparison")
    parser.add_argument("--bandwidth-mb", type=int, default=1024, help="buffer size of the bandwidth copy")
    parser.add_argument("--json", type=Path, default=None, help="write every figure and the machine to this file")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of per-stage latency (matplotlib)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    checkpoints, bundle = args.checkpoints, args.bundle
    if args.synthetic:
        from spiritlm_edge.bench.synthetic import build_synthetic_bundle

        bundle, root = build_synthetic_bundle(args.synthetic, args.quant, n_threads=args.threads,
                                              lm_layers=args.synthetic_lm_layers)
        checkpoints = checkpoints or root
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    command = "spiritlm-edge bench " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run_benchmark(
        bundle, repeat=args.repeat, warmup=args.warmup, max_new_tokens=args.max_new_tokens, n_threads=args.threads,
        providers=providers, n_gpu_layers=args.n_gpu_layers, n_ctx=args.n_ctx, audio=args.audio,
        checkpoints=checkpoints, reference=not args.no_reference, reference_lm=args.reference_lm,
        engine_overhead=not args.no_engine_overhead, bandwidth_mb=args.bandwidth_mb, command=command,
    )
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    if args.plot:
        print(f"wrote {plot_report(report, args.plot)}")
    return report


if __name__ == "__main__":
    from spiritlm_edge.runtime.errors import SpiritLMEdgeError

    try:
        main()
    except SpiritLMEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
