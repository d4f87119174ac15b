"""bench/latency.py and bench/synthetic.py on tiny bundles (the full-size run is not in CI)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from spiritlm_edge.bench import latency, machine, synthetic
from spiritlm_edge.bench import report as bench_report


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from spiritlm_edge.export.build import build_bundle
    from spiritlm_edge.export.tiny import make_tiny_checkpoints

    root = tmp_path_factory.mktemp("bench-ckpt")
    make_tiny_checkpoints(root, variant="base", seed=3)
    bundle = tmp_path_factory.mktemp("bench-bundle") / "bundle"
    build_bundle(root, "base", bundle, quant="Q4_K_M")
    return bundle, root


@pytest.fixture(scope="module")
def bench_run(tiny_bundle, tmp_path_factory):
    bundle, root = tiny_bundle
    out = tmp_path_factory.mktemp("bench-out")
    argv = [
        "--bundle",
        str(bundle),
        "--checkpoints",
        str(root),
        "--repeat",
        "1",
        "--warmup",
        "0",
        "--max-new-tokens",
        "20",
        "--bandwidth-mb",
        "16",
        "--json",
        str(out / "bench.json"),
        "--plot",
        str(out / "bench.png"),
        "--reference-lm",
    ]
    report = latency.main(argv)
    return report, out


def _walk_summaries(node, path=""):
    if isinstance(node, dict):
        if {"median", "p90", "n"} <= set(node):
            yield path, node
        for key, value in node.items():
            yield from _walk_summaries(value, f"{path}.{key}" if path else key)


def test_summarize_median_and_p90():
    s = bench_report.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s["median"] == 3.0 and s["min"] == 1.0 and s["max"] == 5.0 and s["n"] == 5
    assert s["p90"] == pytest.approx(4.6)  # linear interpolation between 4 and 5
    one = bench_report.summarize([0.25])
    assert one["median"] == one["p90"] == 0.25
    with pytest.raises(ValueError):
        bench_report.summarize([])


def test_goals_compare_in_the_right_direction():
    report = {
        "stages": {"hubert": {"rtf": {"median": 0.04}}, "vocoder_offline": {"rtf": {"median": 0.06}}},
        "engine_overhead": {"engine_vs_raw": 0.97},
    }
    goals = {g["figure"]: g for g in bench_report.evaluate_goals(report)}
    assert goals["stages.hubert.rtf.median"]["met"] is True
    assert goals["stages.vocoder_offline.rtf.median"]["met"] is False
    assert goals["engine_overhead.engine_vs_raw"]["met"] is True
    assert goals["memory.pipeline_peak_rss_gb"]["met"] is None  # not measured: n/a, not a pass


def test_report_has_every_figure_with_sane_values(bench_run):
    report, out = bench_run
    saved = json.loads((out / "bench.json").read_text())
    assert saved["schema"] == bench_report.SCHEMA_VERSION
    for key in (
        "machine",
        "bundle",
        "settings",
        "stages",
        "turn",
        "memory",
        "engine_overhead",
        "bandwidth",
        "reference",
        "goals",
    ):
        assert key in saved, key
    machine = saved["machine"]
    assert machine["cpu"] and machine["usable_cores"] >= 1 and machine["versions"]["numpy"]
    assert set(saved["stages"]) >= {
        "audio_load",
        "audio_resample",
        "hubert",
        "prompt_build",
        "lm_prefill",
        "lm_decode",
        "vocoder_offline",
        "vocoder_streaming",
        "vocoder_first_chunk",
    }
    summaries = dict(_walk_summaries(saved))
    for stage in saved["stages"]:
        assert f"stages.{stage}.seconds" in summaries, stage
    for path, s in summaries.items():
        assert s["n"] >= 1, path
        assert s["median"] > 0 and math.isfinite(s["median"]), path
        assert s["p90"] >= s["median"] - 1e-12, path
    stages = saved["stages"]
    assert stages["hubert"]["rtf"]["median"] > 0
    assert stages["lm_decode"]["tokens_per_s"]["median"] > 0
    assert stages["lm_prefill"]["tokens_per_s"]["median"] > 0
    turn = saved["turn"]
    assert turn["new_tokens"]["median"] == 20  # SPEECH bans EOS: exactly --max-new-tokens
    assert turn["time_to_first_audio"]["median"] <= turn["total"]["median"]
    assert turn["real_time_margin"] > 0 and turn["required_tokens_per_s"] > 0
    memory = saved["memory"]
    assert memory["pipeline_peak_rss_gb"] >= memory["after_load_rss_gb"] > 0
    assert set(memory["engines_after_load_mb"]) == {"hubert", "vocoder", "lm"}
    overhead = saved["engine_overhead"]
    assert overhead["tokens_per_s_best"]["raw"] > 0 and overhead["engine_vs_raw"] > 0
    bandwidth = saved["bandwidth"]
    assert bandwidth["gb_per_s"] > 0 and bandwidth["ceiling_tokens_per_s"] > 0
    assert 0 < bandwidth["weights_bytes"] < bandwidth["gguf_tensor_bytes"]
    reference = saved["reference"]
    assert set(reference["speedup"]) >= {"hubert", "vocoder", "lm_decode", "lm_prefill"}
    assert reference["lm"]["decode_tokens"] == 20
    assert all(v > 0 for v in reference["speedup"].values())
    assert {g["figure"] for g in saved["goals"]} == {g[0] for g in bench_report.GOALS}


def test_table_prints_and_plot_is_a_png(bench_run, capsys):
    report, out = bench_run
    table = bench_report.format_table(report)
    for needle in (
        "hubert",
        "lm_decode",
        "vocoder_first_chunk",
        "time to first audio",
        "peak RSS",
        "engine overhead",
        "ceiling",
        "speed-up over the reference",
        "goals",
    ):
        assert needle in table, needle
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_options_are_clear_errors(tiny_bundle):
    from spiritlm_edge.runtime.errors import ModelError

    with pytest.raises(ModelError, match="repeat"):
        latency.run_benchmark(tiny_bundle[0], repeat=0)
    with pytest.raises(ModelError, match="base-7b"):
        synthetic.synthetic_dir("llama-70b")


def test_bandwidth_and_bytes_per_token(tiny_bundle):
    from spiritlm_edge.runtime.bundle import Bundle

    bw = machine.measure_bandwidth(8, repeats=2, n_threads=2)
    assert bw["gb_per_s"] > 0.1
    gguf = Bundle(tiny_bundle[0]).path("lm")
    short, long = machine.decode_bytes_per_token(gguf, 10), machine.decode_bytes_per_token(gguf, 1000)
    assert short["weights_bytes"] == long["weights_bytes"]
    assert long["kv_cache_bytes"] == pytest.approx(100 * short["kv_cache_bytes"])
    # a q8_0 cache: 34 bytes per block of 32 values, as llama.cpp sizes it
    q8 = machine.decode_bytes_per_token(gguf, 1000, "q8_0")
    assert q8["kv_cache_bytes"] == pytest.approx(long["kv_cache_bytes"] * 34 / 32 / 2)


def test_synthetic_plan_and_shapes():
    assert synthetic.embedding_rows("base") == 32512
    assert synthetic.embedding_rows("expressive") == 32768
    # Llama-2 7B with the 32 512-row vocabulary: 6.74 B parameters
    assert synthetic.lm_parameter_count("base") == pytest.approx(6.74e9, rel=0.01)
    plan = synthetic.build_plan("base-7b")
    assert "13.5 GB" in plan and "minutes" in plan
    # a cut model keeps every shape but the layer count, and gets its own cache directory
    cut = synthetic.lm_config(4)
    assert cut["num_layers"] == 4 and cut["hidden_size"] == 4096 and cut["intermediate_size"] == 11008
    assert synthetic.lm_parameter_count("base", cut) < synthetic.lm_parameter_count("base") / 4
    assert synthetic.synthetic_dir("base-7b", "/c", 4).name == "synthetic-base-7b-4layers"
    assert synthetic.synthetic_dir("base-7b", "/c").name == "synthetic-base-7b"


def test_synthetic_lm_has_released_layout(tmp_path):
    """A small-width LM through the same writer: full 32 000-piece vocabulary, speech tokens
    at their released ids, random finite bf16 safetensors; the converter accepts it."""
    from safetensors import safe_open

    from spiritlm_edge.export.checkpoints import CheckpointPaths
    from spiritlm_edge.export.lm import load_lm_config
    from spiritlm_edge.export.random_lm import write_random_lm
    from spiritlm_edge.runtime.tokenizer import SpiritTokenizer

    paths = CheckpointPaths(tmp_path)
    cfg = dict(hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4, num_kv_heads=4, context_length=4096)
    lm_dir = write_random_lm(paths, "expressive", seed=1, cfg=cfg, text_vocab=synthetic.TEXT_VOCAB)
    loaded = load_lm_config(paths, "expressive")
    assert loaded.vocab_size == 32768 and loaded.weights_path.name == "model.safetensors"
    tokenizer = SpiritTokenizer.from_dir(lm_dir, variant="expressive")
    vocab = tokenizer.vocab
    assert (vocab.text_id, vocab.speech_id, vocab.hubert_start) == (32000, 32001, 32002)
    assert vocab.pitch_start == 32503 and vocab.style_start == 32567
    ids = tokenizer.encode("[Speech][Hu7][Pi3][St99] hello")
    assert ids[:1] == [1] and 32009 in ids and 32506 in ids and 32666 in ids
    with safe_open(str(lm_dir / "model.safetensors"), framework="pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight").float()
        down = f.get_tensor("model.layers.0.mlp.down_proj.weight").float()
        norm = f.get_tensor("model.norm.weight").float()
        assert tuple(embed.shape) == (32768, 256) and tuple(down.shape) == (256, 512)
        for t in (embed, down):
            assert bool(t.isfinite().all()) and float(t.std()) > 0
        assert float(down.std()) == pytest.approx(512**-0.5, rel=0.05)
        assert bool((norm == 1).all())
        # rows are not copies of one another
        assert not np.array_equal(embed[0].numpy(), embed[1].numpy())


def _big_allocation_then_free(gigabytes: float) -> int:
    """Touch ``gigabytes`` of memory, free it, and return the process's high-water mark."""
    block = np.ones(int(gigabytes * 1e9) // 8)  # np.ones writes every page: all of it is resident
    del block
    return machine.peak_rss_bytes()


def _no_clear_refs(monkeypatch):
    real_open = open

    def fake_open(path, *args, **kwargs):
        if str(path) == "/proc/self/clear_refs":
            raise PermissionError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(machine, "open", fake_open, raising=False)


@pytest.mark.parametrize("reset", [True, False], ids=["clear_refs", "sampled"])
def test_peak_rss_excludes_what_ran_before(reset, monkeypatch):
    if not reset:
        _no_clear_refs(monkeypatch)
    before = _big_allocation_then_free(1.0)
    with machine.PeakRSS() as peak:
        block = np.ones(int(0.3e9) // 8)  # a peak inside the measurement, held long enough to be sampled
        machine.time.sleep(0.2)
        del block
    assert peak.method.startswith("high-water mark reset") is reset and ("lower bound" in peak.method) is not reset
    assert peak.bytes < before - 0.5e9  # the 1 GB before the start is not in it
    assert peak.bytes >= machine.rss_bytes() + 0.25e9  # the 0.3 GB inside is


@pytest.mark.parametrize("reset", [True, False], ids=["clear_refs", "sampled"])
def test_bench_peak_rss_is_the_pipelines_not_the_builds(tiny_bundle, reset, monkeypatch, tmp_path):
    """`bench --synthetic` builds its bundle in the same process (a 14 GB peak for the 7B): the
    reported peak must be the pipeline's alone."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no CPU-buffer decision cached: off
    if not reset:
        _no_clear_refs(monkeypatch)
    bundle, _ = tiny_bundle
    before = _big_allocation_then_free(1.5)  # stands in for the build
    report = latency.run_benchmark(
        bundle,
        repeat=1,
        warmup=0,
        max_new_tokens=5,
        n_threads=1,
        reference=False,
        engine_overhead=False,
        bandwidth_mb=16,
    )
    memory = report["memory"]
    assert memory["pipeline_peak_rss_gb"] * 1e9 < before - 1e9
    assert memory["pipeline_peak_rss_gb"] >= memory["after_load_rss_gb"] > 0
    assert memory["peak_rss_method"].startswith("high-water mark reset") is reset
    assert report["settings"]["llama_cpp_extra_cpu_buffers"]["why"] and report["settings"]["kv_cache"] == "q8_0"
    assert "extra CPU buffers off (not checked" in bench_report.format_table(report)
