"""Style encoder (wav2vec2 classifier, 1 Hz): loader, reference semantics, ONNX export, ORT engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from spiritlm_edge.export import random_speech as RS  # noqa: E402
from spiritlm_edge.export import style as S  # noqa: E402
from spiritlm_edge.export.checkpoints import CheckpointPaths  # noqa: E402
from spiritlm_edge.runtime import audio as audio_io  # noqa: E402
from spiritlm_edge.runtime.bundle import Bundle  # noqa: E402
from spiritlm_edge.runtime.errors import CheckpointError  # noqa: E402
from spiritlm_edge.runtime.style import StyleEngine  # noqa: E402

SR = 16000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = CheckpointPaths(tmp_path_factory.mktemp("style-ckpt"))
    RS.write_style(paths, variant="expressive", seed=5)
    return paths


@pytest.fixture(scope="module")
def model(tiny):
    return S.load_style_encoder(tiny)


@pytest.fixture(scope="module")
def bundle_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("style-bundle")
    S.export_onnx(tiny, "expressive", out)
    return out


@pytest.fixture(scope="module")
def engine(bundle_dir):
    return StyleEngine.from_bundle(Bundle(bundle_dir), n_threads=2)


@pytest.fixture(scope="module")
def clip(librispeech_clip):
    return audio_io.load_audio(librispeech_clip)


def signals(clip):
    rng = np.random.default_rng(2)
    t = np.arange(4 * SR) / SR
    return {
        "librispeech": clip,
        "noise": (0.05 * rng.standard_normal(3 * SR)).astype(np.float32),
        "chirp": (0.3 * np.sin(2 * np.pi * (80 + 900 * t) * t)).astype(np.float32),
        "min_1280": clip[2 * SR : 2 * SR + 1280].copy(),
        "partial_window": clip[: 2 * SR + 7777].copy(),  # 2.49 s: last window is partial
    }


def hf_reference(tiny, audio):
    """The reference's computation with transformers' own model and feature extractor."""
    hf = transformers.Wav2Vec2ForSequenceClassification.from_pretrained(tiny.style_encoder_dir).eval()
    extractor = transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True, return_attention_mask=False
    )
    with torch.no_grad():
        inputs = extractor(audio, sampling_rate=SR, return_tensors="pt").input_values
        hidden = hf.projector(hf.wav2vec2(inputs)[0])[0]
        pooled = torch.stack([hidden[i : i + 50].mean(0) for i in range(0, hidden.shape[0], 50)])
        return hf.classifier(pooled).argmax(-1).numpy(), pooled.numpy()


@pytest.fixture(scope="module")
def references(tiny, clip):
    return {name: hf_reference(tiny, audio) for name, audio in signals(clip).items()}


def test_reference_module_matches_transformers(model, clip, references):
    for name, audio in signals(clip).items():
        expected, _ = references[name]
        got = model(torch.from_numpy(audio)).numpy()
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_onnx_matches_reference(model, engine, clip, references):
    agree = windows = 0
    for name, audio in signals(clip).items():
        styles, pooled = engine.session.run(["styles", "pooled"], {"audio": audio[None]})
        expected, expected_pooled = references[name]
        frames = model.encoder.config.frames(len(audio))
        assert styles.dtype == np.int64 and len(styles) == math.ceil(frames / 50) == len(expected), name
        rel = np.linalg.norm(pooled - expected_pooled) / np.linalg.norm(expected_pooled)
        assert rel <= 1e-4, (name, rel)
        agree += int((styles == expected).sum())
        windows += len(expected)
    print(f"style agreement ONNX vs transformers: {agree}/{windows} windows")
    assert agree / windows >= 0.99


def test_styles_vary_on_clip(engine, clip):
    styles = engine(clip)
    assert len(styles) == 10  # 9.1 s -> 455 frames -> 10 windows, the last one partial
    assert len(set(styles.tolist())) >= 3 and styles.min() >= 0 and styles.max() < 100


def test_engine_chunks_like_the_reference(model, engine, clip, monkeypatch):
    monkeypatch.setattr(audio_io, "MAX_CHUNK_SAMPLES", 4 * SR)
    expected = np.concatenate(
        [model(torch.from_numpy(clip[i : i + 4 * SR])).numpy() for i in range(0, len(clip), 4 * SR)]
    )
    np.testing.assert_array_equal(engine(clip), expected)  # 4 s + 4 s + 1.1 s: 4 + 4 + 2 windows


def test_full_size_parameter_count():
    """Spec section 8: style wav2vec2 = 95M parameters."""
    config, proj, labels = S.encoder_config_from_hf(RS._wav2vec2_config("full"), Path("full"))
    with torch.device("meta"):
        full = S.StyleModel(config, proj, labels)
    n = sum(p.numel() for p in full.parameters())
    assert 94e6 < n < 96e6, n


def test_reexport_is_byte_identical(tiny, bundle_dir, tmp_path):
    S.export_onnx(tiny, "expressive", tmp_path)
    assert (tmp_path / "style.onnx").read_bytes() == (bundle_dir / "style.onnx").read_bytes()
    entry = Bundle(bundle_dir).component("style")
    assert entry["rate_hz"] == 1 and entry["window_frames"] == 50 and entry["hop_samples"] == 320


# ----------------------------------------------------------------------------- loader


def _copy(src: CheckpointPaths, root: Path) -> CheckpointPaths:
    dst = CheckpointPaths(root)
    dst.style_encoder_dir.mkdir(parents=True)
    for name in ("config.json", "pytorch_model.bin"):
        (dst.style_encoder_dir / name).write_bytes((src.style_encoder_dir / name).read_bytes())
    return dst


def _edit_weights(paths: CheckpointPaths, edit) -> None:
    path = paths.style_encoder_dir / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def test_loader_missing_files(tiny, tmp_path):
    paths = _copy(tiny, tmp_path)
    (paths.style_encoder_dir / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        S.load_style_encoder(paths)
    (paths.style_encoder_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        S.load_style_encoder(paths)


def test_loader_missing_key(tiny, tmp_path):
    paths = _copy(tiny, tmp_path)
    _edit_weights(paths, lambda s: s.pop("wav2vec2.encoder.layers.1.feed_forward.output_dense.weight"))
    with pytest.raises(
        CheckpointError, match=r"pytorch_model\.bin.*wav2vec2\.encoder\.layers\.1\.feed_forward\.output_dense\.weight"
    ):
        S.load_style_encoder(paths)


def test_loader_wrong_shape(tiny, tmp_path):
    paths = _copy(tiny, tmp_path)
    _edit_weights(paths, lambda s: s.__setitem__("projector.weight", torch.zeros(7, 64)))
    with pytest.raises(CheckpointError, match=r"projector\.weight: expected \(32, 64\), found \(7, 64\)"):
        S.load_style_encoder(paths)


def test_loader_wrong_label_count(tiny, tmp_path):
    paths = _copy(tiny, tmp_path)
    cfg_path = paths.style_encoder_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["id2label"] = {str(i): str(i) for i in range(7)}
    cfg.pop("label2id")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="7 labels"):
        S.load_style_encoder(paths)


def test_loader_accepts_parametrized_weight_norm_names(tiny, model, tmp_path, clip):
    """Newer transformers save the positional conv's weight norm as parametrizations."""
    paths = _copy(tiny, tmp_path)

    def rename(state):
        for old, new in (
            ("weight_g", "parametrizations.weight.original0"),
            ("weight_v", "parametrizations.weight.original1"),
        ):
            key = f"wav2vec2.encoder.pos_conv_embed.conv.{old}"
            state[key.replace(old, new)] = state.pop(key)
        state["wav2vec2.masked_spec_embed"] = torch.zeros(64)

    _edit_weights(paths, rename)
    audio = torch.from_numpy(clip[: 3 * SR])
    np.testing.assert_array_equal(S.load_style_encoder(paths)(audio).numpy(), model(audio).numpy())
