"""Unit HiFi-GAN vocoder: release-format loader, ONNX export, offline and streaming runtime."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from spiritlm_edge.export import random_speech as RS
from spiritlm_edge.export import vocoder as V
from spiritlm_edge.export.checkpoints import CheckpointPaths
from spiritlm_edge.runtime.bundle import Bundle
from spiritlm_edge.runtime.errors import CheckpointError, ModelError, UnitsError
from spiritlm_edge.runtime.units import iter_unit_frames
from spiritlm_edge.runtime.vocoder import Vocoder

VARIANTS = ("base", "expressive")


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=VARIANTS)
def setup(request, tmp_path_factory):
    """(variant, checkpoint paths, PyTorch model loaded from them, runtime vocoder)."""
    variant = request.param
    root = tmp_path_factory.mktemp(f"voc-{variant}")
    paths = CheckpointPaths(root / "ckpt")
    RS.write_vocoder(paths, variant, seed=3)
    model = V.load_vocoder(paths, variant)
    V.export_onnx(paths, variant, root / "bundle")
    return variant, paths, model, Vocoder.from_bundle(root / "bundle", n_threads=1)


def random_units(vocoder: Vocoder, n: int, seed: int):
    rng = np.random.default_rng(seed)
    hubert = rng.integers(0, vocoder.num_units, n)
    pitch = rng.integers(0, vocoder.num_pitch, n) if vocoder.has_pitch else None
    style = rng.integers(0, vocoder.num_style_codes, n) if vocoder.has_style else None
    return hubert, pitch, style


@pytest.mark.parametrize("dur_pred", [True, False])
def test_onnx_matches_pytorch(setup, dur_pred):
    variant, _, model, vocoder = setup
    hubert, pitch, style = random_units(vocoder, 37, seed=int(dur_pred))
    ref = model.synthesize(
        hubert.tolist(),
        None if pitch is None else pitch.tolist(),
        None if style is None else style.tolist(),
        speaker_id=1,
        dur_pred=dur_pred,
    ).numpy()
    out = vocoder.decode(hubert, pitch, style, speaker_id=1, dur_pred=dur_pred)
    assert out.dtype == np.float32
    assert rel_l2(out, ref) <= 1e-3
    if not dur_pred:
        assert len(out) == 37 * 640


def test_duration_rule(setup):
    """decode(dur_pred=True) == generator on units repeated clamp(round(exp(logd) - 1), 1) times."""
    variant, _, model, vocoder = setup
    hubert, pitch, style = random_units(vocoder, 30, seed=5)
    with torch.no_grad():
        logd = model.dur_predictor(model.dict(torch.as_tensor(hubert)).t().unsqueeze(0)).view(-1).numpy()
    expected = np.maximum(1, np.round(np.exp(logd) - 1)).astype(np.int64)
    durations = vocoder.durations(hubert)
    np.testing.assert_array_equal(durations, expected)
    assert len(set(durations.tolist())) > 1, "tiny weights should give varied durations"
    expanded = [None if s is None else np.repeat(s, durations) for s in (hubert, pitch, style)]
    audio = vocoder.decode(hubert, pitch, style)
    assert len(audio) == durations.sum() * 640
    assert rel_l2(audio, vocoder.decode(*expanded, dur_pred=False)) <= 1e-6


def test_resynthesis_rule(setup):
    """Pitch at its own 12.5 Hz rate (count != units): no durations, codes repeated up."""
    variant, _, model, vocoder = setup
    if variant != "expressive":
        pytest.skip("pitch codes are Expressive only")
    rng = np.random.default_rng(9)
    hubert = rng.integers(0, vocoder.num_units, 50)
    pitch = rng.integers(0, 64, 25)  # 2 unit frames per pitch code
    style = rng.integers(0, 100, 2)  # 25 unit frames per style code
    out = vocoder.decode(hubert, pitch, style)  # dur_pred=True is overridden, as in the reference
    assert len(out) == 50 * 640
    ref = model.synthesize(hubert.tolist(), pitch.tolist(), style.tolist(), dur_pred=True).numpy()
    assert rel_l2(out, ref) <= 1e-3
    per_frame = vocoder.decode(hubert, np.repeat(pitch, 2), np.repeat(style, 25), dur_pred=False)
    assert rel_l2(out, per_frame) <= 1e-6
    with pytest.raises(UnitsError, match="pitch codes do not match"):
        vocoder.decode(hubert, pitch[:10], style)


def test_non_silent(setup):
    _, _, _, vocoder = setup
    audio = vocoder.decode(*random_units(vocoder, 25, seed=2))
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
    assert np.sqrt(np.mean(audio**2)) > 0.01


def counting(frames, consumed):
    for frame in frames:
        consumed[0] += 1
        yield frame


@pytest.mark.parametrize("dur_pred", [True, False])
@pytest.mark.parametrize("chunk_frames", [1, 4, 25])
def test_stream_equals_offline(setup, dur_pred, chunk_frames):
    _, _, _, vocoder = setup
    hubert, pitch, style = random_units(vocoder, 45, seed=chunk_frames)
    offline = vocoder.decode(hubert, pitch, style, dur_pred=dur_pred)
    frames = [
        (int(h), None if pitch is None else int(pitch[i]), None if style is None else int(style[i]))
        for i, h in enumerate(hubert)
    ]
    consumed = [0]
    chunks, consumed_at = [], []
    for chunk in vocoder.stream(counting(frames, consumed), dur_pred=dur_pred, chunk_frames=chunk_frames):
        chunks.append(chunk)
        consumed_at.append(consumed[0])
    assert rel_l2(np.concatenate(chunks), offline) <= 1e-5
    assert all(len(c) == chunk_frames * 640 for c in chunks[:-1])
    # First chunk: as soon as its frames plus the generator's look-ahead are timed,
    # and timing a unit needs the duration predictor's right context in units.
    right = vocoder.latency_frames[0]
    if dur_pred:
        cum = np.cumsum(vocoder.durations(hubert))
        d_right = vocoder.duration_context[1]
        ready = [
            n for n in range(1, len(hubert) + 1) if n - d_right > 0 and cum[n - d_right - 1] >= chunk_frames + right
        ]
        expected_first = ready[0] if ready else len(hubert)
    else:
        expected_first = min(chunk_frames + right, len(hubert))
    assert consumed_at[0] == expected_first
    assert consumed_at[-1] == len(hubert)


def test_stream_takes_complete_frames(setup):
    """The vocoder speaks complete frames; the rules that fill codes in (first codes, missing
    pitch or style, spec section 5) live in units.iter_unit_frames alone, whose frames it takes."""
    variant, _, _, vocoder = setup
    hubert, pitch, style = random_units(vocoder, 20, seed=11)
    if variant == "base":
        frames = [int(h) for h in hubert]  # bare ints: hubert-only frames
        expected = vocoder.decode(hubert)
    else:
        tokens = "".join(
            f"[Hu{h}]" if i < 3 else f"[Pi{p}][St{s}][Hu{h}]"
            for i, (h, p, s) in enumerate(zip(hubert, pitch, style, strict=True))
        )
        frames = list(iter_unit_frames([tokens], variant="expressive"))
        assert frames[0] == (hubert[0], pitch[3], style[3])  # the first codes seen stand for earlier frames
        filled_pitch = np.concatenate([[pitch[3]] * 3, pitch[3:]])
        filled_style = np.concatenate([[style[3]] * 3, style[3:]])
        expected = vocoder.decode(hubert, filled_pitch, filled_style)
        with pytest.raises(UnitsError, match="iter_unit_frames"):
            list(vocoder.stream([(int(hubert[0]), None, int(style[0]))]))
    audio = np.concatenate(list(vocoder.stream(frames, chunk_frames=3)))
    assert rel_l2(audio, expected) <= 1e-3


def test_bad_inputs(setup):
    variant, _, _, vocoder = setup
    hubert, pitch, style = random_units(vocoder, 10, seed=0)
    with pytest.raises(ModelError, match=r"speakers 0\.\.3"):
        vocoder.decode(hubert, pitch, style, speaker_id=4)
    with pytest.raises(ModelError, match=r"0\.\.3"):
        next(vocoder.stream([], speaker_id=-1))
    bad = hubert.copy()
    bad[4] = vocoder.num_units
    with pytest.raises(UnitsError, match=rf"valid ids are 0\.\.{vocoder.num_units - 1}"):
        vocoder.decode(bad, pitch, style)
    with pytest.raises(UnitsError, match="outside"):
        list(vocoder.stream([(int(u), 1, 1) for u in bad]))
    with pytest.raises(UnitsError):
        vocoder.decode([], pitch, style)
    if variant == "expressive":
        with pytest.raises(UnitsError, match="needs pitch"):
            vocoder.decode(hubert)
        with pytest.raises(UnitsError, match="pitch id 64"):
            vocoder.decode(hubert, np.full(10, 64), style)
        with pytest.raises(UnitsError, match="no pitch code"):
            list(vocoder.stream([(1, None, None)] * 3))
    else:
        with pytest.raises(ModelError, match=r"styles 0\.\.9"):
            vocoder.decode(hubert, style_id=10)


def test_bundle_manifest_and_determinism(setup, tmp_path):
    variant, paths, _, vocoder = setup
    V.export_onnx(paths, variant, tmp_path / "again")
    first = Bundle(vocoder_bundle_dir(setup))
    again = Bundle(tmp_path / "again")
    for name in ("vocoder", "vocoder_duration", "vocoder_stream"):
        assert first.component(name)["sha256"] == again.component(name)["sha256"]
    entry = again.component("vocoder")
    assert entry["speakers"] == RS.TINY_SPEAKERS and entry["hop_length"] == 640
    assert entry["styles"] == (RS.TINY_STYLES if variant == "base" else [])
    assert entry["default_style"] == (8 if variant == "base" else None)
    assert entry["context_frames"] == {"left": 14, "right": 14}
    assert again.component("vocoder_duration")["context_units"] == {"left": 2, "right": 2}
    assert again.component("vocoder_stream")["delay_samples"] == 8889  # 13.9 frames: latency_frames 14
    assert vocoder.stateful_streaming and vocoder.latency_frames == (14, 2)
    assert vocoder.has_pitch == vocoder.has_style == (variant == "expressive")


def vocoder_bundle_dir(setup):
    _, paths, _, _ = setup
    return paths.root.parent / "bundle"


def test_context_is_exact():
    """Perturbing one input frame changes exactly the output frames the computed context says
    (float64, so that no contribution vanishes in rounding)."""
    config = V.model_config("base", "tiny")
    left, right = V.generator_context(config)
    model = RS.random_vocoder(config, seed=1).double()
    units = torch.arange(50) * 7 % 501
    extra = dict(speaker=torch.tensor([2]), style_id=torch.tensor([8]))
    with torch.no_grad():
        base = model(units, **extra)
        changed = units.clone()
        changed[25] += 1
        diff = (model(changed, **extra) - base).abs().view(50, 640).amax(1)
    touched = torch.nonzero(diff > 0).view(-1)
    assert touched.min().item() == 25 - right and touched.max().item() == 25 + left


def test_loader_errors(tmp_path):
    paths = CheckpointPaths(tmp_path)
    directory = RS.write_vocoder(paths, "base", seed=0)
    generator = directory / "generator.pt"
    state = torch.load(generator, weights_only=True)["generator"]

    renamed = {
        k.replace("weight_g", "parametrizations.weight.original0").replace(
            "weight_v", "parametrizations.weight.original1"
        ): v
        for k, v in state.items()
    }
    torch.save({"generator": renamed}, generator)
    assert V.load_vocoder(paths, "base").speakers == RS.TINY_SPEAKERS  # newer weight-norm names load too

    torch.save({"model": state}, generator)
    with pytest.raises(CheckpointError, match=r"generator\.pt.*'generator'"):
        V.load_vocoder(paths, "base")
    torch.save({"generator": {k: v for k, v in state.items() if k != "conv_post.weight_v"}}, generator)
    with pytest.raises(CheckpointError, match=r"generator\.pt.*missing keys: conv_post\.weight_v"):
        V.load_vocoder(paths, "base")
    torch.save({"generator": dict(state, **{"dict.weight": state["dict.weight"][:100]})}, generator)
    with pytest.raises(CheckpointError, match=r"dict\.weight: expected \(501, 8\), found \(100, 8\)"):
        V.load_vocoder(paths, "base")
    generator.unlink()
    with pytest.raises(CheckpointError, match=r"generator\.pt does not exist"):
        V.load_vocoder(paths, "base")
    torch.save({"generator": state}, generator)

    (directory / "styles.txt").unlink()
    with pytest.raises(CheckpointError, match=r"styles\.txt does not exist"):
        V.load_vocoder(paths, "base")
    (directory / "styles.txt").write_text("\n".join(RS.TINY_STYLES) + "\n")

    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(dict(config, model_in_dim=99)))
    with pytest.raises(CheckpointError, match=r"config\.json.*model_in_dim"):
        V.load_vocoder(paths, "base")
    del config["upsample_rates"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json has no key 'upsample_rates'"):
        V.load_vocoder(paths, "base")


def test_runtime_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import spiritlm_edge.runtime.vocoder"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parallel_windows_are_exact(setup, monkeypatch):
    """Windows synthesized side by side (2 workers) and cut for memory give the same audio."""
    _, paths, _, single = setup
    parallel = Vocoder.from_bundle(paths.root.parent / "bundle", n_threads=2)
    assert parallel._workers == 2
    hubert, pitch, style = random_units(single, 80, seed=21)
    expected = single.decode(hubert, pitch, style)
    calls = []
    generate = parallel._generate
    monkeypatch.setattr(parallel, "_generate", lambda *a: calls.append(1) or generate(*a))
    assert rel_l2(parallel.decode(hubert, pitch, style), expected) <= 1e-5
    assert len(calls) == 2
    monkeypatch.setattr("spiritlm_edge.runtime.vocoder.MAX_WINDOW_FRAMES", 16)
    assert rel_l2(parallel.decode(hubert, pitch, style), expected) <= 1e-5
    assert len(calls) > 2 + 8
    codes = (c.tolist() if c is not None else [None] * 80 for c in (pitch, style))
    frames = list(zip(hubert.tolist(), *codes, strict=True))
    assert rel_l2(np.concatenate(list(parallel.stream(frames, chunk_frames=60))), expected) <= 1e-5
