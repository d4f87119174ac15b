"""A benchmark report's figures against the project's goals, as a table and as a plot.

The report is a plain dict (written as JSON by ``--json``); everything here reads it and
nothing here measures.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
# Targets from the project brief, for a full-size model (synthetic base-7b, Q4_K_M) on a
# 2-core x86 CPU. (figure path in the report, comparison, target, what it is)
GOALS = [
    ("stages.hubert.rtf.median", "<=", 0.05, "HuBERT real-time factor"),
    ("stages.vocoder_offline.rtf.median", "<=", 0.05, "vocoder real-time factor (offline)"),
    (
        "stages.vocoder_first_chunk.seconds.median",
        "<=",
        0.100,
        "vocoder's first streamed chunk after the units it needs (s)",
    ),
    ("memory.pipeline_peak_rss_gb", "<=", 5.5, "peak RSS of the whole pipeline at n_ctx 2048 (GB)"),
    ("engine_overhead.engine_vs_raw", ">=", 0.95, "our decode tokens/s / llama.cpp direct"),
    ("bandwidth.fraction_of_ceiling", ">=", 0.70, "our decode tokens/s / bandwidth ceiling"),
    ("reference.speedup.hubert", ">=", 1.5, "HuBERT speed-up over PyTorch eager fp32"),
    ("reference.speedup.vocoder", ">=", 1.5, "vocoder speed-up over PyTorch eager fp32"),
    ("reference.speedup.lm_decode", ">=", 3.0, "LM decode speed-up over transformers bf16"),
]


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
    lines.append(
        f"machine: {m['cpu']}, {m['usable_cores']} usable cores, {m['memory_gb']} GB"
        + (f", GPU {'; '.join(m['gpus'])}" if m["gpus"] else "")
    )
    lines.append(
        f"settings: {s['threads']} threads, n_ctx {s['n_ctx']}, {s['max_new_tokens']} new tokens, "
        f"median/p90 of {s['repeat']} after {s['warmup']} warm-up; input {s['audio']['seconds']:.2f} s"
    )
    if "llama_cpp_extra_cpu_buffers" in s:  # reports written before the per-machine decision lack it
        buffers = s["llama_cpp_extra_cpu_buffers"]
        lines.append(
            f"llama.cpp: KV cache {s.get('kv_cache', 'f16')}; extra CPU buffers "
            f"{'on' if buffers['enabled'] else 'off'} ({buffers['why']})"
        )
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
    rows.append(
        (
            "turn: first audio after 1st unit",
            *_ms(t["first_audio_after_first_unit"]),
            f"{t['tokens_before_first_audio']['median']:.0f} tokens" if t["tokens_before_first_audio"] else "",
        )
    )
    rows.append(
        (
            "turn: total",
            *_ms(t["total"]),
            f"{t['new_tokens']['median']:.0f} tokens, {t['answer_audio_s']['median']:.1f} s audio"
            if t["answer_audio_s"]
            else "",
        )
    )
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    for k, row in enumerate(rows):
        lines.append(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}")
        if k == 0:
            lines.append("-" * (sum(widths) + 6))
    lines.append("")
    if t.get("real_time_margin") is not None:
        lines.append(
            f"real time: LM sustains {t['sustained_tokens_per_s']:.1f} tok/s; the answer needs "
            f"{t['required_tokens_per_s']:.1f} tok/s (margin x{t['real_time_margin']:.2f}); at the nominal "
            f"{t['nominal_required_tokens_per_s']:.1f} tok/s, margin x{t['nominal_real_time_margin']:.2f}"
        )
    mem = report["memory"]
    lines.append(
        f"memory: peak RSS {mem['pipeline_peak_rss_gb']:.2f} GB; after load "
        + ", ".join(f"{k} {v:.0f} MB" for k, v in mem["engines_after_load_mb"].items())
        + f"; LM file {mem['lm_gguf_mb']:.0f} MB (mapped)"
    )
    eo = report.get("engine_overhead")
    if eo:
        best = eo["tokens_per_s_best"]
        lines.append(
            f"engine overhead (best of {eo['repeats']}, {eo['n_tokens']} tokens): llama.cpp direct "
            f"{best['raw']:.2f} tok/s, ours {best['arbitrary']:.2f} (x{eo['engine_vs_raw']:.3f}); "
            f"constrained text {best['text']:.2f}, speech {best['speech']:.2f}"
        )
    bw = report["bandwidth"]
    lines.append(
        f"bandwidth: {bw['gb_per_s']:.1f} GB/s copy; {bw['total_bytes'] / 1e9:.2f} GB read per token -> "
        f"ceiling {bw['ceiling_tokens_per_s']:.2f} tok/s; ours {bw['ours_tokens_per_s']:.2f} "
        f"({bw['fraction_of_ceiling']:.2f} of it)"
    )
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
    import matplotlib  # optional (the dev extra): only --plot needs it

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
    ax.barh(
        y,
        medians,
        xerr=[np.zeros(len(names)), np.maximum(0, np.subtract(p90s, medians))],
        color="#4C72B0",
        label="spiritlm-edge (median, p90)",
    )
    # the reference path, timed alternately with our engines (its own pairs, same phase)
    ref = report.get("reference", {})
    stage_of = {"hubert": "hubert", "pitch": "pitch", "style": "style", "vocoder": "vocoder_offline"}
    labelled = False
    for name, summary in ref.get("seconds", {}).items():
        if stage_of.get(name) in names:
            i = names.index(stage_of[name])
            ax.barh(
                i + 0.3,
                summary["median"] * 1000,
                height=0.25,
                color="#DD8452",
                label=None if labelled else "reference PyTorch fp32 (median)",
            )
            ax.barh(
                i - 0.3,
                ref["ours_seconds"][name]["median"] * 1000,
                height=0.25,
                color="#55A868",
                label=None if labelled else "ours, timed alternately with the reference",
            )
            labelled = True
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds (log scale)")
    b = report["bundle"]
    ax.set_title(
        f"{b['variant']} {b['quant']} ({'synthetic weights' if b['synthetic'] else 'weights as given'}), "
        f"{report['settings']['threads']} threads"
    )
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
