"""int8 / fp16 variants: quantize command, accuracy gate, runtime selection (tiny bundles)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from spiritlm_edge.quant import onnx_int8 as q  # noqa: E402
from spiritlm_edge.runtime.audio import BUNDLED_CLIP, load_audio  # noqa: E402
from spiritlm_edge.runtime.bundle import PRECISION_ENV, Bundle, read_manifest  # noqa: E402
from spiritlm_edge.runtime.errors import BundleError  # noqa: E402

PERMISSIVE = {"hubert": {"min_unit_agreement": 0.0}, "vocoder": {"max_mel_distance_db": 1e9, "min_snr_db": -1e9}}


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A base bundle with a tiny HuBERT and vocoder (what quantize works on)."""
    from spiritlm_edge.export import hubert, vocoder
    from spiritlm_edge.export.checkpoints import CheckpointPaths
    from spiritlm_edge.export.random_speech import write_hubert, write_vocoder

    root = tmp_path_factory.mktemp("int8")
    paths = CheckpointPaths(root / "ckpt")
    write_hubert(paths, "base", seed=3)
    write_vocoder(paths, "base", seed=4)
    hubert.export_onnx(paths, "base", root / "bundle")
    vocoder.export_onnx(paths, "base", root / "bundle")
    return root / "bundle"


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory):
    """3 s of the LibriSpeech clip: calibration and gate audio small enough for CI."""
    from spiritlm_edge.runtime.audio import write_wav

    path = tmp_path_factory.mktemp("calib") / "speech.wav"
    write_wav(path, load_audio(BUNDLED_CLIP)[:48000])
    return path


def quantize(bundle, speech_file, **kwargs):
    return q.quantize_bundle(bundle, calibration=[speech_file], synthetic=1, n_threads=1, **kwargs)


def _units(path, audio):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["units"], {"audio": audio[None]})[0]


def _gate_audio(speech_file):
    # What quantize_bundle gates HuBERT on: the calibration audio, whole.
    return q.split_chunks(q.calibration_audio([speech_file], synthetic=1), 30.0)


def _damage_weights(component, path):
    """Replace every int8 weight of the quantized model with random values."""
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    hit = 0
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.INT8 and np.prod(init.dims) > 16:
            values = rng.integers(-127, 128, size=tuple(init.dims), dtype=np.int8)
            init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
            hit += 1
    assert hit, "no int8 weights found to damage"
    onnx.save(model, str(path))


# ----------------------------------------------------------------------------- figures


def test_gate_figures_against_numpy():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 500, 1000)
    b = a.copy()
    b[rng.choice(1000, 37, replace=False)] += 1
    assert q.agreement(a, b) == pytest.approx(0.963)
    assert q.agreement(a, b[:900]) == pytest.approx(np.mean(a[:900] == b[:900]) * 0.9)
    x = rng.normal(size=16000).astype(np.float32)
    noise = 0.01 * rng.normal(size=16000)
    expected = 10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum(noise**2))
    assert q.snr_db(x, x + noise) == pytest.approx(expected, rel=1e-4)
    assert q.snr_db(x, x) == float("inf")
    # Doubling a signal raises its power spectrum by 10 log10(4) dB in every bin.
    speech = load_audio(BUNDLED_CLIP)[:32000]
    assert q.mel_distance_db(speech, speech) == 0.0
    assert q.mel_distance_db(speech, 2 * speech) == pytest.approx(10 * np.log10(4), abs=1e-3)
    bank = q.mel_filterbank()
    assert bank.shape == (80, 513) and np.all(bank.max(1) > 0.5)


def test_verdict_thresholds():
    assert q.gate_verdict("hubert", {"unit_agreement": 0.96}) == (True, [])
    ok, why = q.gate_verdict("hubert", {"unit_agreement": 0.94})
    assert not ok and "unit_agreement 0.94 < 0.95" in why[0]
    assert q.gate_verdict("hubert", {"unit_agreement": 0.5}, {"min_unit_agreement": 0.4})[0]
    ok, why = q.gate_verdict("vocoder", {"mel_distance_db": 2.0, "snr_db": 30.0})
    assert not ok and why == ["mel_distance_db 2.0 > 1.5"]


def test_synthetic_speech_is_deterministic_and_speech_like():
    a, b = q.synthetic_speech(2.0, 5), q.synthetic_speech(2.0, 5)
    assert a.dtype == np.float32 and a.shape == (32000,) and np.array_equal(a, b)
    assert not np.array_equal(a, q.synthetic_speech(2.0, 6))
    spectrum = np.abs(np.fft.rfft(a)) ** 2
    freqs = np.fft.rfftfreq(a.size, 1 / 16000)
    assert spectrum[(freqs > 80) & (freqs < 4000)].sum() > 0.8 * spectrum.sum()  # speech band
    assert np.abs(a).max() < 1.0


# ----------------------------------------------------------------------------- quantize + gate


@pytest.mark.slow
def test_quantize_records_gate_figures(bundle_copy, speech_file):
    report = quantize(bundle_copy, speech_file, components=("hubert", "vocoder"), thresholds=PERMISSIVE)
    manifest = read_manifest(bundle_copy)
    variant = manifest["components"]["hubert"]["variants"]["int8"]
    assert report["hubert"]["int8"]["written"] and variant["gate"]["passed"]
    path = bundle_copy / variant["file"]
    assert variant["bytes"] == path.stat().st_size
    assert variant["quantization"]["method"] == "static" and variant["quantization"]["nodes_quantized"] > 0
    # The int8 graph really holds int8 weights (QDQ), and the fp32 file is untouched.
    model = onnx.load(str(path))
    assert any(i.data_type == onnx.TensorProto.INT8 for i in model.graph.initializer)
    assert "DequantizeLinear" in {n.op_type for n in model.graph.node}
    Bundle(bundle_copy).verify_all()
    # The recorded agreement equals an independent recomputation on the same audio.
    fp32, int8 = [], []
    for clip in _gate_audio(speech_file):
        fp32.append(_units(bundle_copy / "hubert.onnx", clip))
        int8.append(_units(path, clip))
    fp32, int8 = np.concatenate(fp32), np.concatenate(int8)
    assert variant["gate"]["codes"] == fp32.size
    assert variant["gate"]["unit_agreement"] == pytest.approx(np.mean(fp32 == int8), abs=1e-4)
    voc = manifest["components"]["vocoder"]["variants"]["int8"]["gate"]
    assert np.isfinite(voc["snr_db"]) and voc["mel_distance_db"] >= 0


@pytest.mark.slow
def test_gate_refuses_damaged_model_and_force_writes_it(bundle_copy, speech_file):
    with pytest.raises(q.GateRefused) as refused:
        quantize(bundle_copy, speech_file, components=("hubert",), damage=_damage_weights)
    assert "hubert int8" in str(refused.value) and "--force" in str(refused.value)
    tried = refused.value.report["hubert"]["int8_tried"]
    assert all(not t["written"] and t["figures"]["unit_agreement"] < 0.95 for t in tried)
    assert "variants" not in read_manifest(bundle_copy)["components"]["hubert"]
    assert not (bundle_copy / "hubert.int8.onnx").exists()

    report = quantize(bundle_copy, speech_file, components=("hubert",), damage=_damage_weights, force=True)
    gate = read_manifest(bundle_copy)["components"]["hubert"]["variants"]["int8"]["gate"]
    assert report["hubert"]["int8"]["written"]
    assert gate["passed"] is False and gate["forced"] is True and gate["failures"]
    assert gate["unit_agreement"] < 0.95 and gate["thresholds"] == {"min_unit_agreement": 0.95}


@pytest.mark.slow
def test_threshold_parameter_decides(bundle_copy, speech_file):
    """The same candidate passes or fails depending only on the threshold given."""
    with pytest.raises(q.GateRefused):
        quantize(
            bundle_copy,
            speech_file,
            components=("hubert",),
            damage=_damage_weights,
            thresholds={"hubert": {"min_unit_agreement": 1.01}},
        )
    quantize(
        bundle_copy,
        speech_file,
        components=("hubert",),
        damage=_damage_weights,
        thresholds={"hubert": {"min_unit_agreement": 0.0}},
    )
    assert read_manifest(bundle_copy)["components"]["hubert"]["variants"]["int8"]["gate"]["passed"]


def test_fp16_variant(bundle_copy, speech_file):
    quantize(bundle_copy, speech_file, int8=False, fp16=True, components=("vocoder",))
    entry = read_manifest(bundle_copy)["components"]["vocoder"]["variants"]["fp16"]
    assert entry["gate"]["passed"] and entry["gate"]["snr_db"] > 30
    model = onnx.load(str(bundle_copy / entry["file"]))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types


def test_unknown_component_is_an_error(bundle_copy, speech_file):
    with pytest.raises(BundleError, match="quantizable"):
        quantize(bundle_copy, speech_file, components=("lm",))


# ----------------------------------------------------------------------------- runtime selection


@pytest.mark.slow
def test_runtime_picks_int8_and_can_be_overridden(bundle_copy, speech_file, monkeypatch):
    from spiritlm_edge.runtime.hubert import HubertEngine

    quantize(bundle_copy, speech_file, components=("hubert",), thresholds=PERMISSIVE)
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    bundle = Bundle(bundle_copy)
    assert bundle.engine_path("hubert").name == "hubert.int8.onnx"
    assert bundle.engine_path("hubert", "fp32").name == "hubert.onnx"
    assert bundle.engine_path("hubert", "fp16").name == "hubert.onnx"  # absent: fp32
    assert bundle.engine_path("vocoder").name == "vocoder.onnx"  # no variant
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    assert bundle.engine_path("hubert").name == "hubert.onnx"
    monkeypatch.setenv(PRECISION_ENV, "int4")
    with pytest.raises(BundleError, match="int4"):
        bundle.engine_path("hubert")

    clip = load_audio(BUNDLED_CLIP)[:48000]
    monkeypatch.delenv(PRECISION_ENV)
    engine = HubertEngine.from_bundle(Bundle(bundle_copy), n_threads=1)
    assert np.array_equal(engine(clip), _units(bundle_copy / "hubert.int8.onnx", clip))
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    engine = HubertEngine.from_bundle(Bundle(bundle_copy), n_threads=1)
    assert np.array_equal(engine(clip), _units(bundle_copy / "hubert.onnx", clip))


def test_corrupted_variant_is_caught(bundle_copy, speech_file, monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    quantize(bundle_copy, speech_file, components=("hubert",), thresholds=PERMISSIVE)
    path = bundle_copy / "hubert.int8.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Bundle(bundle_copy).engine_path("hubert")
    assert Bundle(bundle_copy).engine_path("hubert", "fp32").name == "hubert.onnx"


@pytest.mark.slow
def test_quantize_cli(bundle_copy, speech_file):
    from typer.testing import CliRunner

    from spiritlm_edge.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "quantize",
            str(bundle_copy),
            "--components",
            "vocoder",
            "--fp16",
            "--calibration",
            str(speech_file),
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "vocoder  int8" in result.output and "vocoder  fp16" in result.output
    variants = json.loads((bundle_copy / "bundle.json").read_text())["components"]["vocoder"]["variants"]
    assert set(variants) == {"int8", "fp16"}
    result = runner.invoke(app, ["quantize", str(bundle_copy), "--components", "lm"])
    assert result.exit_code != 0
