"""Is llama.cpp's repacked (AMX / extra CPU buffer) path safe and faster on this machine?

``LanguageModel`` keeps ``use_extra_bufts`` off because, with llama-cpp-python 0.3.36 on our
Sapphire Rapids machines, a 7B (Q4_K_M and Q4_0 alike) dies with SIGSEGV inside
``llama_decode`` when it is on. Other CPUs or builds may differ; this check runs each
setting in a child process, so a crash is reported instead of taking the caller down::

    python -m spiritlm_edge.bench.cpu_buffers BUNDLE/lm-Q4_K_M.gguf --threads 2

It prints, for each setting, whether it survived and its prefill and decode tokens/s. Pass
``use_extra_bufts=True`` to ``LanguageModel`` / ``SpiritLM`` only where it survived and is faster.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys, time
from spiritlm_edge.runtime.lm import LanguageModel
path, extra, threads, n_prompt, n_new = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
lm = LanguageModel(path, n_threads=threads, n_ctx=max(512, n_prompt + n_new + 8), use_extra_bufts=extra)
ids = [lm.bos_id] + [lm.vocab.hubert_start + (i * 7) % lm.vocab.hubert_count for i in range(n_prompt)]
start = time.perf_counter()
lm.prefill(ids)
prefill = n_prompt / (time.perf_counter() - start)
start = time.perf_counter()
new = lm.generate_ids(ids, n_new, do_sample=False, output_modality="SPEECH")
decode = (len(new) - 1) / (time.perf_counter() - start)
print(json.dumps({"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode}))
"""


def check(gguf: str, extra: bool, threads: int, n_prompt: int, n_new: int, timeout: float) -> dict:
    """One setting in a child process: its speeds, or how it died."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", CHILD, gguf, "1" if extra else "0", str(threads), str(n_prompt), str(n_new)],
            capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"survived": False, "error": f"no answer within {timeout:.0f} s"}
    if result.returncode != 0:
        reason = f"signal {-result.returncode}" if result.returncode < 0 else f"exit code {result.returncode}"
        tail = result.stderr.strip().splitlines()[-1:] if result.stderr.strip() else []
        return {"survived": False, "error": " ".join([reason, *tail])[:300]}
    return {"survived": True, **json.loads(result.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", help="an LM GGUF written by `spiritlm-edge export lm`")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=9)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    report = {}
    for extra in (False, True):
        name = "use_extra_bufts=" + str(extra)
        report[name] = check(args.gguf, extra, args.threads, args.prompt_tokens, args.new_tokens, args.timeout)
        outcome = report[name]
        if outcome["survived"]:
            print(f"{name:<22} ok       prefill {outcome['prefill_tokens_per_s']:8.1f} tok/s   "
                  f"decode {outcome['decode_tokens_per_s']:6.2f} tok/s")
        else:
            print(f"{name:<22} CRASHED  {outcome['error']}")
    return report


if __name__ == "__main__":
    main()
