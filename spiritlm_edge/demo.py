"""``spiritlm-edge demo``: speech-to-speech on a LibriSpeech clip with a tiny random bundle.

The first run writes tiny random-weight checkpoints in the release's formats and builds
a bundle from them (seconds; needs the ``export`` extra), cached under the user cache
directory. Every run then does one streamed speech-to-speech turn and prints where the
time went. The weights are random, so the answer is babble: the point is the plumbing
and the timings, and the same commands work on a bundle of the real checkpoints.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from spiritlm_edge.runtime.audio import BUNDLED_CLIP, SAMPLE_RATE, load_audio, write_wav
from spiritlm_edge.runtime.sampling import CLI_SAMPLING

log = logging.getLogger(__name__)


def demo_bundle_dir(variant: str) -> Path:
    from platformdirs import user_cache_dir

    from spiritlm_edge import __version__

    return Path(user_cache_dir("spiritlm-edge")) / f"demo-{variant}-tiny-{__version__}"


def ensure_demo_bundle(variant: str = "base", rebuild: bool = False, bundle_dir: Path | None = None) -> Path:
    """The cached tiny bundle, built first if needed."""
    bundle_dir = bundle_dir or demo_bundle_dir(variant)
    if (bundle_dir / "bundle.json").is_file() and not rebuild:
        return bundle_dir
    try:
        from spiritlm_edge.export.build import build_bundle
        from spiritlm_edge.export.tiny import make_tiny_checkpoints
    except ImportError as exc:
        raise ImportError(
            f"building the demo bundle needs the export extra ({exc.name} is missing)", name=exc.name
        ) from exc
    import shutil

    shutil.rmtree(bundle_dir, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="spiritlm-tiny-") as tmp:
        log.info("building a tiny random-weight %s bundle in %s (once)", variant, bundle_dir)
        make_tiny_checkpoints(tmp, variant=variant, seed=0)
        build_bundle(tmp, variant, bundle_dir, quant="Q4_K_M")
    return bundle_dir


def format_timings(timings: dict[str, float], input_seconds: float) -> str:
    """A per-stage latency table for one turn."""
    rows = [
        (
            "speech encoding (units)",
            timings.get("encode_s", 0.0),
            f"RTF {timings.get('encode_s', 0.0) / input_seconds:.3f}",
        ),
        ("prompt tokenization", timings.get("tokenize_s", 0.0), f"{int(timings.get('prompt_tokens', 0))} tokens"),
        ("LM prefill (+ first token)", timings.get("prefill_s", 0.0), ""),
        (
            "LM decode",
            timings.get("decode_s", 0.0),
            f"{int(timings.get('new_tokens', 0))} tokens, {timings.get('decode_tokens_per_s', 0.0):.1f} tok/s",
        ),
        (
            "vocoder (streaming)",
            timings.get("vocoder_s", 0.0),
            f"RTF {timings.get('vocoder_s', 0.0) / timings['audio_s']:.3f}" if timings.get("audio_s") else "no audio",
        ),
        ("time to first audio", timings.get("first_audio_s", float("nan")), "from the end of the user's audio"),
        ("turn total", timings.get("total_s", 0.0), f"{timings.get('audio_s', 0.0):.2f} s of answer audio"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'stage':<{width}}  {'ms':>9}  notes", "-" * (width + 30)]
    lines += [f"{name:<{width}}  {seconds * 1000:9.1f}  {note}" for name, seconds, note in rows]
    return "\n".join(lines)


def run_demo(
    out: Path,
    variant: str = "base",
    rebuild: bool = False,
    max_new_tokens: int = 150,
    n_threads: int | None = None,
    echo=print,
) -> dict[str, float]:
    from spiritlm_edge.runtime.events import AudioChunk, TurnEnd
    from spiritlm_edge.runtime.pipeline import SpiritLM

    echo(
        "spiritlm-edge demo: the bundle has RANDOM weights, so the answer is babble; the engines, "
        "the streaming and the timings are real."
    )
    echo(
        "For the real model: spiritlm-edge build --checkpoints DIR --variant base --out BUNDLE "
        "(see README, 'From the released checkpoints to a bundle')."
    )
    bundle_dir = ensure_demo_bundle(variant, rebuild)
    spirit_lm = SpiritLM(bundle_dir, n_threads=n_threads)
    question = load_audio(BUNDLED_CLIP)
    end = None
    chunks = 0
    for event in spirit_lm.generate_stream(
        [("SPEECH", question)],
        output_modality="SPEECH",
        generation_config=CLI_SAMPLING.updated(max_new_tokens=max_new_tokens, seed=0),  # the CLI's sampling
    ):
        if isinstance(event, AudioChunk):
            chunks += 1
        elif isinstance(event, TurnEnd):
            end = event
    if end.audio is None:
        echo("the model produced no speech this time (too few units)")
    else:
        write_wav(out, end.audio)
        echo(f"wrote {out} ({end.audio.size / SAMPLE_RATE:.2f} s, streamed in {chunks} chunks)")
    echo(f"\nbundle: {bundle_dir} ({variant}); question: {BUNDLED_CLIP.name} ({question.size / SAMPLE_RATE:.2f} s)\n")
    echo(format_timings(end.timings, question.size / SAMPLE_RATE))
    return end.timings
