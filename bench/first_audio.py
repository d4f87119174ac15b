"""Time to first audio after the user stops speaking: whole-turn encoding against encoding and
prefilling while the user speaks, side by side in one run.

::

    python -m spiritlm_edge.bench.first_audio --synthetic base-7b --json first_audio.json
    python -m spiritlm_edge.bench.first_audio --bundle BUNDLE --questions 3,9,20 --repeat 3

Questions of 3, 9 and 20 s are cut from (repeats of) the LibriSpeech clip shipped in the
repo. Each turn starts from an empty KV cache (the worst case: a first turn) and is a greedy
SPEECH answer.

* ``whole``: the question is handed over when it ends; the clock starts there and covers
  encoding, the whole prefill, decoding and the vocoder up to the first audio chunk.
* ``streaming``: the question is fed to a :class:`~spiritlm_edge.runtime.pipeline.Listening`
  in 32 ms blocks at real-time pace (as a microphone would), so the encoder and the prefill
  run while it "is spoken"; the clock starts after its last block.

By default neither includes a turn detector's end-of-speech silence. ``--end-silence-ms 700``
(the live loop's default) adds it to both, as a user hears it: the clock starts at the end of
the speech, the whole-turn mode waits that long before it starts, and the streaming mode is fed
that much silence the way the detector feeds it (the turn's committed audio no longer grows), so
it can finish the turn on trial meanwhile. Each figure is the median of ``--repeat`` runs after
one warm-up; the modes alternate so that a noisy neighbour slows both. The table gives the
first token too: it is what encoding while the user speaks brings forward, while the number of
answer tokens before the first audio depends on the answer (with random weights, on its random
durations) and is the same work in both modes.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from spiritlm_edge.bench.latency import ClockedLM
from spiritlm_edge.bench.machine import PeakRSS, machine_info
from spiritlm_edge.runtime.audio import BUNDLED_CLIP, SAMPLE_RATE, load_audio
from spiritlm_edge.runtime.events import AudioChunk, TurnEnd
from spiritlm_edge.runtime.pipeline import Conversation, SpiritLM
from spiritlm_edge.runtime.speech import StreamingWindow
from spiritlm_edge.runtime.vad import BLOCK_SAMPLES

log = logging.getLogger(__name__)

MODES = ("whole", "streaming")


def question(seconds: float, clip: np.ndarray) -> np.ndarray:
    """``seconds`` of speech: the clip repeated as often as needed, then cut."""
    samples = round(seconds * SAMPLE_RATE)
    return np.tile(clip, -(-samples // len(clip)))[:samples].astype(np.float32)


def _first_audio(events, clock: ClockedLM) -> dict[str, Any]:
    """From now: seconds to the LM's first token and to the first AudioChunk of ``events``
    (which is then closed), and how many tokens the answer had by then. The first token is
    what encoding while the user speaks brings forward; the tokens before the first audio are
    the answer's (a random-weight model's durations decide how many the vocoder needs)."""
    start = time.perf_counter()
    result: dict[str, Any] = {"first_audio_s": None}
    try:
        for event in events:
            if isinstance(event, (AudioChunk, TurnEnd)):
                if isinstance(event, AudioChunk):
                    result["first_audio_s"] = time.perf_counter() - start
                break
    finally:
        events.close()
    if clock.token_times:
        result["first_token_s"] = clock.token_times[0] - start
        result["tokens_before_audio"] = len(clock.token_times)
    return result


def run_turn(
    spirit_lm: SpiritLM,
    audio: np.ndarray,
    mode: str,
    window: StreamingWindow | None,
    max_new_tokens: int,
    end_silence_s: float = 0.0,
):
    """One turn; returns its measurements."""
    spirit_lm.lm.reset()
    clock = spirit_lm.lm
    assert isinstance(clock, ClockedLM), "measure() installs the clock"
    conversation = Conversation(spirit_lm, output_modality="SPEECH", max_new_tokens=max_new_tokens)
    result: dict[str, Any] = {"mode": mode, "question_s": len(audio) / SAMPLE_RATE}
    if mode == "whole":
        time.sleep(end_silence_s)
        answer = _first_audio(conversation.stream([("SPEECH", audio)]), clock)
    else:
        listening = conversation.listen(window)
        silence = np.zeros(round(end_silence_s * SAMPLE_RATE), np.float32)
        signal = np.concatenate([audio, silence])
        due = time.perf_counter()
        for start in range(0, len(signal), BLOCK_SAMPLES):
            due += BLOCK_SAMPLES / SAMPLE_RATE
            time.sleep(max(0.0, due - time.perf_counter()))  # the microphone's pace
            listening.feed(signal[start : start + BLOCK_SAMPLES], committed=len(audio))
        stats = dict(listening.stats)
        result["unencoded_at_end_s"] = (len(audio) - listening.encoder.final_samples) / SAMPLE_RATE
        answer = _first_audio(listening.respond(audio), clock)
        result["finished_in_pause"] = float(listening._trial is not None and listening.encoder is listening._trial[1])
        result["prefilled_while_speaking"] = stats["prefilled_tokens"]
        result["prefill_while_speaking_s"] = stats["prefill_s"]
        result["encode_while_speaking_s"] = stats["encode_s"]
    prompt = spirit_lm.tokenizer.encode(
        spirit_lm.build_prompt([("SPEECH", audio)], "SPEECH", speech_encoding=mode)
    )  # what the answer's prompt held
    result["prompt_tokens"] = len(prompt)
    for key in ("first_token_s", "first_audio_s"):  # from the end of speech
        if answer.get(key) is not None:
            result[key] = end_silence_s + answer[key]
    result["tokens_before_audio"] = answer.get("tokens_before_audio")
    return result


def measure(
    spirit_lm: SpiritLM,
    questions: list[float],
    repeat: int = 3,
    window: StreamingWindow | None = None,
    max_new_tokens: int = 200,
    warmup: int = 1,
    end_silence_s: float = 0.0,
) -> list[dict[str, Any]]:
    clip = load_audio(BUNDLED_CLIP)
    if not isinstance(spirit_lm.lm, ClockedLM):
        spirit_lm.lm = ClockedLM(spirit_lm.lm)  # type: ignore[assignment]
    runs: list[dict[str, Any]] = []
    for seconds in questions:
        audio = question(seconds, clip)
        for iteration in range(warmup + repeat):
            for mode in MODES:
                log.info("%s s question, %s, run %d/%d", seconds, mode, iteration + 1, warmup + repeat)
                result = run_turn(spirit_lm, audio, mode, window, max_new_tokens, end_silence_s)
                if iteration >= warmup:
                    runs.append(result)
    return runs


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for seconds in sorted({r["question_s"] for r in runs}):
        for mode in MODES:
            group = [r for r in runs if r["question_s"] == seconds and r["mode"] == mode]
            if not group:
                continue
            row: dict[str, Any] = {"question_s": seconds, "mode": mode, "runs": len(group)}
            for key in group[0]:
                values = [r[key] for r in group if isinstance(r.get(key), (int, float))]
                if key not in ("question_s",) and values:
                    row[key] = statistics.median(values)
            rows.append(row)
    return rows


def _left_at_end(row: dict[str, Any]) -> str:
    if row.get("finished_in_pause", 0) >= 0.5:  # the median run
        return "nothing (finished during the silence)"
    return f"{row['unencoded_at_end_s']:.2f} s unencoded"


def format_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "question",
        "mode",
        "first token after end of speech",
        "first audio after end of speech",
        "answer tokens before it",
        "prompt tokens",
        "prefilled while speaking",
        "left at end",
    ]
    lines = [header]
    for row in rows:
        streamed = row.get("prefilled_while_speaking")
        lines.append(
            [
                f"{row['question_s']:g} s",
                row["mode"],
                f"{row['first_token_s']:.2f} s" if row.get("first_token_s") is not None else "-",
                f"{row['first_audio_s']:.2f} s" if row.get("first_audio_s") is not None else "-",
                f"{row['tokens_before_audio']:.0f}" if row.get("tokens_before_audio") is not None else "-",
                f"{row['prompt_tokens']:.0f}",
                "-" if streamed is None else f"{streamed:.0f} tokens",
                "-" if streamed is None else _left_at_end(row),
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path)
    source.add_argument("--synthetic", choices=["base-7b", "expressive-7b"], help="the cached random full-size bundle")
    parser.add_argument("--questions", default="3,9,20", help="question lengths in seconds, comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--stream-window", default=None, help="LEFT:STEP:LOOKAHEAD seconds")
    parser.add_argument("--end-silence-ms", type=float, default=0.0, help="a turn detector's wait (see above)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    bundle = args.bundle
    if args.synthetic:
        from spiritlm_edge.bench.synthetic import build_synthetic_bundle

        bundle, _ = build_synthetic_bundle(args.synthetic)
    window = None
    if args.stream_window:
        window = StreamingWindow(*(float(v) for v in args.stream_window.split(":")))
    questions = [float(q) for q in args.questions.split(",")]

    peak = PeakRSS().start()
    spirit_lm = SpiritLM(bundle, n_threads=args.threads)
    end_silence_s = args.end_silence_ms / 1000
    runs = measure(spirit_lm, questions, args.repeat, window, args.max_new_tokens, args.warmup, end_silence_s)
    peak_gb = peak.stop() / 1e9
    rows = summarize(runs)
    decision = spirit_lm.lm.cpu_buffers
    machine = machine_info()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "bundle": str(bundle),
        "window": vars(window or StreamingWindow()),
        "llama_cpp_extra_cpu_buffers": {"enabled": decision.enabled, "why": decision.reason},
        "kv_cache": spirit_lm.lm.kv_cache,
        "end_silence_s": end_silence_s,
        "pipeline_peak_rss_gb": round(peak_gb, 3),
        "peak_rss_method": peak.method,
        "rows": rows,
        "runs": runs,
    }
    print(format_table(rows))
    print(f"peak RSS of the pipeline: {peak_gb:.2f} GB ({peak.method}); CPU: {machine.get('cpu', '?')}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
