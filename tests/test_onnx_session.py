"""Memory settings of the ONNX Runtime sessions (runtime/onnx_session.py): no memory patterns,
the encoders' activations handed back after each run, the C heap trimmed after a model load."""

import numpy as np
from onnx import TensorProto, helper

from spiritlm_edge.runtime import onnx_session
from spiritlm_edge.runtime.bundle import Bundle
from spiritlm_edge.runtime.hubert import HubertEngine

MB = 1e6


def test_sessions_plan_no_memory_patterns(tiny_base_bundle):
    engine = HubertEngine.from_bundle(Bundle(tiny_base_bundle), n_threads=1)
    assert engine.session.get_session_options().enable_mem_pattern is False


def test_the_encoder_hands_its_activations_back_after_long_runs(tiny_base_bundle, monkeypatch):
    """Long runs ask ONNX Runtime to shrink its arena at their end (memory.enable_memory_arena_shrinkage),
    short ones keep it; the units are the same either way. How much memory that returns is
    measured by ``python -m spiritlm_edge.bench.encoder`` (an RSS delta inside the test session
    moves with whatever earlier tests left in the C heap: too noisy to assert on)."""
    from spiritlm_edge.runtime import encoder as encoder_module

    engine = HubertEngine.from_bundle(Bundle(tiny_base_bundle), n_threads=1)
    session = engine.session
    options_seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(session, name)

        def run(self, outputs, feeds, run_options=None):
            options_seen.append(run_options)
            return session.run(outputs, feeds, run_options)

    rng = np.random.default_rng(0)
    long_audio = (0.1 * rng.standard_normal(int((encoder_module.RELEASE_AFTER_SECONDS + 1) * 16000))).astype(np.float32)
    short_audio = long_audio[: 3 * 16000]
    reference = session.run(["units"], {"audio": long_audio[None]})[0]
    monkeypatch.setattr(engine, "session", Spy())
    units = engine(long_audio)
    engine(short_audio)
    np.testing.assert_array_equal(units, reference)
    released, kept = options_seen
    assert released is not None and released.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    assert kept is None


def test_loading_returns_the_freed_heap(tmp_path, monkeypatch):
    """ONNX Runtime frees the model's parse buffers into the C heap, where they stay resident
    until trimmed (134-154 MB for the release-size HuBERT, ``python -m spiritlm_edge.bench.encoder``):
    create_session trims after every load, through glibc's malloc_trim where there is one. (An
    RSS delta inside the test session is too noisy to assert on: glibc trims by itself at times.)"""
    calls = []
    monkeypatch.setattr(onnx_session, "_malloc_trim", lambda: calls.append)
    onnx_session.clear_session_cache()
    path = tmp_path / "identity.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    session = onnx_session.create_session(path, ["cpu"], 1)
    assert calls == [0]  # malloc_trim(0): every free page of the heap
    assert onnx_session.create_session(path, ["cpu"], 1) is session and calls == [0]  # cached: no new load
    np.testing.assert_array_equal(session.run(None, {"x": np.ones((1, 4), np.float32)})[0], np.ones((1, 4)))
    onnx_session.clear_session_cache()
    monkeypatch.setattr(onnx_session, "_malloc_trim", lambda: None)
    onnx_session.return_freed_memory()  # another C library: nothing to call, no error
