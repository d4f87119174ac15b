"""llama.cpp's extra CPU buffers decided per machine (runtime/cpu_buffers.py): the check runs
each setting in a child process, a crash means off, the decision is cached per CPU + build +
quant type and reused at load, an explicit option wins, and `info` shows it."""

import json
import os

import pytest
from typer.testing import CliRunner

pytest.importorskip("llama_cpp")

from spiritlm_edge.cli import app
from spiritlm_edge.runtime import cpu_buffers
from spiritlm_edge.runtime.bundle import Bundle
from spiritlm_edge.runtime.errors import ModelError
from spiritlm_edge.runtime.lm import LanguageModel

QUANT = "Q8_0"  # the conftest bundle's LM


@pytest.fixture
def gguf(tiny_base_bundle):
    return Bundle(tiny_base_bundle).path("lm")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test starts with no decision: platformdirs' user cache under tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert not cpu_buffers.cache_path().exists()


def _load(gguf, **kwargs):
    return LanguageModel(gguf, n_threads=1, n_ctx=128, n_gpu_layers=0, **kwargs)


def test_check_runs_in_child_processes_and_its_decision_is_reused(gguf, monkeypatch):
    entry = cpu_buffers.check(gguf, QUANT, n_threads=1, n_prompt=16, n_new=3, timeout=180)
    off, on = entry["off"], entry["on"]
    # the default must run; the other either runs or is reported as a crash, never taking us down
    assert off["survived"] and off["prefill_tokens_per_s"] > 0 and off["decode_tokens_per_s"] > 0
    assert on["survived"] or on["error"]
    assert off["pid"] != os.getpid() and (not on["survived"] or on["pid"] not in (os.getpid(), off["pid"]))
    assert entry["enabled"] == (
        on["survived"]
        and (
            on["prefill_tokens_per_s"] > cpu_buffers.FASTER * off["prefill_tokens_per_s"]
            or on["decode_tokens_per_s"] > cpu_buffers.FASTER * off["decode_tokens_per_s"]
        )
        and on["peak_rss_bytes"] <= cpu_buffers.MEMORY_SLACK * off["peak_rss_bytes"]
    )
    assert off["peak_rss_bytes"] > 10e6  # a process that loaded a model
    stored = json.loads(cpu_buffers.cache_path().read_text())
    assert len(stored) == 1 and next(iter(stored.values()))["key"]["quant"] == QUANT

    # a later load reads the cache and measures nothing
    def no_measuring(*args, **kwargs):
        raise AssertionError("a load must not run the check")

    monkeypatch.setattr(cpu_buffers, "run_setting", no_measuring)
    with _load(gguf) as lm:
        assert lm.cpu_buffers.source == "cache"
        assert lm.model_params.use_extra_bufts is entry["enabled"]
        assert lm.cpu_buffers.reason.startswith(entry["reason"])
    # another quant type (or CPU, or llama.cpp build) is another key: not decided yet
    assert cpu_buffers.resolve("auto", "Q4_K_M").source == "default"


def test_a_crashing_child_means_off(gguf, monkeypatch):
    # the "on" child dies the way the AMX crash does (a signal), after starting like the real one
    monkeypatch.setattr(
        cpu_buffers, "CHILD", "import os, sys\nif sys.argv[2] == 'on':\n    os.abort()\n" + cpu_buffers.CHILD
    )
    entry = cpu_buffers.check(gguf, QUANT, n_threads=1, n_prompt=8, n_new=2, timeout=180)
    assert entry["off"]["survived"]
    assert not entry["on"]["survived"] and "signal 6 (SIGABRT)" in entry["on"]["error"]
    assert entry["enabled"] is False and "crashed" in entry["reason"]
    with _load(gguf) as lm:
        assert lm.model_params.use_extra_bufts is False and lm.cpu_buffers.source == "cache"


def test_a_segfault_in_the_check_means_off_and_info_says_why(tiny_base_bundle, gguf, monkeypatch):
    # the AMX crash: a real SIGSEGV inside native code, after the model has loaded, in prefill
    crash = "if sys.argv[2] == 'on':\n    import ctypes\n    ctypes.string_at(0)\nlm.prefill(ids)"
    monkeypatch.setattr(cpu_buffers, "CHILD", cpu_buffers.CHILD.replace("lm.prefill(ids)", crash, 1))
    entry = cpu_buffers.check(gguf, QUANT, n_threads=1, n_prompt=8, n_new=2, timeout=180)
    assert entry["off"]["survived"] and not entry["on"]["survived"]
    assert entry["on"]["error"].startswith("signal 11 (SIGSEGV)")
    result = CliRunner().invoke(app, ["info", str(tiny_base_bundle)])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("llama.cpp extra CPU buffers:"))
    assert line.startswith("llama.cpp extra CPU buffers: off (they crashed in the check (signal 11 (SIGSEGV)")


def test_the_decision_is_keyed_by_the_llama_cpp_build(monkeypatch):
    key = cpu_buffers.machine_key(QUANT)
    assert set(key) == {"cpu", "llama_cpp_python", "system_info", "build", "quant"}
    assert len(key["build"]) == 16 and int(key["build"], 16) >= 0 and key["build"] == cpu_buffers.build_id()
    cpu_buffers._store(key, {"enabled": True, "reason": "they were faster", "date": "x"})
    assert cpu_buffers.resolve("auto", QUANT).source == "cache"
    # the same llama-cpp-python version rebuilt by another compiler (or without AMX): not decided
    monkeypatch.setattr(cpu_buffers, "build_id", lambda: "0123456789abcdef")
    assert cpu_buffers.resolve("auto", QUANT).source == "default"


def test_unchecked_machine_is_off_and_says_how_to_check(gguf):
    with _load(gguf) as lm:
        assert lm.model_params.use_extra_bufts is False
        assert lm.cpu_buffers.source == "default" and "--check-cpu-buffers" in lm.cpu_buffers.reason
    assert not cpu_buffers.cache_path().exists()  # nothing was measured or written at load


def test_explicit_option_overrides_the_cached_decision(gguf):
    cpu_buffers._store(cpu_buffers.machine_key(QUANT), {"enabled": True, "reason": "they were faster", "date": "x"})
    with _load(gguf) as lm:
        assert lm.model_params.use_extra_bufts is True and lm.cpu_buffers.source == "cache"
    with _load(gguf, extra_cpu_buffers="off") as lm:
        assert lm.model_params.use_extra_bufts is False and lm.cpu_buffers.source == "option"
    cpu_buffers._store(cpu_buffers.machine_key(QUANT), {"enabled": False, "reason": "they crashed", "date": "x"})
    with _load(gguf, extra_cpu_buffers=True) as lm:
        assert lm.model_params.use_extra_bufts is True and lm.cpu_buffers.source == "option"
    with pytest.raises(ModelError, match="auto, on, off"):
        _load(gguf, extra_cpu_buffers="sometimes")


@pytest.mark.parametrize(
    ("on", "enabled", "words"),
    [
        ({"survived": False, "error": "signal 11"}, False, "crashed"),
        ({"survived": True, "prefill_tokens_per_s": 19.0, "decode_tokens_per_s": 6.2}, False, "not faster"),
        ({"survived": True, "prefill_tokens_per_s": 50.0, "decode_tokens_per_s": 6.0}, True, "prefill x1.72"),
        ({"survived": True, "prefill_tokens_per_s": 29.0, "decode_tokens_per_s": 8.0}, True, "decode x1.29"),
        # the Zen 4 figures: faster decode, but the repacked weights beside the originals
        (
            {"survived": True, "prefill_tokens_per_s": 16.9, "decode_tokens_per_s": 7.5, "peak_rss_bytes": 7.8e9},
            False,
            "3.0 GB more memory",
        ),
        (
            {"survived": True, "prefill_tokens_per_s": 16.9, "decode_tokens_per_s": 7.5, "peak_rss_bytes": 4.9e9},
            True,
            "decode x1.21",
        ),
    ],
)
def test_verdict_needs_survival_speed_and_no_more_memory(on, enabled, words):
    off = {"survived": True, "prefill_tokens_per_s": 29.0, "decode_tokens_per_s": 6.2, "peak_rss_bytes": 4.8e9}
    decided, reason = cpu_buffers._verdict(off, on)
    assert decided is enabled and words in reason
    with pytest.raises(ModelError, match="does not run even without"):
        cpu_buffers._verdict({"survived": False, "error": "exit code 1"}, on)


def test_info_shows_and_makes_the_decision(tiny_base_bundle):
    runner = CliRunner()
    result = runner.invoke(app, ["info", str(tiny_base_bundle)])
    assert result.exit_code == 0, result.output
    assert "llama.cpp extra CPU buffers: off (not checked on this machine for Q8_0" in result.output
    result = runner.invoke(app, ["info", str(tiny_base_bundle), "--check-cpu-buffers"])
    assert result.exit_code == 0, result.output
    assert "extra buffers off" in result.output and "extra buffers on" in result.output
    line = next(x for x in result.output.splitlines() if x.startswith("llama.cpp extra CPU buffers:"))
    assert "in the check" in line  # the decision now comes from the check, with its figures
    result = runner.invoke(app, ["run", "--bundle", str(tiny_base_bundle), "--text", "hi", "--cpu-buffers", "maybe"])
    assert result.exit_code != 0
