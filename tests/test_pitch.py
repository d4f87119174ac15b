"""Pitch tokenizer: FCPE + pitch VQ-VAE, ONNX engine vs torchfcpe and vs our PyTorch modules."""

from __future__ import annotations

import functools
import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch
import yaml

from spiritlm_edge.export import pitch
from spiritlm_edge.export.checkpoints import CheckpointPaths
from spiritlm_edge.export.fcpe import FCPE_WEIGHTS_ENV, INSTALL_HINT, find_fcpe_weights, load_fcpe
from spiritlm_edge.export.random_speech import PITCH_FULL_CONFIG, write_pitch
from spiritlm_edge.runtime import audio as audio_mod
from spiritlm_edge.runtime import pitch as runtime_pitch
from spiritlm_edge.runtime.audio import SAMPLE_RATE, load_audio
from spiritlm_edge.runtime.errors import BundleError, CheckpointError
from spiritlm_edge.runtime.pitch import PitchEngine, nearest_indices

SR = SAMPLE_RATE


def _fcpe_available() -> str | None:
    try:
        find_fcpe_weights()
    except CheckpointError:
        return f"FCPE weights not installed ({INSTALL_HINT})"
    return None


needs_fcpe = pytest.mark.skipif(_fcpe_available() is not None, reason=_fcpe_available() or "")


# -- signals ------------------------------------------------------------------------------


def sine_sweep(seconds=2.5, f_start=90.0, f_end=600.0) -> np.ndarray:
    """Exponential sweep with a second harmonic: F0 covers a speaking voice's range."""
    t = np.arange(int(seconds * SR)) / SR
    rate = np.log(f_end / f_start) / seconds
    phase = 2 * np.pi * f_start * (np.exp(rate * t) - 1) / rate
    return (0.4 * np.sin(phase) + 0.1 * np.sin(2 * phase)).astype(np.float32)


def silence_then_tone(f0=220.0) -> np.ndarray:
    t = np.arange(SR) / SR
    tone = sum(a * np.sin(2 * np.pi * f0 * h * t) for h, a in ((1, 0.3), (2, 0.15), (3, 0.05)))
    noise = 0.003 * np.random.default_rng(1).standard_normal(int(2.5 * SR))
    return (np.concatenate([np.zeros(SR), tone, np.zeros(SR // 2)]) + noise).astype(np.float32)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory) -> CheckpointPaths:
    if _fcpe_available():
        pytest.skip(_fcpe_available())
    paths = CheckpointPaths(tmp_path_factory.mktemp("pitch-ckpt"))
    write_pitch(paths, "expressive", seed=0)
    return paths


@pytest.fixture(scope="module")
def bundle_dir(tiny_paths, tmp_path_factory):
    out = tmp_path_factory.mktemp("pitch-bundle")
    pitch.export_onnx(tiny_paths, "expressive", out)
    return out


@pytest.fixture(scope="module")
def engine(bundle_dir) -> PitchEngine:
    return PitchEngine.from_bundle(bundle_dir, n_threads=2)


@pytest.fixture(scope="module")
def torch_tokenizer(tiny_paths) -> pitch.PitchTokenizer:
    return pitch.load_pitch_tokenizer(tiny_paths)


@pytest.fixture(scope="module")
def torchfcpe_model():
    """torchfcpe's own inference model: the independent F0 oracle. Its import wants
    torchaudio (for resampling, which 16 kHz input never uses): a stand-in module is
    visible only while it imports."""
    for dep in ("einops", "local_attention"):
        pytest.importorskip(dep, reason=f"the torchfcpe oracle needs {dep} (pip install {dep.replace('_', '-')})")
    if _fcpe_available():
        pytest.skip(_fcpe_available())
    added = {}
    if "torchaudio" not in sys.modules:
        fake, transforms = types.ModuleType("torchaudio"), types.ModuleType("torchaudio.transforms")

        class Resample:  # noqa: D401 - stand-in
            def __init__(self, *args, **kwargs):
                raise RuntimeError("torchaudio stand-in: resampling is not available in this test")

        transforms.Resample = Resample
        fake.transforms = transforms
        added = {"torchaudio": fake, "torchaudio.transforms": transforms}
        sys.modules.update(added)
    try:
        import torchfcpe
    except ImportError as exc:
        pytest.skip(f"torchfcpe cannot be imported ({exc}); {INSTALL_HINT}")
    finally:
        for name in added:
            sys.modules.pop(name, None)
    return torchfcpe.spawn_bundled_infer_model(device="cpu")


def reference_f0(model, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F0 and voiced mask exactly as Spirit LM's FCPEF0Extractor asks torchfcpe for them."""
    with torch.no_grad():
        f0, uv = model.infer(
            torch.from_numpy(samples)[None, :, None],
            sr=SR,
            decoder_mode="local_argmax",
            threshold=0.05,
            f0_min=50,
            f0_max=1100,
            interp_uv=True,
            output_interp_target_length=len(samples) // 80 + 1,
            retur_uv=True,
        )
    return f0[0, :, 0].numpy(), uv[0, :, 0].numpy() < 0.5


# -- F0 vs torchfcpe ----------------------------------------------------------------------


@pytest.mark.parametrize("signal", ["librispeech", "sweep", "silence_tone"])
def test_f0_matches_torchfcpe(signal, engine, torchfcpe_model, librispeech_clip):
    samples = {
        "librispeech": lambda: load_audio(librispeech_clip),
        "sweep": sine_sweep,
        "silence_tone": silence_then_tone,
    }[signal]()
    f0, voiced = engine.f0(samples)
    ref_f0, ref_voiced = reference_f0(torchfcpe_model, samples)
    assert f0.shape == ref_f0.shape == (len(samples) // 80 + 1,)
    agreement = float((voiced == ref_voiced).mean())
    both = voiced & ref_voiced
    assert both.sum() > 0.2 * len(f0), "too few voiced frames to compare"
    cents = np.abs(1200 * np.log2(f0[both] / ref_f0[both]))
    print(f"{signal}: voicing agreement {agreement:.4f}, median |cent| {np.median(cents):.5f}, max {cents.max():.4f}")
    assert agreement >= 0.98
    assert np.median(cents) < 1.0
    # Interpolated F0 of unvoiced frames is what the VQ-VAE sees: it must match as well.
    assert np.median(np.abs(1200 * np.log2(f0 / ref_f0))) < 1.0


def test_f0_is_physically_right(engine):
    """Independent of any model output: a 220 Hz tone reads as 220 Hz, silence as unvoiced."""
    f0, voiced = engine.f0(silence_then_tone(220.0))
    tone = slice(SR // 80 + 10, 2 * SR // 80 - 10)
    assert voiced[tone].mean() > 0.95
    assert abs(1200 * np.log2(np.median(f0[tone]) / 220.0)) < 20
    assert not voiced[10 : SR // 80 - 10].any()


def test_pure_silence_gives_no_pitch(engine):
    """The reference's interpolation fails without voiced frames; we return F0 0, unvoiced."""
    silence = np.zeros(SR, dtype=np.float32)
    f0, voiced = engine.f0(silence)
    assert not voiced.any() and not f0.any()
    codes = engine(silence)
    assert codes.shape == ((SR // 80 + 1) // 16,)
    assert ((0 <= codes) & (codes < 64)).all()


# -- codes: ONNX engine vs our PyTorch modules --------------------------------------------


@pytest.mark.parametrize("signal", ["librispeech", "sweep", "silence_tone"])
def test_codes_match_pytorch(signal, engine, torch_tokenizer, librispeech_clip):
    samples = {
        "librispeech": lambda: load_audio(librispeech_clip),
        "sweep": sine_sweep,
        "silence_tone": silence_then_tone,
    }[signal]()
    codes = engine(samples)
    expected = torch_tokenizer(samples)
    assert codes.dtype == np.int64
    assert codes.shape == expected.shape == ((len(samples) // 80 + 1) // 16,)
    agreement = float((codes == expected).mean())
    print(f"{signal}: {len(codes)} codes, {agreement:.4f} identical, {len(set(codes.tolist()))} distinct")
    assert agreement >= 0.99
    if signal == "librispeech":
        assert len(codes) == 114  # 146160 samples -> 1828 F0 frames -> 114 codes, as the reference
        assert len(set(codes.tolist())) > 16, "the tiny codebook should spread real speech over many codes"


def test_features_match_pytorch(engine, torch_tokenizer, librispeech_clip):
    """The VQ-VAE input (mean-normalised F0, vuv) of the NumPy glue vs the PyTorch path."""
    samples = load_audio(librispeech_clip)
    ours = engine.features(samples)
    expected = torch_tokenizer.features(samples).numpy()
    assert ours.shape == expected.shape == (1, 2, len(samples) // 80 + 1)
    assert engine.normalize and abs(float(ours[0, 0][ours[0, 1] > 0].mean())) < 1e-2  # voiced mean removed
    np.testing.assert_array_equal(ours[0, 1], expected[0, 1])
    np.testing.assert_allclose(ours[0, 0], expected[0, 0], atol=0.05)


def test_long_audio_is_chunked_like_the_reference(engine, librispeech_clip, monkeypatch):
    """Codes of chunked audio = codes of each chunk, a short tail (< 1280 samples) skipped.
    The 100 s chunk length is lowered to 3 s to keep the test fast."""
    samples = load_audio(librispeech_clip)[: 6 * SR + 1000]
    whole = [engine(samples[: 3 * SR]), engine(samples[3 * SR : 6 * SR])]
    monkeypatch.setattr(runtime_pitch, "chunks", functools.partial(audio_mod.chunks, max_samples=3 * SR))
    np.testing.assert_array_equal(engine(samples), np.concatenate(whole))
    f0, _ = engine.f0(samples)
    assert f0.shape == (2 * (3 * SR // 80 + 1),)


@pytest.mark.parametrize("n_samples", [1280, 1300, 1359, 1360, 16000, 16079, 16080, 146160, 99999])
def test_nearest_resize_matches_torch(n_samples):
    n_in, n_out = n_samples // 160 + 1, n_samples // 80 + 1
    expected = (
        torch.nn.functional.interpolate(
            torch.arange(n_in, dtype=torch.float32)[None, None], size=n_out, mode="nearest"
        )[0, 0]
        .long()
        .numpy()
    )
    np.testing.assert_array_equal(nearest_indices(n_in, n_out), expected)


# -- export -------------------------------------------------------------------------------


def test_bundle_entries_and_deterministic_export(tiny_paths, bundle_dir, tmp_path):
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    fcpe, entry = manifest["components"]["fcpe"], manifest["components"]["pitch"]
    assert manifest["variant"] == "expressive"
    fcpe_settings = (fcpe["model_hop"], fcpe["frame_hop"], fcpe["threshold"], fcpe["f0_min"], fcpe["f0_max"])
    assert fcpe_settings == (160, 80, 0.05, 50.0, 1100.0)
    settings = (entry["codebook_size"], entry["frames_per_code"], entry["rate"], entry["normalize_f0"])
    assert settings == (64, 16, 12.5, True)
    pitch.export_onnx(tiny_paths, "expressive", tmp_path)
    for name in ("fcpe.onnx", "pitch_vqvae.onnx"):
        assert (tmp_path / name).read_bytes() == (bundle_dir / name).read_bytes(), name


def test_export_refuses_base(tiny_paths, tmp_path):
    with pytest.raises(CheckpointError, match="Expressive"):
        pitch.export_onnx(tiny_paths, "base", tmp_path)


def test_engine_rejects_incomplete_bundle(bundle_dir, tmp_path):
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    del manifest["components"]["fcpe"]["threshold"]
    (tmp_path / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="threshold"):
        PitchEngine.from_bundle(tmp_path)


def test_full_size_vqvae_has_release_size():
    model = pitch.PitchVQVAE(PITCH_FULL_CONFIG)
    n_params = sum(t.numel() for t in model.state_dict().values())
    assert 150_000 < n_params < 260_000  # spec: pitch VQ-VAE 0.2M
    assert pitch.frames_per_code(PITCH_FULL_CONFIG["encoder_params"]) == 16
    codes = model.eval()(torch.randn(1, 2, 1828))
    assert codes.shape == (1, 114)


# -- loaders ------------------------------------------------------------------------------


@pytest.fixture
def vqvae_copy(tiny_paths, tmp_path) -> CheckpointPaths:
    paths = CheckpointPaths(tmp_path / "ckpt")
    shutil.copytree(tiny_paths.vqvae_dir, paths.vqvae_dir)
    return paths


def test_vqvae_loads_strictly(tiny_paths):
    model, config = pitch.load_vqvae(tiny_paths)
    assert config["features"] == "norm_f0_interp,vuv"
    state = torch.load(tiny_paths.vqvae_dir / "model.pt", weights_only=True)["model"]
    assert "vq.level_blocks.0.k" in state and state["vq.level_blocks.0.k"].shape == (64, 16)
    assert any(k.startswith("decoder.") for k in state)
    assert any(k.startswith("encoder.level_blocks.0.model.") for k in state)


def test_vqvae_missing_files(vqvae_copy):
    (vqvae_copy.vqvae_dir / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="config.yaml"):
        pitch.load_vqvae(vqvae_copy)


def test_vqvae_missing_model_file(vqvae_copy):
    (vqvae_copy.vqvae_dir / "model.pt").unlink()
    with pytest.raises(CheckpointError, match="model.pt"):
        pitch.load_vqvae(vqvae_copy)


def test_vqvae_without_model_key(vqvae_copy):
    path = vqvae_copy.vqvae_dir / "model.pt"
    state = torch.load(path, weights_only=True)["model"]
    torch.save({"generator": state}, path)
    with pytest.raises(CheckpointError, match="'model'"):
        pitch.load_vqvae(vqvae_copy)


def test_vqvae_missing_and_misshaped_keys(vqvae_copy):
    path = vqvae_copy.vqvae_dir / "model.pt"
    state = torch.load(path, weights_only=True)["model"]
    missing = dict(state)
    del missing["encoder.level_blocks.0.model.4.weight"]
    torch.save({"model": missing}, path)
    with pytest.raises(CheckpointError, match=r"model\.pt.*encoder\.level_blocks\.0\.model\.4\.weight"):
        pitch.load_vqvae(vqvae_copy)
    wrong = dict(state)
    wrong["vq.level_blocks.0.k"] = torch.zeros(64, 8)
    torch.save({"model": wrong}, path)
    with pytest.raises(CheckpointError, match=r"vq\.level_blocks\.0\.k: expected \(64, 16\), found \(64, 8\)"):
        pitch.load_vqvae(vqvae_copy)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(features="mfcc"), "features"),
        (lambda c: c["vq_params"].update(l_bins=32), "l_bins"),
        (lambda c: c["encoder_params"].pop("downs_t"), "downs_t"),
        (lambda c: c["encoder_params"].update(kernel=3), "unknown keys kernel"),
        (lambda c: c["vq_params"].update(emb_width="${oc.env:EMB}"), "resolver"),
    ],
)
def test_vqvae_bad_config(vqvae_copy, edit, message):
    path = vqvae_copy.vqvae_dir / "config.yaml"
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match=message):
        pitch.load_vqvae(vqvae_copy)


def test_vqvae_config_interpolations(vqvae_copy):
    """OmegaConf ``${...}`` references in config.yaml are resolved."""
    path = vqvae_copy.vqvae_dir / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["vq_params"]["emb_width"] = "${encoder_params.output_emb_width}"
    config["decoder_params"] = "${encoder_params}"
    path.write_text(yaml.safe_dump(config))
    _, loaded = pitch.load_vqvae(vqvae_copy)
    assert loaded["vq_params"]["emb_width"] == 16 and loaded["decoder_params"] == loaded["encoder_params"]


def test_fcpe_weights_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="torchfcpe==0.0.4"):
        find_fcpe_weights(tmp_path / "nope.pt")
    monkeypatch.setenv(FCPE_WEIGHTS_ENV, str(tmp_path / "from-env.pt"))
    with pytest.raises(CheckpointError, match="from-env.pt"):
        find_fcpe_weights()


@needs_fcpe
def test_fcpe_checkpoint_errors(tmp_path):
    real = torch.load(find_fcpe_weights(), map_location="cpu", weights_only=True)
    broken = tmp_path / "fcpe.pt"
    state = dict(real["model"])
    del state["net.encoder_layers.3.conformer.net.2.weight"]
    torch.save({"config_dict": real["config_dict"], "model": state}, broken)
    with pytest.raises(CheckpointError, match=r"fcpe\.pt.*net\.encoder_layers\.3\.conformer\.net\.2\.weight"):
        load_fcpe(broken)
    torch.save({"model": real["model"]}, broken)
    with pytest.raises(CheckpointError, match="config_dict"):
        load_fcpe(broken)
    config = json.loads(json.dumps(real["config_dict"]))
    config["model"]["conv_only"] = False
    torch.save({"config_dict": config, "model": real["model"]}, broken)
    with pytest.raises(CheckpointError, match="conv-only"):
        load_fcpe(broken)


# -- neutral pitch code (spec section 5) ----------------------------------------------------


def _torch_neutral_code(model: pitch.PitchVQVAE, frames_per_code: int, f0_hz: float, codes: int = 256) -> set[int]:
    """The codes PyTorch's VQ-VAE gives the interior of a flat voiced contour, built here
    from the spec's words (f0 track at f0_hz, vuv all ones), independently of runtime/pitch.py."""
    frames = codes * frames_per_code
    features = torch.stack([torch.full((frames,), f0_hz), torch.ones(frames)])[None]
    with torch.no_grad():
        out = model(features)[0].numpy()
    return set(out[codes // 4 : 3 * codes // 4].tolist())


def test_neutral_pitch_code_recorded_and_matches_pytorch(bundle_dir, torch_tokenizer, engine):
    entry = json.loads((bundle_dir / "bundle.json").read_text())["components"]["pitch"]
    assert entry["normalize_f0"] and entry["neutral_f0_hz"] == 0.0  # normalised: the mean is 0
    interior = _torch_neutral_code(torch_tokenizer.vqvae, entry["frames_per_code"], 0.0)
    assert interior == {entry["neutral_code"]}  # a flat contour has one steady code
    assert engine.neutral_code == entry["neutral_code"]


def test_neutral_pitch_code_computed_for_older_bundles(bundle_dir, engine, tmp_path, caplog):
    for name in ("fcpe.onnx", "pitch_vqvae.onnx"):
        shutil.copy(bundle_dir / name, tmp_path / name)
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    del manifest["components"]["pitch"]["neutral_code"], manifest["components"]["pitch"]["neutral_f0_hz"]
    (tmp_path / "bundle.json").write_text(json.dumps(manifest))
    with caplog.at_level("INFO"):
        older = PitchEngine.from_bundle(tmp_path, n_threads=2)
    assert older.neutral_code == engine.neutral_code
    assert "no neutral pitch code" in caplog.text
    manifest["components"]["pitch"]["neutral_code"] = 64
    (tmp_path / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="re-export"):
        PitchEngine.from_bundle(tmp_path)


def test_neutral_pitch_code_without_normalisation(bundle_dir, torch_tokenizer, tmp_path):
    """Feature sets without speaker normalisation: the contour sits at the mean voiced F0 of
    the bundled clip, measured with the same F0 model."""
    f0, vuv = torch_tokenizer.f0_vuv(load_audio(audio_mod.BUNDLED_CLIP))
    mean = float(f0[vuv != 0].double().mean())
    plain = pitch.PitchTokenizer(torch_tokenizer.fcpe, torch_tokenizer.vqvae, {"features": "f0_interp,vuv"})
    code, f0_hz = pitch.neutral_pitch(plain, 16)
    assert f0_hz == pytest.approx(mean, rel=1e-6) and 80 < f0_hz < 400
    assert _torch_neutral_code(torch_tokenizer.vqvae, 16, f0_hz) == {code}
    # the runtime's own computation (ONNX FCPE + VQ-VAE) for such a bundle agrees
    for name in ("fcpe.onnx", "pitch_vqvae.onnx"):
        shutil.copy(bundle_dir / name, tmp_path / name)
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    del manifest["components"]["pitch"]["neutral_code"]
    manifest["components"]["pitch"]["normalize_f0"] = False
    (tmp_path / "bundle.json").write_text(json.dumps(manifest))
    assert PitchEngine.from_bundle(tmp_path, n_threads=2).neutral_code == code
