"""The reference path of the benchmark: the same weights in PyTorch, timed beside our engines.

Our PyTorch modules (``export/``, fp32 eager) run HuBERT, pitch, style and the vocoder, and
transformers' ``LlamaForCausalLM`` (bf16) the LM, alternately with the bundle's engines so a
noisy neighbour slows both alike. Needs the export extra (torch); ``bench/latency.py``
imports this module only where torch is installed.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from spiritlm_edge.bench.machine import library_version, peak_rss_bytes
from spiritlm_edge.bench.report import summarize
from spiritlm_edge.export import hubert as ex_hubert
from spiritlm_edge.export import pitch as ex_pitch
from spiritlm_edge.export import style as ex_style
from spiritlm_edge.export import vocoder as ex_vocoder
from spiritlm_edge.export.checkpoints import CheckpointPaths
from spiritlm_edge.runtime.speech import SpeechTokenizer
from spiritlm_edge.runtime.units import string_to_units


def reference_report(
    report,
    checkpoints,
    bundle,
    samples,
    answer_tokens,
    ids_for_lm,
    speech_dir,
    providers,
    n_threads,
    repeat,
    warmup,
    reference,
    reference_lm,
    max_new_tokens,
) -> dict[str, Any]:
    """Our PyTorch modules (fp32 eager) and transformers' Llama (bf16) on the same weights,
    timed alternately with our engines (``checkpoints``: the root the bundle was built from)."""
    torch.set_num_threads(n_threads)
    paths = CheckpointPaths(Path(checkpoints))
    variant = bundle.variant
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": n_threads,
        "mode": "fp32 eager, no_grad",
        "seconds": {},
        "ours_seconds": {},
        "speedup": {},
    }
    if reference:
        speech = SpeechTokenizer(bundle, providers=providers, n_threads=n_threads)
        answer = string_to_units("".join(answer_tokens), rng=0)
        hub, quantizer = ex_hubert.load_hubert(paths), ex_hubert.load_quantizer(paths)
        vocoder = ex_vocoder.load_vocoder(paths, variant)
        hubert_ids = [int(x) for x in answer["hubert"].split()]
        extra = {
            k: [int(x) for x in answer[k].split()]
            for k in ("pitch", "style")
            if variant == "expressive" and k in answer
        }
        pairs = [
            ("hubert", lambda: ex_hubert.reference_units(hub, quantizer, samples), lambda: speech.hubert(samples)),
            ("vocoder", lambda: vocoder.synthesize(hubert_ids, **extra), lambda: speech.decode(answer)),
        ]
        if variant == "expressive":
            pitch_engine, style_engine = speech.pitch, speech.style
            assert pitch_engine is not None and style_engine is not None  # an Expressive bundle has both
            try:
                pitch_ref = ex_pitch.load_pitch_tokenizer(paths)
                pairs.append(("pitch", lambda: pitch_ref(samples), lambda: pitch_engine(samples)))
            except Exception as exc:  # FCPE weights not installed
                result["pitch_skipped"] = str(exc)[:200]
            style_ref = ex_style.load_style_encoder(paths)
            audio_t = torch.from_numpy(samples)
            pairs.append(("style", lambda: style_ref(audio_t), lambda: style_engine(samples)))
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
        result["lm"] = reference_lm_report(paths, variant, ids_for_lm, max_new_tokens, report)
        if "decode_tokens_per_s" in result["lm"]:
            result["speedup"]["lm_decode"] = (
                report["stages"]["lm_decode"]["tokens_per_s"]["median"] / result["lm"]["decode_tokens_per_s"]["median"]
            )
            result["speedup"]["lm_prefill"] = (
                report["stages"]["lm_prefill"]["tokens_per_s"]["median"]
                / result["lm"]["prefill_tokens_per_s"]["median"]
            )
    return result


def reference_lm_report(paths, variant, ids, max_new_tokens, report) -> dict[str, Any]:
    """transformers' LlamaForCausalLM in bf16 on the checkpoint: prefill of the turn's
    prompt, then greedy decode with the KV cache. One timed run after a short warm-up:
    a 7B in bf16 is slow, and more runs would not change the picture."""
    from transformers import AutoConfig, LlamaForCausalLM  # heavy, and only --reference-lm needs it

    lm_dir = paths.lm_dir(variant)
    config = AutoConfig.from_pretrained(lm_dir)
    h, f, n, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    needed = 2 * (n * (4 * h * h + 3 * h * f) + 2 * v * h)  # bf16 weights
    available = psutil.virtual_memory().available
    if needed * 1.15 > available:
        return {
            "skipped": f"needs about {needed / 1e9:.1f} GB of RAM for bf16 weights, {available / 1e9:.1f} GB available"
        }
    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(lm_dir, torch_dtype=torch.bfloat16, low_cpu_mem_usage=True).eval()
    load_s = time.perf_counter() - start
    tokens = min(max_new_tokens, 32)
    input_ids = torch.tensor([ids])

    def run(model, decode_tokens):
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
        run(model, 2)  # warm-up: first-touch of the weights, oneDNN kernel selection
        prefill, decode = run(model, tokens - 1)
    peak = peak_rss_bytes()
    del model
    gc.collect()
    return {
        "transformers": library_version("transformers"),
        "dtype": "bfloat16",
        "load_s": load_s,
        "decode_tokens": tokens,
        "prompt_tokens": len(ids),
        "peak_rss_gb": peak / 1e9,
        "prefill_tokens_per_s": summarize([len(ids) / prefill]),
        "decode_tokens_per_s": summarize([decode]),
    }
