from pathlib import Path

import pytest

from spiritlm_edge.runtime.audio import BUNDLED_CLIP

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests, saying why, where no CUDA device is visible."""
    try:
        import onnxruntime as ort

        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (onnxruntime-gpu with CUDAExecutionProvider); none here")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: it holds directory names too
            item.add_marker(skip)


@pytest.fixture(scope="session")
def librispeech_clip() -> Path:
    """The LibriSpeech clip the package ships (runtime/data/), so tests need nothing outside the repo."""
    return BUNDLED_CLIP


@pytest.fixture(scope="session")
def tiny_base_checkpoints(tmp_path_factory) -> Path:
    from spiritlm_edge.export.tiny import make_tiny_checkpoints

    return make_tiny_checkpoints(tmp_path_factory.mktemp("ckpt-base"), "base", seed=0)


@pytest.fixture(scope="session")
def tiny_expressive_checkpoints(tmp_path_factory) -> Path:
    from spiritlm_edge.export.tiny import make_tiny_checkpoints

    return make_tiny_checkpoints(tmp_path_factory.mktemp("ckpt-expressive"), "expressive", seed=0)


def _build_tiny_bundle(tmp_path_factory, checkpoints: Path, variant: str) -> Path:
    from spiritlm_edge.export.build import build_bundle

    bundle = tmp_path_factory.mktemp(f"bundle-{variant}") / "bundle"
    build_bundle(checkpoints, variant, bundle, quant="Q8_0")
    return bundle


@pytest.fixture(scope="session")
def tiny_base_bundle(tmp_path_factory, tiny_base_checkpoints) -> Path:
    """A complete tiny base bundle (speech ONNX + Q8_0 GGUF + VAD)."""
    return _build_tiny_bundle(tmp_path_factory, tiny_base_checkpoints, "base")


@pytest.fixture(scope="session")
def tiny_expressive_bundle(tmp_path_factory, tiny_expressive_checkpoints) -> Path:
    return _build_tiny_bundle(tmp_path_factory, tiny_expressive_checkpoints, "expressive")


@pytest.fixture(scope="session")
def clip(librispeech_clip):
    """The LibriSpeech clip as 16 kHz float32 (treat as read-only)."""
    from spiritlm_edge.runtime.audio import load_audio

    return load_audio(librispeech_clip)


@pytest.fixture(scope="module")
def base(tiny_base_bundle):
    """SpiritLM on the tiny Base bundle (one per test module: its KV cache is module state)."""
    from spiritlm_edge.runtime.pipeline import SpiritLM

    return SpiritLM(tiny_base_bundle, n_threads=2)


@pytest.fixture(scope="module")
def expressive(tiny_expressive_bundle):
    """SpiritLM on the tiny Expressive bundle."""
    from spiritlm_edge.runtime.pipeline import SpiritLM

    return SpiritLM(tiny_expressive_bundle, n_threads=2)
