"""The CLI end to end on tiny bundles: run (files and --mic with scripted devices), asr, tts,
info, demo, and the one-line errors."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from spiritlm_edge.cli import app, main
from spiritlm_edge.runtime import audio_io
from spiritlm_edge.runtime.audio import SAMPLE_RATE, load_audio
from spiritlm_edge.runtime.audio_io import RecordingOutput, ScriptedInput

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in (
        "make-tiny-checkpoints",
        "build",
        "info",
        "run",
        "asr",
        "tts",
        "demo",
        "export",
        "quantize",
        "devices",
    ):
        assert command in result.output, command


def test_run_one_turn_from_files(tiny_base_bundle, librispeech_clip, tmp_path):
    out = tmp_path / "answer.wav"
    result = invoke(
        "run",
        "--bundle",
        tiny_base_bundle,
        "--input",
        librispeech_clip,
        "--output",
        out,
        "--max-new-tokens",
        "50",
        "--seed",
        "1",
    )
    assert result.exit_code == 0, result.output
    audio, rate = sf.read(out)
    # speech mode: every token is a unit, each becomes whole 640-sample frames
    assert rate == SAMPLE_RATE and len(audio) >= 640 and len(audio) % 640 == 0
    assert np.abs(audio).max() > 1e-3


def test_run_text_mode_prints_text(tiny_base_bundle):
    result = invoke(
        "run",
        "--bundle",
        tiny_base_bundle,
        "--text",
        "Hello there",
        "--mode",
        "text",
        "--max-new-tokens",
        "20",
        "--greedy",
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip()


def test_asr_and_tts(tiny_base_bundle, librispeech_clip, tmp_path):
    examples = tmp_path / "shots.tsv"
    examples.write_text(f"{librispeech_clip}\tan example transcript\n")
    result = invoke(
        "asr", librispeech_clip, "--bundle", tiny_base_bundle, "--examples", examples, "--max-new-tokens", "10"
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "tts.wav"
    result = invoke("tts", "good morning", "-o", out, "--bundle", tiny_base_bundle, "--max-new-tokens", "40")
    assert result.exit_code == 0, result.output
    assert sf.info(str(out)).frames > 0


def test_info_shows_components_and_providers(tiny_base_bundle):
    result = invoke("info", tiny_base_bundle, "--verify")
    assert result.exit_code == 0, result.output
    for text in ("variant: base", "hubert", "vocoder", "lm", "vad", "CPUExecutionProvider", "all files match"):
        assert text in result.output


def test_errors_are_one_line_messages(tiny_base_bundle, tmp_path, capsys, monkeypatch):
    not_audio = tmp_path / "x.wav"
    not_audio.write_text("not audio")
    for argv in (
        ["run", "--bundle", str(tmp_path / "nowhere"), "--text", "hi"],
        ["run", "--bundle", str(tiny_base_bundle), "--input", str(not_audio)],
        ["run", "--bundle", str(tiny_base_bundle), "--text", "hi", "--speaker", "42", "--output", "o.wav"],
        ["run", "--bundle", str(tiny_base_bundle), "--text", "hi", "--top-p", "1.5"],
        ["build", "--checkpoints", str(tmp_path), "--out", str(tmp_path / "b"), "--quant", "Q3_X"],
    ):
        monkeypatch.setattr("sys.argv", ["spiritlm-edge", *argv])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err, err
    assert "bundle" in err.lower() or "quant" in err.lower()


def test_no_audio_device_is_a_clear_error(tiny_base_bundle, monkeypatch, capsys):
    def no_device(*args, **kwargs):
        from spiritlm_edge.runtime.errors import AudioError

        raise AudioError("No audio input device found. Check `spiritlm-edge devices`.")

    monkeypatch.setattr(audio_io, "SoundDeviceInput", no_device)
    monkeypatch.setattr("sys.argv", ["spiritlm-edge", "run", "--bundle", str(tiny_base_bundle), "--mic"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "No audio input device" in capsys.readouterr().err


# -- the live loop through `run --mic`, with scripted devices ---------------------------------

SPEED = 8.0


@pytest.fixture
def scripted_devices(monkeypatch, librispeech_clip):
    """`run --mic` with a microphone that plays the clip's first phrase, then (during the
    answer) a second utterance, and a speaker that records."""
    clip = load_audio(librispeech_clip)
    devices = {}

    def make_input(device=None):
        mic = ScriptedInput(clip[: int(2.8 * SAMPLE_RATE)], at=0.5, speed=SPEED, duration=devices["duration"])
        if devices.get("second_at"):
            mic.add(clip[int(4.3 * SAMPLE_RATE) : int(7.0 * SAMPLE_RATE)], at=devices["second_at"])
        devices["input"] = mic
        return mic

    def make_output(device=None):
        devices["output"] = RecordingOutput(speed=SPEED)
        return devices["output"]

    monkeypatch.setattr(audio_io, "SoundDeviceInput", make_input)
    monkeypatch.setattr(audio_io, "SoundDeviceOutput", make_output)
    return devices


def _threads_settle(before):
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            return []
        time.sleep(0.05)
    return extra


def test_mic_loop_answers_a_turn(tiny_base_bundle, scripted_devices):
    scripted_devices["duration"] = 12.0
    before = set(threading.enumerate())
    result = invoke(
        "run", "--bundle", tiny_base_bundle, "--mic", "--max-new-tokens", "60", "--seed", "0", "--end-silence-ms", "600"
    )
    assert result.exit_code == 0, result.output
    played = scripted_devices["output"].played
    assert played.size >= 640 and played.size % 640 == 0  # the whole answer reached the speaker
    assert "1 turn" in result.output
    assert not _threads_settle(before)


@pytest.mark.slow
def test_mic_loop_barge_in_starts_a_new_turn(tiny_base_bundle, scripted_devices):
    # the answer to the first phrase (300 units = 12 s of audio) is still playing at 6 s
    scripted_devices["duration"] = 40.0
    scripted_devices["second_at"] = 6.0
    result = invoke(
        "run",
        "--bundle",
        tiny_base_bundle,
        "--mic",
        "--max-new-tokens",
        "300",
        "--seed",
        "0",
        "--end-silence-ms",
        "600",
    )
    assert result.exit_code == 0, result.output
    assert "2 turns" in result.output and "1 interrupted" in result.output, result.output
    # (that playback itself stops at once is tested in test_live.py, with exact timing)


def test_mic_loop_ctrl_c_mid_turn_ends_cleanly(tiny_base_bundle, monkeypatch, librispeech_clip):
    clip = load_audio(librispeech_clip)

    def make_input(device=None):
        return ScriptedInput(clip[: int(2.8 * SAMPLE_RATE)], at=0.5, speed=SPEED, interrupt_at=4.0)

    monkeypatch.setattr(audio_io, "SoundDeviceInput", make_input)
    monkeypatch.setattr(audio_io, "SoundDeviceOutput", lambda device=None: RecordingOutput(speed=SPEED))
    before = set(threading.enumerate())
    result = invoke("run", "--bundle", tiny_base_bundle, "--mic", "--max-new-tokens", "300", "--end-silence-ms", "600")
    assert result.exit_code == 0, result.output
    assert "Ctrl-C" in result.output
    assert not _threads_settle(before)


@pytest.mark.slow
def test_demo_builds_once_and_reports(monkeypatch, tmp_path):
    from spiritlm_edge import demo

    monkeypatch.setattr(demo, "demo_bundle_dir", lambda variant: tmp_path / f"demo-{variant}")
    out = tmp_path / "answer.wav"
    result = invoke("demo", "--out", out)
    assert result.exit_code == 0, result.output
    assert "RANDOM weights" in result.output and "time to first audio" in result.output
    assert sf.info(str(out)).frames > 0
    built = (tmp_path / "demo-base" / "bundle.json").stat().st_mtime
    result = invoke("demo", "--out", out)  # cached: no rebuild
    assert result.exit_code == 0 and (tmp_path / "demo-base" / "bundle.json").stat().st_mtime == built


def test_engine_option_is_checked_before_any_export(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt" else real_find_spec(name, *a)
    )
    result = invoke("export", "speech", "--checkpoints", tmp_path, "--out", tmp_path / "b", "--engine", "tensorrt")
    assert result.exit_code == 2 and "needs the tensorrt module" in result.output
    assert not (tmp_path / "b").exists()
    result = invoke("build", "--checkpoints", tmp_path, "--out", tmp_path / "b", "--engine", "vulkan")
    assert result.exit_code == 2 and "expected onnx or tensorrt" in result.output


@pytest.mark.slow
def test_gpu_bundles_get_the_plain_vocoder_graph(tiny_base_checkpoints, tmp_path, librispeech_clip):
    """--engine tensorrt exports the 1-D vocoder graph (the blocked one is tuned for x86 CPUs);
    both decode the same audio."""
    from spiritlm_edge import SpeechTokenizer
    from spiritlm_edge.cli import _vocoder_layout
    from spiritlm_edge.export.speech import export_speech

    assert _vocoder_layout("tensorrt") == "plain" and _vocoder_layout("onnx") == "blocked"
    audio = {}
    for layout in ("plain", "blocked"):
        manifest = export_speech(tiny_base_checkpoints, "base", tmp_path / layout, vocoder_layout=layout)
        assert manifest["components"]["vocoder"]["layout"] == layout
        tokenizer = SpeechTokenizer.from_bundle(tmp_path / layout)
        audio[layout] = tokenizer.decode(tokenizer(librispeech_clip))
    np.testing.assert_allclose(audio["plain"], audio["blocked"], atol=1e-4)
