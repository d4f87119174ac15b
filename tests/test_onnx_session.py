"""Memory settings of the ONNX Runtime sessions (runtime/onnx_session.py): no memory patterns,
the encoders' activations handed back after each run, the C heap trimmed after a model load."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from spiritlm_edge.bench.machine import rss_bytes
from spiritlm_edge.runtime import onnx_session
from spiritlm_edge.runtime.bundle import Bundle
from spiritlm_edge.runtime.hubert import HubertEngine

MB = 1e6


def test_sessions_plan_no_memory_patterns(tiny_base_bundle):
    engine = HubertEngine.from_bundle(Bundle(tiny_base_bundle), n_threads=1)
    assert engine.session.get_session_options().enable_mem_pattern is False


def test_the_encoder_hands_its_activations_back(tiny_base_bundle):
    engine = HubertEngine.from_bundle(Bundle(tiny_base_bundle), n_threads=1)
    audio = (0.1 * np.random.default_rng(0).standard_normal(90 * 16000)).astype(np.float32)
    engine(audio)
    # RSS also moves with the C heap and the output arrays: the least growth over two runs
    growth = []
    for _ in range(2):
        before = rss_bytes()
        units = engine(audio)
        growth.append(rss_bytes() - before)
    released = min(growth)
    # the same run with ONNX Runtime's default (the arena keeps what it grew to): the activations stay
    before = rss_bytes()
    (kept_units,) = engine.session.run(["units"], {"audio": audio[None]})
    kept = rss_bytes() - before
    np.testing.assert_array_equal(units, kept_units)
    assert kept > 30 * MB, f"a 90 s run should keep tens of MB of activations, kept {kept / MB:.0f} MB"
    assert released < kept / 2, f"the encoder kept {released / MB:.0f} MB after its run, the arena {kept / MB:.0f} MB"


def _model_with_many_weights(path, seed: int, n: int = 60, width: int = 768) -> None:
    """A chain of n MatMuls with distinct random weights (~140 MB; ORT shares identical ones)."""
    rng = np.random.default_rng(seed)
    nodes, weights, previous = [], [], "x"
    for i in range(n):
        weights.append(numpy_helper.from_array(rng.standard_normal((width, width), dtype=np.float32) / width, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [f"h{i}"]))
        previous = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, None)],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())


@pytest.mark.skipif(onnx_session._malloc_trim() is None, reason="not glibc: no malloc_trim")
def test_loading_leaves_no_freed_heap_behind(tmp_path):
    """ONNX Runtime frees the model's parse buffers into the C heap, where they stay resident
    until trimmed: create_session trims (glibc)."""
    _model_with_many_weights(tmp_path / "a.onnx", 0)
    _model_with_many_weights(tmp_path / "b.onnx", 1)
    x = {"x": np.ones((1, 768), np.float32)}
    before = rss_bytes()
    session = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    untrimmed = rss_bytes() - before
    onnx_session.return_freed_memory()
    trimmed = rss_bytes() - before
    assert untrimmed - trimmed > 25 * MB, (untrimmed / MB, trimmed / MB)
    # create_session trims by itself: trimming again right after finds nothing left to return
    ours = onnx_session.create_session(tmp_path / "b.onnx", ["cpu"], 1)
    loaded = rss_bytes()
    onnx_session.return_freed_memory()
    assert loaded - rss_bytes() < 5 * MB, (loaded - rss_bytes()) / MB
    assert np.isfinite(ours.run(None, x)[0]).all() and np.isfinite(session.run(None, x)[0]).all()
    onnx_session.clear_session_cache()
