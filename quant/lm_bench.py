"""Decode speed of a Spirit LM GGUF: our engine (with and without the modality
constraint) against a bare llama-cpp-python low-level loop on the same file.

    python -m spiritlm_edge.quant.lm_bench model.gguf --tokens 128 --threads 2

Every run is greedy from the same prompt, so all engines do the same work; the figure
is generated tokens per second of the decode loop (prefill excluded). Engines run
interleaved, repeat after repeat; ``best`` (the fastest repeat) is the figure to compare on
a shared machine, where other processes only ever slow a run down; ``median`` is given too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import llama_cpp

from spiritlm_edge.runtime.llama_log import install_llama_logging
from spiritlm_edge.runtime.lm import LanguageModel
from spiritlm_edge.runtime.threads import default_threads


def _raw_decode_speed(
    path: Path, prompt: list[int], n_tokens: int, n_threads: int, n_ctx: int, extra_bufts: bool
) -> float:
    """Tokens/s of the plainest llama-cpp-python loop: decode one token, greedy-sample."""
    install_llama_logging()
    mparams = llama_cpp.llama_model_default_params()
    mparams.use_extra_bufts = extra_bufts  # the same setting as our engine's
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, 512, 512
    cparams.n_threads = cparams.n_threads_batch = n_threads
    cparams.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    try:
        arr = (llama_cpp.llama_token * len(prompt))(*prompt)
        llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(prompt)))
        one = (llama_cpp.llama_token * 1)()
        start = time.perf_counter()
        for _ in range(n_tokens):
            one[0] = llama_cpp.llama_sampler_sample(chain, ctx, -1)
            llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1))
        return n_tokens / (time.perf_counter() - start)
    finally:
        llama_cpp.llama_sampler_free(chain)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def _engine_decode_speed(lm, prompt: list[int], n_tokens: int, modality: str) -> float:
    lm.reset()
    lm.prefill(prompt)
    start = time.perf_counter()
    produced = 0
    for _ in lm.generate(prompt, n_tokens, do_sample=False, output_modality=modality):
        produced += 1
    elapsed = time.perf_counter() - start
    return produced / elapsed


def measure_decode_speed(
    gguf_path: str | Path,
    n_tokens: int = 128,
    prompt_tokens: int = 32,
    n_threads: int | None = None,
    repeats: int = 3,
    n_ctx: int = 1024,
    extra_cpu_buffers: str | bool | None = "auto",
) -> dict:
    """Decode tokens/s (best and median of ``repeats``): ``raw`` (bare llama-cpp-python),
    ``arbitrary``, ``text``, ``speech`` (our engine; the last two constrained), and the
    ratios (of the best runs) to ``raw`` and of constrained to unconstrained."""
    n_threads = n_threads or default_threads()
    path = Path(gguf_path)
    lm = LanguageModel(path, n_threads=n_threads, n_ctx=n_ctx, extra_cpu_buffers=extra_cpu_buffers)
    vocab = lm.vocab
    # a speech prompt: BOS, [Speech], then Hubert units (prefill is not timed)
    prompt = [lm.bos_id, vocab.speech_id] + [
        vocab.hubert_start + (7 * i) % vocab.hubert_count for i in range(prompt_tokens - 2)
    ]
    results: dict[str, list[float]] = {"raw": [], "arbitrary": [], "text": [], "speech": []}
    for _ in range(repeats):
        results["raw"].append(_raw_decode_speed(path, prompt, n_tokens, n_threads, n_ctx, lm.cpu_buffers.enabled))
        for modality in ("arbitrary", "text", "speech"):
            results[modality].append(_engine_decode_speed(lm, prompt, n_tokens, modality))
    lm.close()
    best = {k: max(v) for k, v in results.items()}
    return {
        "gguf": str(path),
        "n_threads": n_threads,
        "n_tokens": n_tokens,
        "repeats": repeats,
        "tokens_per_s_best": best,
        "tokens_per_s_median": {k: statistics.median(v) for k, v in results.items()},
        "engine_vs_raw": best["arbitrary"] / best["raw"],
        "text_constrained_vs_unconstrained": best["text"] / best["arbitrary"],
        "speech_constrained_vs_unconstrained": best["speech"] / best["arbitrary"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(
        json.dumps(measure_decode_speed(args.gguf, args.tokens, n_threads=args.threads, repeats=args.repeats), indent=2)
    )


if __name__ == "__main__":
    main()
