"""int8 (and fp16) variants of a bundle's speech engines, written only past an accuracy gate.

``spiritlm-edge quantize BUNDLE --int8 [--fp16] [--calibration a.wav ...] [--force]``
(or :func:`quantize_bundle`) adds ``hubert.int8.onnx``, ``style.int8.onnx``,
``vocoder.int8.onnx`` ... next to the fp32 engines and records them in bundle.json under
``components[name]["variants"]`` with what was quantized and the gate's figures. The
runtime opens the int8 file when there is one (:meth:`Bundle.engine_path`;
``SPIRITLM_EDGE_PRECISION=fp32|int8|fp16`` overrides).

What is quantized, and why (measured on full-size random-weight graphs, 2 CPU threads;
docs/benchmarks.md has the figures):

* HuBERT and the style encoder (the same wav2vec2-style encoder): static QDQ int8 with
  per-channel weights, activations calibrated on speech. Dynamic quantization can only
  take the transformer's MatMuls; the conv front end, about half the compute, would stay
  fp32 and cap the gain near 1.3x. Static QDQ also takes the front-end Convs and the
  positional conv to ORT's u8s8 kernels (VNNI / AMX where the CPU has them). Left fp32:
  the front end's first GEMM (its weight is computed from the audio: group norm folded in),
  the attention's activation x activation MatMuls (QK^T and softmax x V: their ranges
  change with every input, and they are a small share of the compute) and the unit
  classifier (an argmax over 501 close logits: the last place to spend precision).
* The vocoder: see ``RECIPES["vocoder"]``.
* fp16 (for GPUs): onnxruntime.transformers' float16 converter, inputs and outputs kept
  fp32 (``keep_io_types``); on CPU it is slower than fp32, so the runtime never picks it
  by itself.

The gate compares each new model with the fp32 one on gate audio (the calibration audio
by default: the bundled LibriSpeech clip and synthetic speech-like signals, or the user's
files) and refuses to write it below :data:`THRESHOLDS` unless ``force``. Thresholds are
meant for the real checkpoints; tiny random test models flip units far more easily.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from spiritlm_edge.runtime.audio import BUNDLED_CLIP, SAMPLE_RATE, load_audio
from spiritlm_edge.runtime.bundle import Bundle, add_variant
from spiritlm_edge.runtime.errors import BundleError, ModelError
from spiritlm_edge.runtime.pitch import PitchEngine

log = logging.getLogger(__name__)

QUANTIZABLE = ("hubert", "style", "vocoder")

# Gate thresholds (for real checkpoints). Unit / code agreement: the fraction of frames
# where the int8 engine gives the fp32 engine's id. Vocoder: mean absolute log-mel
# difference (dB, 80 mels) and waveform SNR against the fp32 vocoder on the same codes.
THRESHOLDS: dict[str, dict[str, float]] = {
    "hubert": {"min_unit_agreement": 0.95},
    "style": {"min_code_agreement": 0.90},
    "vocoder": {"max_mel_distance_db": 1.5, "min_snr_db": 15.0},
}


class GateRefused(ModelError):
    """An int8/fp16 model fell below the accuracy gate (pass ``force`` to write it anyway)."""


# ----------------------------------------------------------------------------- audio


def synthetic_speech(seconds: float, seed: int) -> np.ndarray:
    """A speech-like test signal (float32, 16 kHz): a glottal harmonic source with a
    moving F0, shaped by three moving formants, in syllables of ~4 Hz with fricative
    noise bursts and pauses. Not speech, but it spans speech's spectrum and dynamics,
    which is what activation ranges are calibrated on."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    # F0: a declining phrase contour with slow random wander, 80..300 Hz.
    base = rng.uniform(100, 220)
    wander = np.interp(t, np.linspace(0, seconds, 12), rng.normal(0, 0.12, 12))
    f0 = np.clip(base * (1 - 0.15 * t / seconds) * np.exp(wander), 80, 300)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    # Formants: a vowel target every ~150 ms, interpolated.
    knots = np.arange(0, seconds + 0.15, 0.15)
    f1 = np.interp(t, knots, rng.uniform(300, 850, knots.size))
    f2 = np.interp(t, knots, rng.uniform(900, 2300, knots.size))
    f3 = np.interp(t, knots, rng.uniform(2300, 3200, knots.size))
    voiced = np.zeros(n)
    for k in range(1, int(7000 / 80) + 1):
        fk = k * f0
        alive = fk < 7500
        if not alive.any():
            break
        gain = sum(1.0 / (1.0 + ((fk - f) / (60 + 0.08 * f)) ** 2) for f in (f1, f2, f3)) / k**0.5
        voiced += np.where(alive, gain, 0.0) * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    # Syllables: raised-cosine envelopes; some syllables start with a noise burst.
    envelope = np.zeros(n)
    noise = np.zeros(n)
    start = rng.uniform(0.05, 0.2)
    while start < seconds - 0.1:
        length = rng.uniform(0.12, 0.3)
        i0, i1 = int(start * SAMPLE_RATE), min(n, int((start + length) * SAMPLE_RATE))
        envelope[i0:i1] = np.sin(np.linspace(0, np.pi, i1 - i0)) ** 0.7
        if rng.random() < 0.4:  # fricative onset: high-passed noise
            j1 = min(n, i0 + int(rng.uniform(0.04, 0.1) * SAMPLE_RATE))
            burst = np.diff(rng.normal(0, 1, j1 - i0 + 1))
            noise[i0:j1] += 0.3 * burst * np.hanning(j1 - i0)
        start += length + (rng.uniform(0.25, 0.5) if rng.random() < 0.15 else rng.uniform(0.0, 0.06))
    signal = voiced * envelope + noise + rng.normal(0, 0.002, n)
    signal *= 0.1 / (np.std(signal) + 1e-9)
    return signal.astype(np.float32)


def calibration_audio(
    files: Sequence[str | os.PathLike] | None = None, synthetic: int = 2, synthetic_seconds: float = 6.0
) -> list[np.ndarray]:
    """Speech for calibration and the gate: ``files`` (any format ``load_audio`` reads) or
    by default the bundled LibriSpeech clip, plus ``synthetic`` speech-like signals."""
    clips = [load_audio(Path(f)) for f in (files or [BUNDLED_CLIP])]
    clips += [synthetic_speech(synthetic_seconds, seed) for seed in range(synthetic)]
    return clips


def split_chunks(clips: Iterable[np.ndarray], seconds: float = 4.0) -> list[np.ndarray]:
    """Clips cut into pieces of at most ``seconds`` (the last piece of each kept if >= 1 s)."""
    size = int(seconds * SAMPLE_RATE)
    out = []
    for clip in clips:
        for i in range(0, len(clip), size):
            piece = clip[i : i + size]
            if len(piece) >= SAMPLE_RATE:
                out.append(piece)
    return out


# ----------------------------------------------------------------------------- gate figures


def agreement(reference: np.ndarray, test: np.ndarray) -> float:
    """Fraction of positions where two id sequences agree (a length mismatch counts as
    disagreement on the missing positions)."""
    reference, test = np.asarray(reference).reshape(-1), np.asarray(test).reshape(-1)
    n = max(reference.size, test.size)
    if n == 0:
        return 1.0
    m = min(reference.size, test.size)
    return float(np.count_nonzero(reference[:m] == test[:m]) / n)


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10 log10(|ref|^2 / |ref - test|^2) over the common length (inf if identical)."""
    m = min(len(reference), len(test))
    ref = np.asarray(reference[:m], dtype=np.float64)
    err = ref - np.asarray(test[:m], dtype=np.float64)
    noise = float(np.sum(err * err))
    if noise == 0.0:
        return math.inf
    return float(10 * np.log10(max(float(np.sum(ref * ref)), 1e-30) / noise))


def mel_filterbank(
    n_mels: int = 80, n_fft: int = 1024, sample_rate: int = SAMPLE_RATE, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Triangular HTK-mel filters [n_mels, n_fft // 2 + 1]."""
    fmax = fmax or sample_rate / 2
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)  # noqa: E731
    edges = hz(np.linspace(mel(fmin), mel(fmax), n_mels + 2))
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lower = (bins[None, :] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    upper = (edges[2:, None] - bins[None, :]) / (edges[2:] - edges[1:-1])[:, None]
    return np.maximum(0.0, np.minimum(lower, upper))


def log_mel_db(audio: np.ndarray, n_fft: int = 1024, hop: int = 256, n_mels: int = 80) -> np.ndarray:
    """Log-mel power spectrogram in dB [frames, n_mels] (Hann window, floor 1e-10)."""
    audio = np.asarray(audio, dtype=np.float64)
    if len(audio) < n_fft:
        audio = np.pad(audio, (0, n_fft - len(audio)))
    frames = 1 + (len(audio) - n_fft) // hop
    index = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    spectrum = np.abs(np.fft.rfft(audio[index] * np.hanning(n_fft), axis=1)) ** 2
    return 10 * np.log10(np.maximum(spectrum @ mel_filterbank(n_mels, n_fft).T, 1e-10))


def mel_distance_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean absolute difference of the two log-mel spectrograms (dB), over the common length."""
    m = min(len(reference), len(test))
    return float(np.mean(np.abs(log_mel_db(reference[:m]) - log_mel_db(test[:m]))))


# ----------------------------------------------------------------------------- graph surgery


def _initializers(model) -> dict[str, Any]:
    return {init.name: init for init in model.graph.initializer}


def weight_nodes(model, op_types: Sequence[str]) -> list[str]:
    """Names of ``op_types`` nodes whose second input (the weight) is a constant."""
    inits = _initializers(model)
    return [n.name for n in model.graph.node if n.op_type in op_types and len(n.input) > 1 and n.input[1] in inits]


def activation_matmuls(model) -> list[str]:
    """MatMul / Gemm nodes with no constant operand (attention scores, the folded
    front-end GEMM): their scale would have to cover every input's range."""
    inits = _initializers(model)
    return [
        n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and not any(i in inits for i in n.input[:2])
    ]


def name_node_outputs(model) -> None:
    """Give every unnamed node a unique name (quantization tools address nodes by name)."""
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


# ----------------------------------------------------------------------------- quantization


class _FeedReader:
    """onnxruntime.quantization's CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = list(feeds)
        self._next = 0

    def get_next(self):
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def rewind(self):
        self._next = 0


@dataclass
class Recipe:
    """How one component is quantized; recorded in bundle.json as ``quantization``."""

    method: str  # "static" (QDQ, calibrated) or "dynamic"
    op_types: tuple[str, ...]
    exclude: Callable[[Any], list[str]] = lambda model: []
    exclude_why: str = ""
    per_channel: bool = True
    calibrate: str = "MinMax"
    extra: dict[str, Any] = field(default_factory=dict)


def front_end_matmuls(model) -> list[str]:
    """MatMul / Gemm nodes upstream of the first Conv: the export folds the first conv's
    group norm into a GEMM whose scale comes from the patches' covariance (cov @ W).
    Quantizing the covariance wrecks the variance estimate (measured: 9.5 dB SNR right
    after the first layer), so all of it stays fp32; it is a small share of the compute."""
    produced = {o: n for n in model.graph.node for o in n.output}
    first_conv = next((n for n in model.graph.node if n.op_type == "Conv"), None)
    if first_conv is None:
        return []
    names, stack, seen = [], [first_conv], set()
    while stack:
        node = stack.pop()
        for tensor in node.input:
            parent = produced.get(tensor)
            if parent is not None and parent.name not in seen:
                seen.add(parent.name)
                if parent.op_type in ("MatMul", "Gemm"):
                    names.append(parent.name)
                stack.append(parent)
    return names


def _encoder_exclusions(model) -> list[str]:
    # act x act MatMuls, the front end's folded GEMM, and the classifier at the very end
    # (the last Gemm before ArgMax).
    names = activation_matmuls(model) + front_end_matmuls(model)
    produced = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "ArgMax":
            source = produced.get(node.input[0])
            while source is not None and source.op_type not in ("Gemm", "MatMul", "Add"):
                source = produced.get(source.input[0]) if source.input else None
            if source is not None and source.op_type == "Add":
                source = produced.get(source.input[0])
            if source is not None and source.op_type in ("Gemm", "MatMul"):
                names.append(source.name)
    return sorted(set(names))


RECIPES: dict[str, Recipe] = {
    "hubert": Recipe(
        "static",
        ("Conv", "Gemm", "MatMul"),
        _encoder_exclusions,
        "activation x activation MatMuls (front-end GEMM with folded group norm, attention "
        "scores) and the unit classifier stay fp32",
    ),
    "style": Recipe(
        "static",
        ("Conv", "Gemm", "MatMul"),
        _encoder_exclusions,
        "activation x activation MatMuls and the style classifier stay fp32",
    ),
    "vocoder": Recipe("static", ("Conv", "ConvTranspose"), lambda model: [], ""),
}


def quantize_model(fp32_path: Path, out_path: Path, recipe: Recipe, feeds: list[dict[str, np.ndarray]]) -> dict:
    """Write the int8 model of ``fp32_path`` to ``out_path``; returns what was quantized."""
    model = onnx.load(str(fp32_path))
    name_node_outputs(model)
    candidates = weight_nodes(model, recipe.op_types)
    exclude = sorted(set(recipe.exclude(model)))
    quantized = [n for n in candidates if n not in exclude]
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / "named.onnx"
        onnx.save(model, str(named))
        common = dict(
            op_types_to_quantize=list(recipe.op_types),
            nodes_to_quantize=quantized,
            per_channel=recipe.per_channel,
            weight_type=QuantType.QInt8,
        )
        if recipe.method == "dynamic":
            quantize_dynamic(named, out_path, **common, extra_options=dict(recipe.extra))
        else:
            quantize_static(
                named,
                out_path,
                _FeedReader(feeds),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                calibrate_method=getattr(CalibrationMethod, recipe.calibrate),
                extra_options=dict(recipe.extra),
                **common,
            )
    return {
        "method": recipe.method,
        "format": "QDQ" if recipe.method == "static" else "integer ops",
        "activations": (
            "uint8 (calibrated, " + recipe.calibrate + ")" if recipe.method == "static" else "uint8 (dynamic)"
        ),
        "weights": "int8 " + ("per channel" if recipe.per_channel else "per tensor"),
        "op_types": list(recipe.op_types),
        "nodes_quantized": len(quantized),
        "nodes_excluded": exclude,
        "excluded_why": recipe.exclude_why,
        "calibration_inputs": len(feeds) if recipe.method == "static" else 0,
    }


def convert_fp16(fp32_path: Path, out_path: Path) -> dict:
    """fp16 weights and compute, fp32 inputs/outputs (for GPU execution providers)."""
    model = onnx.load(str(fp32_path))
    # Kept fp32 besides the converter's defaults: the argmax over close logits and the
    # waveform statistics (mean, variance of the audio / patch covariance) that feed a
    # normalisation, where fp16's 11-bit mantissa shows.
    block = ["ArgMax", "ReduceMean", "ReduceSum", "Sqrt"]
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST + block)
    onnx.save(converted, str(out_path))
    return {
        "method": "float16",
        "tool": "onnxruntime.transformers.float16",
        "keep_io_types": True,
        "kept_fp32_ops": block,
    }


# ----------------------------------------------------------------------------- gate


def _session(path: Path, n_threads: int | None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = n_threads or 0
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _timed(session, feeds: dict) -> tuple[list, float]:
    start = time.perf_counter()
    out = session.run(None, feeds)
    return out, time.perf_counter() - start


def _compare_runs(reference, candidate, feeds_list: list[dict]) -> tuple[list, list, dict]:
    """Run both sessions on every feed (interleaved, after one warm-up each); returns the
    outputs and median times."""
    for session in (reference, candidate):
        session.run(None, feeds_list[0])
    ref_out, cand_out, t_ref, t_cand = [], [], [], []
    for feeds in feeds_list:
        out, t = _timed(reference, feeds)
        ref_out.append(out)
        t_ref.append(t)
        out, t = _timed(candidate, feeds)
        cand_out.append(out)
        t_cand.append(t)
    timing = {
        "fp32_seconds": round(float(np.median(t_ref)), 4),
        "seconds": round(float(np.median(t_cand)), 4),
        "speedup": round(float(np.median(t_ref) / max(np.median(t_cand), 1e-9)), 3),
    }
    return ref_out, cand_out, timing


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.sum(a * b, axis=1) / np.maximum(den, 1e-30)))


def gate_figures(component: str, reference, candidate, feeds_list: list[dict]) -> dict:
    """The gate's figures for one component (both sessions given), with timings."""
    ref_out, cand_out, timing = _compare_runs(reference, candidate, feeds_list)
    if component in ("hubert", "style"):
        ref_codes = np.concatenate([o[0].reshape(-1) for o in ref_out])
        cand_codes = np.concatenate([o[0].reshape(-1) for o in cand_out])
        key = "unit_agreement" if component == "hubert" else "code_agreement"
        figures = {
            key: round(agreement(ref_codes, cand_codes), 4),
            "codes": int(ref_codes.size),
            "feature_cosine": round(
                float(np.mean([_mean_cosine(r[1], c[1]) for r, c in zip(ref_out, cand_out, strict=False)])), 5
            ),
        }
    elif component == "vocoder":
        ref_audio = np.concatenate([o[0].reshape(-1) for o in ref_out])
        cand_audio = np.concatenate([o[0].reshape(-1) for o in cand_out])
        figures = {
            "mel_distance_db": round(mel_distance_db(ref_audio, cand_audio), 4),
            "snr_db": round(snr_db(ref_audio, cand_audio), 3),
            "seconds_of_audio": round(len(ref_audio) / SAMPLE_RATE, 2),
        }
    else:
        raise ValueError(f"no gate for component {component!r}")
    figures.update(timing)
    return figures


def gate_verdict(component: str, figures: dict, thresholds: dict[str, float] | None = None) -> tuple[bool, list[str]]:
    """(passed, reasons it failed) for ``figures`` against ``thresholds`` (default: :data:`THRESHOLDS`)."""
    limits = dict(THRESHOLDS[component])
    limits.update(thresholds or {})
    failures = []
    for name, limit in sorted(limits.items()):
        kind, figure = name.split("_", 1)
        value = figures[figure]
        bad = value < limit if kind == "min" else value > limit
        if bad:
            failures.append(f"{figure} {value} {'<' if kind == 'min' else '>'} {limit}")
    return not failures, failures


# ----------------------------------------------------------------------------- bundle


def _encoder_feeds(clips: list[np.ndarray], chunk_seconds: float) -> list[dict]:
    return [{"audio": c[None].astype(np.float32)} for c in split_chunks(clips, chunk_seconds)]


def _vocoder_feeds(bundle: Bundle, clips: list[np.ndarray], n_threads: int | None, frames_per_feed: int) -> list[dict]:
    """Generator inputs made from speech: HuBERT units from the fp32 HuBERT, pitch codes
    from the fp32 pitch engine and style codes from the fp32 style encoder (Expressive)."""
    entry = bundle.component("vocoder")
    names = list(entry["inputs"])
    hubert = _session(bundle.path("hubert"), n_threads)
    pitch_engine = style = None
    if "pitch" in names:
        pitch_engine = PitchEngine.from_bundle(bundle, n_threads=n_threads)
    if "style_codes" in names:
        style = _session(bundle.path("style"), n_threads)
    feeds = []
    for index, clip in enumerate(clips):
        units = hubert.run(["units"], {"audio": clip[None]})[0].astype(np.int64)
        units = np.minimum(units, int(entry["num_units"]) - 1)  # a blank-only chunk gives 500
        frames = len(units)
        streams = {"units": units}
        if pitch_engine is not None:
            codes = pitch_engine(clip)
            streams["pitch"] = np.resize(np.repeat(codes, int(entry["pitch_upsample"])), frames)
        if style is not None:
            codes = style.run(["styles"], {"audio": clip[None]})[0].astype(np.int64)
            codes = np.minimum(codes, int(entry["num_style_codes"]) - 1)
            streams["style_codes"] = np.resize(np.repeat(codes, int(entry["style_upsample"])), frames)
        if "speaker" in names:
            streams["speaker"] = np.array([index % max(1, int(entry.get("num_speakers", 1)))], dtype=np.int64)
        if "style_id" in names:
            streams["style_id"] = np.array([index % max(1, int(entry.get("num_styles", 1)))], dtype=np.int64)
        for start in range(0, frames, frames_per_feed):
            piece = {
                k: (v[start : start + frames_per_feed] if k in ("units", "pitch", "style_codes") else v)
                for k, v in streams.items()
            }
            if len(piece["units"]) >= 8:
                feeds.append({k: np.ascontiguousarray(piece[k]) for k in names})
    return feeds


@dataclass
class _Plan:
    recipes: list[tuple[str, Recipe]]  # tried in order: the first that passes the gate is written


def _plans() -> dict[str, _Plan]:
    encoder_all = RECIPES["hubert"]
    transformer = Recipe(
        "static",
        ("Gemm", "MatMul"),
        _encoder_exclusions,
        encoder_all.exclude_why + "; the conv front end stays fp32 (fallback)",
    )
    style_all = RECIPES["style"]
    style_tf = Recipe(
        "static",
        ("Gemm", "MatMul"),
        _encoder_exclusions,
        style_all.exclude_why + "; the conv front end stays fp32 (fallback)",
    )
    return {
        "hubert": _Plan([("conv+transformer", encoder_all), ("transformer", transformer)]),
        "style": _Plan([("conv+transformer", style_all), ("transformer", style_tf)]),
        "vocoder": _Plan([("convs", RECIPES["vocoder"])]),
    }


def quantize_bundle(
    bundle_dir: str | os.PathLike,
    int8: bool = True,
    fp16: bool = False,
    calibration: Sequence[str | os.PathLike] | None = None,
    force: bool = False,
    components: Sequence[str] = QUANTIZABLE,
    thresholds: dict[str, dict[str, float]] | None = None,
    n_threads: int | None = None,
    synthetic: int = 2,
    damage: Callable[[str, Path], None] | None = None,
) -> dict:
    """Write gated int8 (and/or fp16) variants of ``components`` into the bundle.

    For each component and precision the candidates (for int8: the fastest recipe first,
    then more conservative ones) are compared with the fp32 engine on the calibration
    audio; the first that passes :data:`THRESHOLDS` (overridden per component by
    ``thresholds``) is written and recorded with its figures. If none passes, nothing is
    written for it, unless ``force`` (then the first candidate is written, marked failed).
    Returns ``{component: {precision: report}}``; raises :class:`GateRefused` after
    writing whatever passed if any candidate was refused. ``damage(component, path)``
    is a test hook that alters a candidate file before its gate.
    """
    bundle_dir = Path(bundle_dir)
    bundle = Bundle(bundle_dir)
    components = [c for c in components if bundle.has(c)] if components == QUANTIZABLE else list(components)
    unknown = [c for c in components if c not in QUANTIZABLE]
    if unknown:
        raise BundleError(f"Cannot quantize {', '.join(unknown)}: quantizable components are {', '.join(QUANTIZABLE)}.")
    for name in components:
        bundle.path(name)  # verified before hours of work
    if not (int8 or fp16):
        raise BundleError("Nothing to do: ask for --int8 and/or --fp16.")
    clips = calibration_audio(calibration, synthetic=synthetic)
    plans = _plans()
    report: dict[str, dict] = {}
    refused = []
    for name in components:
        fp32_path = bundle.path(name)
        if name == "vocoder":
            feeds = _vocoder_feeds(bundle, clips, n_threads, frames_per_feed=100)
        else:
            feeds = _encoder_feeds(clips, 4.0)
        gate_feeds = feeds if name == "vocoder" else _encoder_feeds(clips, 30.0)
        reference = _session(fp32_path, n_threads)
        candidates = []
        if int8:
            candidates += [("int8", label, recipe) for label, recipe in plans[name].recipes]
        if fp16:
            candidates.append(("fp16", "fp16", None))
        done: set[str] = set()
        for precision, label, recipe in candidates:
            if precision in done:
                continue
            out_name = f"{Path(fp32_path).stem}.{precision}.onnx"
            out_path = bundle_dir / out_name
            with tempfile.TemporaryDirectory(dir=bundle_dir) as tmp:
                tmp_path = Path(tmp) / out_name
                start = time.perf_counter()
                if recipe is None:
                    how = convert_fp16(fp32_path, tmp_path)
                else:
                    how = quantize_model(fp32_path, tmp_path, recipe, feeds)
                    how["recipe"] = label
                seconds = time.perf_counter() - start
                if damage is not None:
                    damage(name, tmp_path)
                try:
                    candidate = _session(tmp_path, n_threads)
                except Exception as exc:  # ORT's own exception types
                    raise ModelError(
                        f"ONNX Runtime cannot load the {precision} model made from {fp32_path} "
                        f"({label}): {str(exc)[:300]}"
                    ) from None
                figures = gate_figures(name, reference, candidate, gate_feeds)
                passed, failures = gate_verdict(name, figures, (thresholds or {}).get(name))
                limits = dict(THRESHOLDS[name], **(thresholds or {}).get(name, {}))
                gate = {
                    "passed": passed,
                    "thresholds": limits,
                    "failures": failures,
                    "audio": [str(f) for f in calibration]
                    if calibration
                    else [f"bundled clip {BUNDLED_CLIP.name}"]
                    + [f"synthetic speech-like #{i}" for i in range(synthetic)],
                    **figures,
                }
                last = label == [c[1] for c in candidates if c[0] == precision][-1]
                entry = {"file": out_name, "quantization": how, "gate": gate}
                result = {
                    "file": out_name,
                    "recipe": label,
                    "passed": passed,
                    "failures": failures,
                    "figures": figures,
                    "seconds_to_make": round(seconds, 1),
                }
                log.info("%s %s (%s): %s %s", name, precision, label, "passed" if passed else "REFUSED", figures)
                if passed or (last and force):
                    if not passed:
                        # --force writes the most conservative candidate (the last tried)
                        gate["forced"] = True
                        result["note"] = "written with --force"
                    os.replace(tmp_path, out_path)
                    add_variant(bundle_dir, name, precision, entry)
                    result["written"] = True
                    report.setdefault(name, {})[precision] = result
                    done.add(precision)
                else:
                    result["written"] = False
                    report.setdefault(name, {}).setdefault(f"{precision}_tried", []).append(result)
                    if last:
                        refused.append(f"{name} {precision} ({'; '.join(failures)})")
    if refused:
        error = GateRefused(
            "Accuracy gate refused: " + ", ".join(refused) + ". Nothing was written for these (passing "
            "variants were). Measure with your own speech (--calibration a.wav ...) or pass --force to "
            "write them anyway."
        )
        error.report = report
        raise error
    return report
