"""Speech-to-speech latency of a bundle: per stage, per turn, memory, and side by side with
llama.cpp driven directly, the PyTorch reference path (``bench/reference.py``) and the
machine's memory bandwidth (``bench/machine.py``); the report, its goals, table and plot are
``bench/report.py``. This module is the timing harness and the command line.

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
import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from spiritlm_edge.bench.machine import (
    PeakRSS,
    decode_bytes_per_token,
    machine_info,
    measure_bandwidth,
    rss_bytes,
)
from spiritlm_edge.bench.report import SCHEMA_VERSION, evaluate_goals, format_table, plot_report, summarize
from spiritlm_edge.bench.synthetic import build_synthetic_bundle, synthetic_info
from spiritlm_edge.quant.lm_bench import measure_decode_speed
from spiritlm_edge.runtime.audio import BUNDLED_CLIP, SAMPLE_RATE, load_audio
from spiritlm_edge.runtime.bundle import Bundle
from spiritlm_edge.runtime.errors import ModelError, SpiritLMEdgeError
from spiritlm_edge.runtime.events import AudioChunk, TurnEnd
from spiritlm_edge.runtime.hubert import HubertEngine
from spiritlm_edge.runtime.pipeline import SpiritLM
from spiritlm_edge.runtime.pitch import PitchEngine
from spiritlm_edge.runtime.style import StyleEngine
from spiritlm_edge.runtime.threads import default_threads
from spiritlm_edge.runtime.units import OutputModality, build_prompt, string_to_units, units_to_string
from spiritlm_edge.runtime.vocoder import Vocoder

log = logging.getLogger("spiritlm_edge.bench")

# -- timing helpers ---------------------------------------------------------------------------


class _Recorder:
    """Samples per named figure, kept only after the warm-up repetitions."""

    def __init__(self):
        self.samples: dict[str, list[float]] = {}
        self.active = False

    def add(self, name: str, value: float | None) -> None:
        if self.active and value is not None and math.isfinite(value):
            self.samples.setdefault(name, []).append(float(value))

    def time(self, name: str, fn: Callable, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.add(name, time.perf_counter() - start)
        return result

    def summary(self, name: str) -> dict[str, float] | None:
        return summarize(self.samples[name]) if self.samples.get(name) else None


class ClockedLM:
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
    manifest = bundle.manifest
    components = {
        name: {"file": e["file"], "mb": round(e["bytes"] / 1e6, 1), **({"quant": e["quant"]} if "quant" in e else {})}
        for name, e in sorted(bundle.components.items())
    }
    synthetic = synthetic_info(bundle.dir)
    return {
        "path": str(bundle.dir),
        "variant": bundle.variant,
        "quant": components.get("lm", {}).get("quant"),
        "components": components,
        "weights": (
            "as given (not marked synthetic)"
            if not synthetic
            else "synthetic: random weights, released shapes"
            + ("" if synthetic.get("lm_layers", 32) == 32 else f", LM cut to {synthetic['lm_layers']} of 32 layers")
        ),
        "synthetic": synthetic,
        "created_by": manifest.get("created_by"),
    }


def _load_engines(bundle, providers, n_threads, n_gpu_layers, n_ctx, cpu_buffers) -> tuple[Any, dict[str, Any]]:
    """The pipeline, loaded engine by engine to see each one's footprint. Speech sessions
    are cached per process, so the pipeline reuses the ones loaded here."""
    engines: list[tuple[str, Any]] = [("hubert", HubertEngine)]
    if bundle.variant == "expressive":
        engines += [("pitch", PitchEngine), ("style", StyleEngine)]
    engines.append(("vocoder", Vocoder))
    footprint: dict[str, Any] = {"baseline_rss_gb": rss_bytes() / 1e9, "engines_after_load_mb": {}, "load_seconds": {}}
    for name, cls in engines:
        before, start = rss_bytes(), time.perf_counter()
        cls.from_bundle(bundle, providers=providers, n_threads=n_threads)
        footprint["load_seconds"][name] = time.perf_counter() - start
        footprint["engines_after_load_mb"][name] = (rss_bytes() - before) / 1e6
    before, start = rss_bytes(), time.perf_counter()
    spirit_lm = SpiritLM(
        bundle,
        providers=providers,
        n_threads=n_threads,
        n_gpu_layers=n_gpu_layers,
        n_ctx=n_ctx,
        extra_cpu_buffers=cpu_buffers,
    )
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
    cpu_buffers: str = "auto",
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
        "settings": {
            "repeat": repeat,
            "warmup": warmup,
            "max_new_tokens": max_new_tokens,
            "threads": n_threads,
            "n_ctx": n_ctx,
            "providers": providers,
            "n_gpu_layers": n_gpu_layers,
            "decoding": "greedy, SPEECH output (EOS banned: exactly max_new_tokens tokens)",
        },
    }
    samples = load_audio(audio_path)
    audio_s = samples.size / SAMPLE_RATE
    report["settings"]["audio"] = {"path": str(audio_path), "seconds": audio_s}
    samples_44k = soxr.resample(samples, SAMPLE_RATE, 44100).astype(np.float32)

    # the pipeline's peak alone, not that of what ran before in this process (a --synthetic build)
    peak = PeakRSS().start()
    spirit_lm, footprint = _load_engines(bundle, providers, n_threads, n_gpu_layers, n_ctx, cpu_buffers)
    decision = spirit_lm.lm.cpu_buffers
    report["settings"]["llama_cpp_extra_cpu_buffers"] = {"enabled": decision.enabled, "why": decision.reason}
    report["settings"]["kv_cache"] = spirit_lm.lm.kv_cache
    speech = spirit_lm.speech_tokenizer
    clocked = ClockedLM(spirit_lm.lm)
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

        def prompt_ids(units=units):
            string = units_to_string(units, has_pitch=expressive, has_style=expressive, vocab=vocab)
            return tokenizer.encode(build_prompt([("SPEECH", string)], OutputModality.SPEECH, vocab=vocab))

        ids = rec.time("prompt_build", prompt_ids)

        # the turn: user audio in memory (its end is t=0), greedy SPEECH answer
        spirit_lm.lm.reset()
        start = time.perf_counter()
        first_chunk_at, tokens_at_first_chunk, end = None, 0, None
        for event in spirit_lm.generate_stream(
            [("SPEECH", samples)], output_modality="SPEECH", max_new_tokens=max_new_tokens, do_sample=False
        ):
            if isinstance(event, AudioChunk) and first_chunk_at is None:
                first_chunk_at = time.perf_counter()
                tokens_at_first_chunk = len(clocked.token_times)
            elif isinstance(event, TurnEnd):
                end = event
        turn_total = time.perf_counter() - start
        if end is None:
            raise ModelError("The pipeline's stream ended without its TurnEnd event.")
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
    footprint["pipeline_peak_rss_gb"] = peak.stop() / 1e9
    footprint["peak_rss_method"] = peak.method
    report["memory"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in footprint.items()}
    report["memory"]["engines_after_load_mb"] = {k: round(v, 1) for k, v in footprint["engines_after_load_mb"].items()}
    report["memory"]["load_seconds"] = {k: round(v, 3) for k, v in footprint["load_seconds"].items()}
    report["memory"]["lm_gguf_mb"] = round(bundle.path("lm").stat().st_size / 1e6, 1)

    stages = _stage_report(rec, audio_s, report.pop("_decoded_audio_s"), expressive)
    report["stages"] = stages
    report["turn"] = _turn_report(rec, bundle, expressive)

    gguf, kv_cache = Path(clocked._lm.path), clocked._lm.kv_cache
    spirit_lm.lm = clocked._lm
    spirit_lm.lm.close()  # the side-by-side runs load their own copies
    del spirit_lm, clocked
    gc.collect()

    if engine_overhead:
        log.info("engine overhead: our LM path vs llama.cpp direct (%d tokens x %d)", max_new_tokens, repeat)
        speed = measure_decode_speed(
            gguf,
            n_tokens=max_new_tokens,
            n_threads=n_threads,
            repeats=repeat,
            n_ctx=min(n_ctx, 1024),
            extra_cpu_buffers=decision.enabled,
        )
        report["engine_overhead"] = {k: v for k, v in speed.items() if k != "gguf"}
        report["engine_overhead"]["note"] = (
            "same GGUF, threads and prompt; greedy; interleaved repeats; ratios "
            "of the best repeats (a shared machine only slows runs down)"
        )

    log.info("memory bandwidth (%d MB copies)", bandwidth_mb)
    bw: dict[str, Any] = dict(measure_bandwidth(bandwidth_mb, n_threads=n_threads))
    prompt_tokens = report["turn"]["prompt_tokens"]
    per_token = decode_bytes_per_token(gguf, prompt_tokens + max_new_tokens / 2, kv_cache)
    bw.update(per_token)
    bw["ceiling_tokens_per_s"] = bw["gb_per_s"] * 1e9 / per_token["total_bytes"]
    ours = stages["lm_decode"]["tokens_per_s"]["median"]
    bw["ours_tokens_per_s"] = ours
    bw["fraction_of_ceiling"] = ours / bw["ceiling_tokens_per_s"]
    if engine_overhead:
        bw["raw_llama_cpp_fraction_of_ceiling"] = (
            report["engine_overhead"]["tokens_per_s_median"]["raw"] / bw["ceiling_tokens_per_s"]
        )
    bw["note"] = (
        "ceiling = delivered copy bandwidth / bytes read per decode step (all weights but the token "
        "embedding, plus the KV cache at the turn's mean context, in its type: " + kv_cache + ")"
    )
    report["bandwidth"] = bw

    if not reference and not reference_lm:
        report["reference"] = {"skipped": "--no-reference"}
    elif checkpoints is None:
        report["reference"] = {"skipped": "no checkpoint root (--checkpoints, or --synthetic which keeps its own)"}
    elif importlib.util.find_spec("torch") is None:
        report["reference"] = {"skipped": "torch is not installed (the export extra)"}
    else:
        from spiritlm_edge.bench.reference import reference_report  # needs torch: checked just above

        report["reference"] = reference_report(
            report,
            checkpoints,
            bundle,
            samples,
            answer_tokens,
            ids_for_lm=ids,
            speech_dir=bundle_dir,
            providers=providers,
            n_threads=n_threads,
            repeat=repeat,
            warmup=warmup,
            reference=reference,
            reference_lm=reference_lm,
            max_new_tokens=max_new_tokens,
        )
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
    stages.update(
        {
            "prompt_build": stage("prompt_build", what="units -> prompt string -> token ids"),
            "lm_prefill": stage(
                "lm_prefill",
                tokens_per_s=rec.summary("lm_prefill_tokens_per_s"),
                what="prompt prefill + first token (in the turn)",
            ),
            "lm_decode": stage(
                "lm_decode",
                tokens_per_s=rec.summary("lm_decode_tokens_per_s"),
                what="token-by-token decode, SPEECH constraint on (in the turn)",
            ),
            "vocoder_offline": stage(
                "vocoder_offline",
                rtf=rec.summary("vocoder_offline_rtf"),
                what="units -> audio in one call (durations + generator)",
            ),
            "vocoder_streaming": stage(
                "vocoder_streaming",
                rtf=rec.summary("vocoder_streaming_rtf"),
                what="the same units streamed, chunk by chunk",
            ),
            "vocoder_first_chunk": stage(
                "vocoder_first_chunk",
                units_needed=rec.summary("vocoder_units_before_first_chunk"),
                what="first streamed chunk after the last unit it needs arrives",
            ),
        }
    )
    stages["vocoder_offline"]["audio_s"] = decoded_s
    return stages


def _turn_report(rec: _Recorder, bundle, expressive: bool) -> dict[str, Any]:
    rates = bundle.manifest.get("token_rates") or {"hubert": 24.99}
    nominal = float(rates.get("hubert", 24.99)) + (
        float(rates.get("pitch", 0)) + float(rates.get("style", 0)) if expressive else 0.0
    )
    sustained = rec.summary("lm_decode_tokens_per_s")
    required = rec.summary("required_tokens_per_s")
    prompt_tokens = rec.summary("prompt_tokens")
    assert prompt_tokens is not None  # recorded in every timed repetition
    turn: dict[str, Any] = {
        "time_to_first_audio": rec.summary("time_to_first_audio"),
        "first_audio_after_first_unit": rec.summary("turn_first_audio_after_first_unit"),
        "first_audio_after_its_last_token": rec.summary("turn_first_audio_after_last_token"),
        "tokens_before_first_audio": rec.summary("turn_tokens_before_first_audio"),
        "total": rec.summary("turn_total"),
        "encode": rec.summary("turn_encode"),
        "vocoder": rec.summary("turn_vocoder"),
        "new_tokens": rec.summary("new_tokens"),
        "answer_audio_s": rec.summary("answer_audio_s"),
        "prompt_tokens": prompt_tokens["median"],
        "sustained_tokens_per_s": sustained["median"] if sustained else None,
        "required_tokens_per_s": required["median"] if required else None,
        "nominal_required_tokens_per_s": nominal,
    }
    if sustained and required:
        turn["real_time_margin"] = sustained["median"] / required["median"]
    if sustained:
        turn["nominal_real_time_margin"] = sustained["median"] / nominal
    turn["note"] = (
        "required = tokens generated per second of answer audio in these turns (random weights set "
        "the durations); nominal = the spec's stream rates, every unit one 40 ms frame (upper bound)"
    )
    return turn


# -- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spiritlm-edge bench",
        description="Speech-to-speech latency of a bundle: per stage, per turn, memory, vs llama.cpp direct, "
        "vs the PyTorch reference, vs the memory-bandwidth ceiling.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path, help="bundle directory")
    source.add_argument(
        "--synthetic",
        choices=["base-7b", "expressive-7b"],
        help="build once (cached) and use a random-weight bundle of the released sizes",
    )
    parser.add_argument("--quant", default="Q4_K_M", help="LM quantization of the --synthetic bundle")
    parser.add_argument(
        "--synthetic-lm-layers",
        type=int,
        default=None,
        help="--synthetic with only N of the 7B's 32 LM layers (where the 7B does not fit)",
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (median and p90 over them)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens generated per turn (exactly)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every engine (default: cores)")
    parser.add_argument("--n-ctx", type=int, default=2048, help="LM context size")
    parser.add_argument("--providers", default=None, help="ONNX Runtime providers, comma-separated")
    parser.add_argument("--n-gpu-layers", type=int, default=None, help="LM layers on the GPU")
    parser.add_argument(
        "--cpu-buffers",
        choices=["auto", "on", "off"],
        default="auto",
        help="llama.cpp's extra CPU buffers (auto: this machine's cached check, else off)",
    )
    parser.add_argument("--audio", type=Path, default=None, help="the user's turn (default: the LibriSpeech clip)")
    parser.add_argument(
        "--checkpoints",
        type=Path,
        default=None,
        help="checkpoint root of the bundle, for the reference path (--synthetic: its own)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference path")
    parser.add_argument(
        "--reference-lm",
        action="store_true",
        help="also time transformers' LlamaForCausalLM in bf16 (RAM: 2 bytes per parameter)",
    )
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
        bundle, root = build_synthetic_bundle(
            args.synthetic, args.quant, n_threads=args.threads, lm_layers=args.synthetic_lm_layers
        )
        checkpoints = checkpoints or root
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    command = "spiritlm-edge bench " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run_benchmark(
        bundle,
        repeat=args.repeat,
        warmup=args.warmup,
        max_new_tokens=args.max_new_tokens,
        n_threads=args.threads,
        providers=providers,
        n_gpu_layers=args.n_gpu_layers,
        n_ctx=args.n_ctx,
        cpu_buffers=args.cpu_buffers,
        audio=args.audio,
        checkpoints=checkpoints,
        reference=not args.no_reference,
        reference_lm=args.reference_lm,
        engine_overhead=not args.no_engine_overhead,
        bandwidth_mb=args.bandwidth_mb,
        command=command,
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
    try:
        main()
    except SpiritLMEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
