"""Echo cancellation (runtime/aec.py, the far-end reference of runtime/audio_io.py and its use
in the live loop), measured in simulated rooms (bench/aec.py builds them): real speech played
by the loudspeaker, echoed through image-source room responses after 10-200 ms of delay at
-20..+6 dB relative to the user, plus noise; the user is another voice (espeak-ng)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytest.importorskip("pywebrtc_audio", reason="echo cancellation needs pywebrtc-audio (the mic/dev extras)")
pytest.importorskip("pyroomacoustics", reason="the simulated rooms need pyroomacoustics (the dev extra)")

from spiritlm_edge.bench import aec as sim  # noqa: E402
from spiritlm_edge.runtime import aec as aec_module  # noqa: E402
from spiritlm_edge.runtime.aec import EchoCanceller  # noqa: E402
from spiritlm_edge.runtime.audio import SAMPLE_RATE  # noqa: E402
from spiritlm_edge.runtime.audio_io import BLOCK_SAMPLES, FarEndReference  # noqa: E402
from spiritlm_edge.runtime.cpu_buffers import cpu_model
from spiritlm_edge.runtime.errors import AudioError  # noqa: E402
from spiritlm_edge.runtime.vad import SileroVAD, packaged_model_path  # noqa: E402

needs_vad = pytest.mark.skipif(
    packaged_model_path() is None, reason="Silero VAD model not installed: pip install --no-deps silero-vad==6.2.3"
)
ROOMS = [sim.Room.random(seed) for seed in range(50)]


@pytest.fixture(scope="module")
def vad():
    return SileroVAD()


@pytest.fixture(scope="module")
def echo_only(vad):
    result = sim.echo_only(sim.webrtc_canceller, ROOMS, vad)
    print(f"\nAEC echo-only, {len(ROOMS)} answers: {result}")
    return result


@pytest.fixture(scope="module")
def double_talk(vad):
    result = sim.double_talk(sim.webrtc_canceller, ROOMS, vad)
    print(f"\nAEC double talk, {len(ROOMS)} answers: {result}")
    return result


# --------------------------------------------------------------------------- the room figures


@needs_vad
@pytest.mark.slow
def test_erle_after_convergence(echo_only):
    assert echo_only["erle_median_db"] >= 25.0
    assert echo_only["convergence_median_s"] <= 1.0
    # A few rooms whose echo is barely above the noise take longer to reach 25 dB (the worst
    # is in docs/benchmarks.md); more than four in five get there within the first second.
    assert echo_only["converged_within_1s_share"] >= 0.8


@needs_vad
@pytest.mark.slow
def test_no_false_barge_in_over_50_echo_only_answers(echo_only):
    assert echo_only["answers"] == 50 and echo_only["false_barge_ins"] == 0


@needs_vad
@pytest.mark.slow
def test_barge_ins_in_double_talk(double_talk):
    # Within 300 ms of the user's onset (the VAD alone takes 150-240 ms on these voices) when
    # the loudspeaker's echo reaches the microphone at least 7 dB weaker than the user: the
    # issue's 95%. Louder echo makes AEC3's suppressor hold the user back for longer during
    # double talk: over the whole -20..+6 dB range fewer make it within 300 ms (docs/benchmarks.md),
    # but nearly all within 1.5 s.
    assert double_talk["quiet_echo_answers"] >= 15
    assert double_talk["quiet_echo_detected_share"] >= 0.95
    assert double_talk["detected_share"] >= 0.7
    assert double_talk["detected_within_1500ms_share"] >= 0.95
    assert double_talk["false_barge_ins_before_onset"] == 0
    # The user's voice survives: the VAD hears most of what it hears in the clean voice.
    assert double_talk["vad_agreement_median"] >= 0.8
    assert double_talk["near_snr_median_db"] > 0.0


@needs_vad
def test_without_cancellation_the_echo_barges_in(vad):
    # The negative control of the figures above: the same rooms, nothing cancelled.
    result = sim.echo_only(sim.no_canceller, ROOMS[:4], vad)
    assert result["false_barge_ins"] == 4 and result["erle_median_db"] < 1.0


def test_cost_per_second_of_audio():
    room = ROOMS[0]
    s = sim.scene(room, sim.voice("clip"))
    _, cpu = sim.cancel(sim.webrtc_canceller, s)
    per_second = cpu / (len(s.mic) / SAMPLE_RATE)
    print(f"\nAEC cost: {per_second * 1000:.1f} ms CPU per second of audio ({cpu_model()})")
    assert per_second < 0.2  # a small fraction of one core


# --------------------------------------------------------------------------- robustness


def erle_after(s: sim.Scene, out: np.ndarray, t: float) -> float:
    starts, values = sim.erle_windows(s, out)
    return float(np.median(values[(starts >= t) & (starts < t + 2.0)]))


def test_volume_change_mid_answer():
    # The loudspeaker is turned up by 12 dB 4 s into the answer.
    room = sim.Room(seed=3, delay_ms=60.0, level_db=-6.0)
    s = sim.scene(room, sim.voice("far-answer1"))
    step = 4 * SAMPLE_RATE
    s.echo[step:] *= 10 ** (12 / 20)
    s.mic[step:] = np.clip(s.mic[step:] + s.echo[step:] * (1 - 10 ** (-12 / 20)), -1, 1)
    out, _ = sim.cancel(sim.webrtc_canceller, s)
    assert erle_after(s, out, 1.0) >= 25.0
    assert erle_after(s, out, 5.0) >= 25.0  # back within 1 s of the change


def test_echo_delay_jump_after_an_underrun():
    # The output underruns 4 s in: the device plays 90 ms of silence the reference does not
    # have, and every later echo comes 90 ms later than before.
    room = sim.Room(seed=5, delay_ms=40.0, level_db=0.0)
    far = sim.voice("far-answer2")
    s = sim.scene(room, far)
    gap, step = int(0.09 * SAMPLE_RATE), 4 * SAMPLE_RATE
    late = sim.scene(room, np.concatenate([far[:step], np.zeros(gap, np.float32), far[step:]])[: len(far)])
    s.mic[step:], s.echo[step:] = late.mic[step:], late.echo[step:]
    # PortAudio reports the underrun: the live loop restarts the canceller (the reference's
    # `breaks`), which converges again much faster than AEC3 re-learns a shifted path.
    aec, out = EchoCanceller(), np.zeros_like(s.mic)
    for i in range(0, len(s.mic) - BLOCK_SAMPLES + 1, BLOCK_SAMPLES):
        if i <= step < i + BLOCK_SAMPLES:
            aec.reset()
        out[i : i + BLOCK_SAMPLES] = aec.process(s.mic[i : i + BLOCK_SAMPLES], s.far[i : i + BLOCK_SAMPLES])
    assert erle_after(s, out, 1.0) >= 25.0
    assert erle_after(s, out, 5.0) >= 25.0  # converged again within a second


def test_delay_is_measured_and_logged(caplog):
    room = sim.Room(seed=7, delay_ms=150.0, level_db=0.0)
    s = sim.scene(room, sim.voice("clip"))
    aec = EchoCanceller(device_delay_ms=40.0)
    with caplog.at_level(logging.INFO, logger="spiritlm_edge.runtime.aec"):
        for i in range(0, len(s.mic) - BLOCK_SAMPLES + 1, BLOCK_SAMPLES):
            aec.process(s.mic[i : i + BLOCK_SAMPLES], s.far[i : i + BLOCK_SAMPLES])
    direct = int(np.argmax(np.abs(room.impulse_response))) * 1000 / SAMPLE_RATE
    assert aec.delay.delay_ms is not None and abs(aec.delay.delay_ms - direct) <= 3.0
    lines = [r.getMessage() for r in caplog.records if "echo delay" in r.getMessage()]
    assert lines and f"echo delay: {40 + aec.delay.delay_ms:.0f} ms in all, 40 ms of it device latency" in lines[0]


# --------------------------------------------------------------------------- API


def test_process_keeps_block_length_and_rejects_bad_input():
    aec = EchoCanceller()
    assert aec.latency_samples == 128
    rng = np.random.default_rng(0)
    for n in (512, 160, 1, 700):
        out = aec.process(rng.normal(0, 0.01, n).astype(np.float32), np.zeros(n, np.float32))
        assert out.shape == (n,) and out.dtype == np.float32
    with pytest.raises(AudioError, match="as many far-end samples"):
        aec.process(np.zeros(512), np.zeros(500))
    with pytest.raises(AudioError, match="NaN"):
        aec.process(np.full(512, np.nan), np.zeros(512))


def test_missing_library_says_what_to_install(monkeypatch):
    def no_module(name):
        raise ImportError(name)

    monkeypatch.setattr(aec_module.importlib, "import_module", no_module)
    with pytest.raises(AudioError, match=r"pip install 'spiritlm-edge\[mic\]'.*--aec off"):
        EchoCanceller()


def test_far_end_reference_alignment_and_resync():
    ref = FarEndReference()
    ramp = np.arange(8000, dtype=np.float32)
    ref.write(ramp[:4000])
    # First read: `lag` samples behind the newest sample written.
    np.testing.assert_array_equal(ref.read(512, lag=1000), ramp[4000 - 1000 - 512 : 4000 - 1000])
    ref.write(ramp[4000:4512])
    # Later reads continue where the previous one ended, whatever the writer did meanwhile.
    np.testing.assert_array_equal(ref.read(512, lag=1000), ramp[4000 - 1000 : 4000 - 1000 + 512])
    assert ref.resyncs == 0
    # The output stalls (a restarted device): reads run past what was written (zeros there),
    # then jump back into place once the drift has exceeded RESYNC_SECONDS (3200 samples)
    # for RESYNC_READS (8) reads in a row.
    ref.read(512, lag=1000)  # [3512, 4024)
    got = ref.read(512, lag=1000)  # [4024, 4536): 24 samples were never written
    np.testing.assert_array_equal(got, np.concatenate([ramp[4024:4512], np.zeros(24, np.float32)]))
    for _ in range(4 + 7):  # the 5th read on is 3584 samples off: 7 reads tolerated
        ref.read(512, lag=1000)
    assert ref.resyncs == 0
    np.testing.assert_array_equal(ref.read(512, lag=1000), ramp[3000:3512])  # realigned
    assert ref.resyncs == 1 and ref.breaks == 1
    # A burst of writes (several device blocks at once) is a swing, not a break.
    ref.write(ramp[4512:8000])
    ref.read(512, lag=1000)
    assert ref.resyncs == 1
    ref.mark_break()  # an underrun the device reported
    assert ref.breaks == 2


def test_far_end_reference_resamples_device_rate():
    ref = FarEndReference()
    t = np.arange(48000) / 48000
    ref.write(np.sin(2 * np.pi * 440 * t).astype(np.float32), rate=48000)
    # soxr holds back ~20 ms: the reference then leads the echo a little more, which AEC3 absorbs
    assert SAMPLE_RATE - 500 <= ref.written <= SAMPLE_RATE
    got = ref.read(4000, lag=2000)
    spectrum = np.abs(np.fft.rfft(got))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / len(got) - 440) < 8


# --------------------------------------------------------------------------- wiring


@needs_vad
@pytest.mark.parametrize(
    ("barge_in", "aec", "expected"),
    [(True, None, True), (False, None, False), (True, False, False), (False, True, True)],
)
def test_run_mic_session_cancels_echo_whenever_barge_in_is_on(monkeypatch, barge_in, aec, expected):
    from spiritlm_edge.runtime import live

    built = {}

    class FakeLoop:
        def __init__(self, *args, **kwargs):
            built.update(kwargs)

        def run(self):
            return live.SessionSummary([], 0.0, "end_of_input", False)

    monkeypatch.setattr(live, "LiveLoop", FakeLoop)
    live.run_mic_session(lambda audio: iter(()), barge_in=barge_in, aec=aec, on_status=lambda m: None)
    assert isinstance(built["aec"], EchoCanceller) is expected


def test_cli_aec_option(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from spiritlm_edge.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["run", "--bundle", str(tmp_path), "--mic", "--aec", "maybe"])
    assert result.exit_code != 0 and "--aec takes on or off" in result.output

    def no_module(name):
        raise ImportError(name)

    # A missing library is said before the model loads (the bundle here is an empty folder).
    monkeypatch.setattr(aec_module.importlib, "import_module", no_module)
    result = runner.invoke(app, ["run", "--bundle", str(tmp_path), "--mic"])
    assert result.exit_code != 0 and "pywebrtc-audio" in str(result.output) + str(result.exception)
