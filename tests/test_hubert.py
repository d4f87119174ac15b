"""HuBERT 25 Hz + linear quantizer: loaders, PyTorch module, ONNX export and the ORT engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from spiritlm_edge.export import hubert as H  # noqa: E402
from spiritlm_edge.export import random_speech as RS  # noqa: E402
from spiritlm_edge.export.checkpoints import CheckpointPaths  # noqa: E402
from spiritlm_edge.runtime import audio as audio_io  # noqa: E402
from spiritlm_edge.runtime.bundle import Bundle  # noqa: E402
from spiritlm_edge.runtime.errors import AudioError, CheckpointError  # noqa: E402
from spiritlm_edge.runtime.hubert import HubertEngine  # noqa: E402

SR = 16000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubert-ckpt")
    paths = CheckpointPaths(root)
    RS.write_hubert(paths, variant="base", seed=3)
    return paths


@pytest.fixture(scope="module")
def models(tiny):
    return H.load_hubert(tiny), H.load_quantizer(tiny)


@pytest.fixture(scope="module")
def bundle_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("hubert-bundle")
    H.export_onnx(tiny, "base", out)
    return out


@pytest.fixture(scope="module")
def engine(bundle_dir):
    return HubertEngine.from_bundle(Bundle(bundle_dir), n_threads=2)


@pytest.fixture(scope="module")
def clip(librispeech_clip):
    return audio_io.load_audio(librispeech_clip)


def signals(clip: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    t = np.arange(3 * SR) / SR
    return {
        "librispeech": clip,
        "noise": (0.1 * rng.standard_normal(2 * SR)).astype(np.float32),
        "chirp": (0.5 * np.sin(2 * np.pi * (100 + 1300 * t) * t)).astype(np.float32),
        "min_1280": clip[SR : SR + 1280].copy(),
        "odd_length": clip[: SR + 12345].copy(),  # not a multiple of the 640 hop
    }


def reference_fill_loop(codes: np.ndarray, blank: int) -> np.ndarray:
    """The reference's post-processing, literally: roll and copy until no blank is left."""
    codes = codes.copy()
    for _ in range(10000):
        mask = codes == blank
        if not mask.any():
            break
        codes[mask] = np.roll(codes, 1)[mask]
    return codes


# ----------------------------------------------------------------------------- module semantics


def test_encoder_matches_transformers_hubert(models, clip):
    """Our fairseq-layout module against an independent implementation (HF HubertModel)."""
    transformers = pytest.importorskip("transformers")
    from spiritlm_edge.export.style import hf_name

    hubert, _ = models
    c = hubert.encoder.config
    hf_config = transformers.HubertConfig(
        hidden_size=c.embed_dim,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        intermediate_size=c.ffn_dim,
        conv_dim=[d for d, _, _ in c.conv_layers],
        conv_kernel=[k for _, k, _ in c.conv_layers],
        conv_stride=[s for _, _, s in c.conv_layers],
        num_feat_extract_layers=len(c.conv_layers),
        num_conv_pos_embeddings=c.conv_pos,
        num_conv_pos_embedding_groups=c.conv_pos_groups,
        feat_extract_norm="group",
        conv_bias=False,
        do_stable_layer_norm=False,
        feat_proj_layer_norm=True,
    )
    hf = transformers.HubertModel(hf_config).eval()
    state = {hf_name(k, ""): v for k, v in hubert.encoder.state_dict().items()}
    hf_keys = set(hf.state_dict())
    state = {
        (
            k
            if k in hf_keys
            else k.replace("weight_g", "parametrizations.weight.original0").replace(
                "weight_v", "parametrizations.weight.original1"
            )
        ): v
        for k, v in state.items()
    }
    result = hf.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"masked_spec_embed"}
    audio = clip[: 4 * SR + 777]
    with torch.no_grad():
        expected = hf(torch.from_numpy(audio)[None], output_hidden_states=True).hidden_states[11][0]
    ours = H.reference_features(hubert, audio)
    assert ours.shape == expected.shape == (c.frames(len(audio)), c.embed_dim)
    assert float((ours - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.parametrize(
    "codes",
    [
        [3, 500, 500, 7, 500, 9],
        [500, 500, 4, 5, 500],  # leading blanks take the last non-blank (wrap-around)
        [500, 500, 500],  # all blank: stays blank
        [1, 2, 3],
        [500],
    ],
)
def test_fill_blanks_matches_reference_loop(codes):
    codes = np.array(codes, dtype=np.int64)
    got = H.fill_blanks(torch.from_numpy(codes), 500).numpy()
    np.testing.assert_array_equal(got, reference_fill_loop(codes, 500))


def test_fill_blanks_random_sequences():
    rng = np.random.default_rng(0)
    for _ in range(50):
        codes = rng.choice([500, 1, 2, 3, 4], size=rng.integers(1, 40), p=[0.5, 0.125, 0.125, 0.125, 0.125])
        got = H.fill_blanks(torch.from_numpy(codes), 500).numpy()
        np.testing.assert_array_equal(got, reference_fill_loop(codes, 500))


def test_frame_count_and_config(models):
    config = models[0].encoder.config
    assert config.hop_samples == 640 and config.layers == 12
    assert config.frames(1280) == 1 and config.min_samples == 720  # 400 at 50 Hz; one more stride-2 conv
    assert config.frames(720) == 1 and config.frames(719) == 0 and config.frames(1280 + 640) == 2
    full = H.parse_conv_layers(H.FULL_SIZE_CONV_LAYERS)
    assert int(np.prod([s for _, _, s in full])) == 640 and len(full) == 8
    assert RS._conv_spec(full) == "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 3"


def test_conv_spec_is_not_evaluated():
    with pytest.raises(CheckpointError, match="conv_feature_layers"):
        H.parse_conv_layers("__import__('os').system('true')")
    with pytest.raises(CheckpointError):
        H.parse_conv_layers("[(512, 10)]")


def test_full_size_parameter_counts():
    """Spec section 8: HuBERT + quantizer = 96M parameters."""
    config = H.EncoderConfig(tuple(H.parse_conv_layers(H.FULL_SIZE_CONV_LAYERS)))
    with torch.device("meta"):
        encoder = H.SpeechEncoder(config)
        quantizer = H.LinearQuantizer(500, 768, 768)
    n = sum(p.numel() for p in encoder.parameters()) + sum(p.numel() for p in quantizer.parameters())
    assert 95.5e6 < n < 96.5e6, n


# ----------------------------------------------------------------------------- loaders


def _rewrite(src: CheckpointPaths, dst_root: Path, which: str, edit) -> CheckpointPaths:
    dst = CheckpointPaths(dst_root)
    dst.hubert.parent.mkdir(parents=True)
    for name in ("hubert", "hubert_quantizer"):
        data = torch.load(getattr(src, name), weights_only=True)
        if name == which:
            edit(data)
        torch.save(data, getattr(dst, name))
    return dst


def test_loader_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="mhubert_base_25hz.pt"):
        H.load_hubert(CheckpointPaths(tmp_path))
    with pytest.raises(CheckpointError, match="L11_quantizer_500.pt"):
        H.load_quantizer(CheckpointPaths(tmp_path))


def test_loader_missing_top_level_key(tiny, tmp_path):
    paths = _rewrite(tiny, tmp_path, "hubert", lambda d: d.pop("task_cfg"))
    with pytest.raises(CheckpointError, match=r"mhubert_base_25hz\.pt.*'task_cfg'"):
        H.load_hubert(paths)


def test_loader_missing_weight(tiny, tmp_path):
    paths = _rewrite(tiny, tmp_path, "hubert", lambda d: d["model_weight"].pop("encoder.layers.10.fc1.weight"))
    with pytest.raises(CheckpointError, match=r"mhubert_base_25hz\.pt.*encoder\.layers\.10\.fc1\.weight"):
        H.load_hubert(paths)


def test_loader_wrong_shape(tiny, tmp_path):
    def edit(d):
        d["model_weight"]["post_extract_proj.weight"] = torch.zeros(3, 3)

    paths = _rewrite(tiny, tmp_path, "hubert", edit)
    with pytest.raises(CheckpointError, match=r"post_extract_proj\.weight: expected \(64, 32\), found \(3, 3\)"):
        H.load_hubert(paths)


def test_loader_unknown_weight_is_rejected(tiny, tmp_path):
    paths = _rewrite(tiny, tmp_path, "hubert", lambda d: d["model_weight"].__setitem__("encoder.extra", torch.zeros(1)))
    with pytest.raises(CheckpointError, match="unexpected keys: encoder.extra"):
        H.load_hubert(paths)


def test_loader_rejects_unsupported_config(tiny, tmp_path):
    paths = _rewrite(tiny, tmp_path, "hubert", lambda d: d["model_cfg"].__setitem__("layer_norm_first", True))
    with pytest.raises(CheckpointError, match="layer_norm_first"):
        H.load_hubert(paths)


def test_quantizer_loader_errors(tiny, tmp_path):
    paths = _rewrite(tiny, tmp_path / "a", "hubert_quantizer", lambda d: d["model_weight"].pop("4.bias"))
    with pytest.raises(CheckpointError, match=r"L11_quantizer_500\.pt.*4\.bias"):
        H.load_quantizer(paths)
    paths = _rewrite(tiny, tmp_path / "b", "hubert_quantizer", lambda d: d["model_cfg"].pop("upstream_dim"))
    with pytest.raises(CheckpointError, match="upstream_dim"):
        H.load_quantizer(paths)

    def wrong_shape(d):
        d["model_weight"]["2.weight"] = torch.zeros(5, 5)

    paths = _rewrite(tiny, tmp_path / "c", "hubert_quantizer", wrong_shape)
    with pytest.raises(CheckpointError, match=r"2\.weight: expected \(32, 48\), found \(5, 5\)"):
        H.load_quantizer(paths)


# ----------------------------------------------------------------------------- ONNX parity


def test_onnx_matches_pytorch(models, engine, clip):
    hubert, quantizer = models
    rates = {}
    for name, audio in signals(clip).items():
        units, features = engine.session.run(["units", "features"], {"audio": audio[None]})
        expected = H.reference_features(hubert, audio).numpy()
        assert features.shape == expected.shape == (hubert.encoder.config.frames(len(audio)), 64), name
        rel = np.linalg.norm(features - expected) / np.linalg.norm(expected)
        assert rel <= 1e-4, (name, rel)
        expected_units = H.reference_units(hubert, quantizer, audio)
        assert units.dtype == np.int64 and units.shape == expected_units.shape
        rates[name] = float((units == expected_units).mean())
    print("unit agreement ONNX vs PyTorch:", rates)
    total = sum(rates[n] * len(H.reference_units(hubert, quantizer, a)) for n, a in signals(clip).items())
    frames = sum(len(H.reference_units(hubert, quantizer, a)) for a in signals(clip).values())
    assert total / frames >= 0.99 and rates["librispeech"] >= 0.99


def test_clip_units_are_varied_and_blanks_filled(models, engine, clip):
    hubert, quantizer = models
    with torch.no_grad():
        raw = quantizer(H.reference_features(hubert, clip)).argmax(-1).numpy()
    units = engine(clip)
    assert len(units) == len(raw) == hubert.encoder.config.frames(len(clip))
    assert len(set(units.tolist())) >= 20
    assert (raw == 500).any(), "the tiny quantizer should emit some CTC blanks so that filling is exercised"
    assert not (units == 500).any() and units.min() >= 0
    np.testing.assert_array_equal(units, reference_fill_loop(raw, 500))


def test_layer_norm_front_end_and_normalize(tmp_path, clip):
    """The other fairseq variants (extractor_mode "layer_norm", conv bias, task normalize) export right."""
    config = H.EncoderConfig(
        tuple(H.parse_conv_layers(H.TINY_CONV_LAYERS)),
        extractor_mode="layer_norm",
        conv_bias=True,
        embed_dim=32,
        ffn_dim=64,
        heads=2,
        layers=3,
        conv_pos=8,
        conv_pos_groups=2,
    )
    torch.manual_seed(0)
    encoder = H.SpeechEncoder(config).eval()
    checkpoint = H.HubertCheckpoint(encoder, normalize=True, sample_rate=SR)
    graph = H.EncoderGraph(encoder, 3, "layer_norm")
    path = tmp_path / "enc.onnx"
    H.export_graph_onnx(graph, path, torch.zeros(1, SR), ["features"], {"features": {0: "frames"}})
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    audio = 3.0 * clip[: 2 * SR + 99] + 0.2  # normalize matters
    got = session.run(None, {"audio": audio[None]})[0]
    with torch.no_grad():
        expected = encoder(H.normalize_waveform(torch.from_numpy(audio)[None]), 3)[0].numpy()
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 1e-4
    del checkpoint


def _units_of(bundle: Path, samples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(bundle / "hubert.onnx"), options, providers=["CPUExecutionProvider"])
    assert any(n.op_type == "Conv" for n in _graph_nodes(bundle))
    return {name: session.run(["units"], {"audio": audio[None]})[0] for name, audio in samples.items()}


def _graph_nodes(bundle: Path):
    import onnx

    return onnx.load(str(bundle / "hubert.onnx"), load_external_data=False).graph.node


def _conv_ranks(bundle: Path) -> set[int]:
    import onnx

    ranks = set()
    for node in _graph_nodes(bundle):
        if node.op_type == "Conv":
            kernel = next(a for a in node.attribute if a.name == "kernel_shape")
            ranks.add(len(onnx.helper.get_attribute_value(kernel)))
    return ranks


def test_2d_convs_give_todays_units(tiny, bundle_dir, clip, tmp_path):
    """The convs exported as 1 x k Conv2d (the default, for ORT's NCHWc kernels) give exactly
    the units of the 1-D graph exported before, on every test signal."""
    H.export_onnx(tiny, "base", tmp_path, conv_dims=1)
    assert _conv_ranks(tmp_path) == {1} and _conv_ranks(bundle_dir) == {2}
    before, after = _units_of(tmp_path, signals(clip)), _units_of(bundle_dir, signals(clip))
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


@pytest.mark.slow
def test_2d_convs_give_todays_units_at_release_size(tmp_path, clip):
    """The same on the release-size HuBERT (random weights, 95M parameters): ~30 s."""
    paths = CheckpointPaths(tmp_path / "ckpt")
    RS.write_hubert(paths, size="full", seed=5)
    H.export_onnx(paths, "base", tmp_path / "conv1d", conv_dims=1)
    H.export_onnx(paths, "base", tmp_path / "conv2d")
    samples = {k: v for k, v in signals(clip).items() if k in ("librispeech", "noise", "odd_length")}
    before, after = _units_of(tmp_path / "conv1d", samples), _units_of(tmp_path / "conv2d", samples)
    for name in before:
        assert len(after[name]) >= 40  # 2 s of noise: 49 frames
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_reexport_is_byte_identical(tiny, bundle_dir, tmp_path):
    H.export_onnx(tiny, "base", tmp_path)
    assert (tmp_path / "hubert.onnx").read_bytes() == (bundle_dir / "hubert.onnx").read_bytes()


def test_bundle_entry(bundle_dir):
    entry = Bundle(bundle_dir).component("hubert")
    assert entry["file"] == "hubert.onnx" and entry["opset"] == 17
    assert entry["hop_samples"] == 640 and entry["rate_hz"] == 25 and entry["min_samples"] == 1280


# ----------------------------------------------------------------------------- engine


def test_engine_chunks_like_the_reference(models, engine, clip, monkeypatch):
    hubert, quantizer = models
    monkeypatch.setattr(audio_io, "MAX_CHUNK_SAMPLES", 3 * SR)
    audio = np.concatenate([clip, clip[:SR]])  # 10.1 s -> 3 s + 3 s + 3 s + 1.1 s
    expected = np.concatenate(
        [H.reference_units(hubert, quantizer, audio[i : i + 3 * SR]) for i in range(0, len(audio), 3 * SR)]
    )
    np.testing.assert_array_equal(engine(audio), expected)
    short_tail = audio[: 6 * SR + 1000]  # a trailing 1000-sample chunk is skipped
    expected = np.concatenate([H.reference_units(hubert, quantizer, short_tail[i : i + 3 * SR]) for i in (0, 3 * SR)])
    np.testing.assert_array_equal(engine(short_tail), expected)


def test_engine_takes_files_and_rates(engine, librispeech_clip, clip):
    np.testing.assert_array_equal(engine(librispeech_clip), engine(clip))
    assert engine((clip, SR)).shape == engine(clip).shape


def test_engine_rejects_bad_audio(engine):
    with pytest.raises(AudioError, match="1280"):
        engine(np.zeros(1000, dtype=np.float32))
    bad = np.zeros(4000, dtype=np.float32)
    bad[7] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        engine(bad)
