"""The live loop (runtime/live.py) and audio devices (runtime/audio_io.py).

The loop runs for real (worker thread, device threads, Silero VAD) on scripted audio played
at several times real time; only the microphone and speaker are simulated.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import types

import numpy as np
import pytest

from spiritlm_edge.runtime import audio_io
from spiritlm_edge.runtime.audio import SAMPLE_RATE
from spiritlm_edge.runtime.audio_io import (
    BLOCK_SAMPLES,
    RecordingOutput,
    ScriptedInput,
    SoundDeviceInput,
    SoundDeviceOutput,
)
from spiritlm_edge.runtime.errors import AudioError, ModelError
from spiritlm_edge.runtime.events import AudioChunk, TextDelta, TurnEnd
from spiritlm_edge.runtime.live import LiveLoop, run_mic_session
from spiritlm_edge.runtime.vad import SileroVAD, TurnDetector, packaged_model_path

SPEED = 8.0  # scripted audio plays 8x faster than real time
# The clip has a 1.4 s pause between its two phrases; 2 s of silence ends a turn here so
# that the whole clip is one turn.
END_SILENCE_MS = 2000

pytestmark = pytest.mark.skipif(
    packaged_model_path() is None, reason="Silero VAD model not installed: pip install --no-deps silero-vad==6.2.3"
)


@pytest.fixture(scope="module")
def first_phrase(clip):
    return clip[: int(2.8 * SAMPLE_RATE)]  # "...", up to the pause


@pytest.fixture
def no_leftover_threads():
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            return
        time.sleep(0.02)
    pytest.fail(f"threads left running: {[t.name for t in extra]}")


def tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


class FakeRespond:
    """A stand-in for the pipeline: text, then audio chunks, then TurnEnd; records its calls
    and whether its generator was closed before finishing."""

    def __init__(self, chunks=4, chunk_seconds=0.5, step_seconds=0.0, text=("Hello", " there.")):
        self.chunks, self.chunk_seconds, self.step_seconds, self.text = chunks, chunk_seconds, step_seconds, text
        self.calls: list[np.ndarray] = []
        self.closed: list[bool] = []
        self.finished: list[bool] = []

    @property
    def answer_samples(self) -> int:
        return self.chunks * int(self.chunk_seconds * SAMPLE_RATE)

    def __call__(self, audio):
        self.calls.append(audio)
        self.closed.append(False)
        self.finished.append(False)
        index = len(self.calls) - 1
        try:
            for piece in self.text:
                yield TextDelta(piece)
            for i in range(self.chunks):
                time.sleep(self.step_seconds / SPEED)  # "generating", in scripted time
                yield AudioChunk(tone(self.chunk_seconds, 220.0 + 40 * i))
            yield TurnEnd(timings={"decode": 0.1}, text="".join(self.text))
            self.finished[index] = True
        except GeneratorExit:
            self.closed[index] = True
            raise


def find_in(timeline: np.ndarray, segment: np.ndarray) -> int:
    """Block-aligned offset of ``segment`` inside ``timeline`` (the scripted input's signal)."""
    for offset in range(0, len(timeline) - len(segment) + 1, BLOCK_SAMPLES):
        if np.array_equal(timeline[offset : offset + len(segment)], segment):
            return offset
    raise AssertionError("the utterance is not a contiguous piece of what the microphone heard")


def make_loop(respond, audio_in, audio_out, **kwargs):
    texts, statuses, ended = [], [], []
    detector = TurnDetector(end_silence_ms=kwargs.pop("end_silence_ms", END_SILENCE_MS))
    loop = LiveLoop(
        respond,
        audio_in,
        audio_out,
        SileroVAD(),
        detector,
        on_text=texts.append,
        on_status=statuses.append,
        on_turn_end=ended.append,
        max_seconds=kwargs.pop("max_seconds", 60.0),
        **kwargs,
    )
    return loop, texts, statuses, ended


def test_one_turn_end_to_end(clip, no_leftover_threads):
    respond = FakeRespond()
    audio_in = ScriptedInput(clip, at=0.5, speed=SPEED)
    audio_out = RecordingOutput(speed=SPEED)
    loop, texts, statuses, ended = make_loop(respond, audio_in, audio_out, max_turns=1)
    summary = loop.run()

    assert summary.ended_by == "max_turns" and summary.speech_detected
    assert len(summary.turns) == 1 and len(respond.calls) == 1
    heard = respond.calls[0]
    # respond got the clip: a contiguous piece of the microphone signal that holds all of
    # the clip's speech (its first 0.2 s and last 0.25 s are silence), padded by <= 0.3 s.
    timeline = np.zeros(int(0.5 * SAMPLE_RATE) + len(clip) + 4 * SAMPLE_RATE, dtype=np.float32)
    timeline[int(0.5 * SAMPLE_RATE) : int(0.5 * SAMPLE_RATE) + len(clip)] = clip
    offset = find_in(timeline, heard)
    clip_start, clip_end = int(0.5 * SAMPLE_RATE), int(0.5 * SAMPLE_RATE) + len(clip)
    assert clip_start - 0.1 * SAMPLE_RATE <= offset <= clip_start + 0.25 * SAMPLE_RATE
    assert clip_end - 0.3 * SAMPLE_RATE <= offset + len(heard) <= clip_end + 0.3 * SAMPLE_RATE

    assert "".join(texts) == "Hello there."
    turn = summary.turns[0]
    assert turn.text == "Hello there." and not turn.interrupted and turn.timings == {"decode": 0.1}
    assert ended == [turn]
    expected = np.concatenate([tone(0.5, 220.0 + 40 * i) for i in range(4)])
    np.testing.assert_array_equal(audio_out.played, expected)
    assert audio_out.stops == []
    assert respond.finished == [True] and respond.closed == [False]


@pytest.mark.slow
def test_barge_in_stops_playback_and_starts_a_new_turn(clip, first_phrase, no_leftover_threads):
    # 8 s answer, generated at 1 chunk per 0.8 s: the generator is still running when the
    # user talks over it 2 s into the playback.
    respond = FakeRespond(chunks=8, chunk_seconds=1.0, step_seconds=0.8)
    audio_in = ScriptedInput(clip, at=0.5, speed=SPEED)
    # The first turn ends ~11.3 s into the stream (clip end + 2 s of silence).
    second_at = 13.5
    audio_in.add(first_phrase, at=second_at)
    audio_out = RecordingOutput(speed=SPEED)
    loop, texts, statuses, ended = make_loop(respond, audio_in, audio_out, max_turns=2)
    summary = loop.run()

    assert summary.ended_by == "max_turns"
    assert len(summary.turns) == 2 and len(respond.calls) == 2
    first, second = summary.turns
    assert first.interrupted and not second.interrupted
    assert "(interrupted)" in statuses
    assert respond.closed == [True, False] and respond.finished == [False, True]
    assert len(audio_out.stops) == 1
    # Playback of the first answer stopped early: the recording holds the second answer in
    # full after a piece of the first.
    played_first = len(audio_out.played) - respond.answer_samples
    assert 0 < played_first < 0.6 * respond.answer_samples
    assert audio_out.dropped > 0

    # The second turn is the second utterance, including the speech that barged in and
    # some pre-roll before it.
    timeline = np.zeros(int((second_at + 6) * SAMPLE_RATE), dtype=np.float32)
    timeline[int(0.5 * SAMPLE_RATE) : int(0.5 * SAMPLE_RATE) + len(clip)] = clip
    start = int(second_at * SAMPLE_RATE)
    timeline[start : start + len(first_phrase)] = first_phrase
    offset = find_in(timeline, respond.calls[1])
    assert start - 0.35 * SAMPLE_RATE <= offset <= start + 0.2 * SAMPLE_RATE
    assert offset + len(respond.calls[1]) >= start + len(first_phrase) - 0.3 * SAMPLE_RATE
    assert "".join(texts) == "Hello there." * 2


@pytest.mark.slow
def test_without_barge_in_the_answer_plays_to_the_end(clip, first_phrase, no_leftover_threads):
    respond = FakeRespond(chunks=6, chunk_seconds=1.0)
    audio_in = ScriptedInput(clip, at=0.5, speed=SPEED).add(first_phrase, at=13.0)
    audio_out = RecordingOutput(speed=SPEED)
    loop, *_ = make_loop(respond, audio_in, audio_out, barge_in=False, max_seconds=24.0)
    summary = loop.run()
    # The phrase spoken during the answer was not heard at all.
    assert summary.ended_by == "max_seconds"
    assert len(summary.turns) == 1 and not summary.turns[0].interrupted
    assert len(audio_out.played) == respond.answer_samples and audio_out.stops == []


def test_silence_only_gives_no_turn(no_leftover_threads):
    respond = FakeRespond()
    audio_in = ScriptedInput(None, speed=4 * SPEED, duration=6.0, noise=0.003)
    loop, texts, statuses, _ = make_loop(respond, audio_in, RecordingOutput(speed=SPEED))
    summary = loop.run()
    assert summary.ended_by == "end_of_input"
    assert summary.turns == [] and respond.calls == [] and not summary.speech_detected
    assert summary.seconds == pytest.approx(6.0, abs=0.04)
    assert statuses[-1] == "no speech detected in 6.0 s of audio"


def test_max_seconds_ends_the_session(no_leftover_threads):
    loop, *_ = make_loop(FakeRespond(), ScriptedInput(None, speed=4 * SPEED), RecordingOutput(), max_seconds=2.0)
    summary = loop.run()
    assert summary.ended_by == "max_seconds" and 2.0 <= summary.seconds < 2.04


class EndlessRespond(FakeRespond):
    """Generates text forever (until closed); optionally sends SIGINT once it has started."""

    def __init__(self, send_sigint=False):
        super().__init__()
        self.send_sigint = send_sigint

    def __call__(self, audio):
        self.calls.append(audio)
        self.closed.append(False)
        try:
            yield AudioChunk(tone(5.0))
            if self.send_sigint:
                os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread, as Ctrl-C is
            while True:
                time.sleep(0.005)
                yield TextDelta(".")
        except GeneratorExit:
            self.closed[-1] = True
            raise


def test_ctrl_c_from_the_input_mid_turn_exits_cleanly(clip, no_leftover_threads):
    respond = EndlessRespond()
    # The turn starts ~11.3 s in; Ctrl-C comes while the answer is generated and played.
    audio_in = ScriptedInput(clip, at=0.5, speed=SPEED, interrupt_at=12.5)
    audio_out = RecordingOutput(speed=SPEED)
    loop, texts, _, ended = make_loop(respond, audio_in, audio_out)
    summary = loop.run()
    assert summary.ended_by == "interrupted"
    assert len(respond.calls) == 1 and respond.closed == [True]
    assert summary.turns[0].interrupted and ended == summary.turns
    assert 0 < len(audio_out.played) < 5 * SAMPLE_RATE and audio_out.idle()
    assert texts  # text was streaming when the session ended


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals go to the main thread")
def test_ctrl_c_signal_mid_turn_exits_cleanly(clip, no_leftover_threads):
    respond = EndlessRespond(send_sigint=True)
    audio_in = ScriptedInput(clip, at=0.5, speed=SPEED)
    # The SIGINT comes from the worker thread: on a loaded machine it may wait for the GIL
    # while the main loop catches up on scripted audio, so leave a generous session limit.
    loop, *_ = make_loop(respond, audio_in, RecordingOutput(speed=SPEED), max_seconds=600.0)
    summary = loop.run()
    assert summary.ended_by == "interrupted"
    assert respond.closed == [True] and summary.turns[0].interrupted


def test_respond_failure_is_raised_and_threads_are_joined(clip, no_leftover_threads):
    def respond(audio):
        yield TextDelta("partial")
        raise ModelError("the prompt is longer than the context")

    texts = []
    loop = LiveLoop(
        respond,
        ScriptedInput(clip, at=0.5, speed=SPEED),
        RecordingOutput(speed=SPEED),
        SileroVAD(),
        TurnDetector(end_silence_ms=END_SILENCE_MS),
        on_text=texts.append,
        max_seconds=30,
    )
    with pytest.raises(ModelError, match="longer than the context"):
        loop.run()
    assert texts == ["partial"]


def test_turn_end_audio_is_played_when_nothing_was_streamed(clip, no_leftover_threads):
    answer = tone(1.0)

    def respond(audio):
        yield TextDelta("hi")
        yield TurnEnd(text="hi", audio=answer)

    audio_out = RecordingOutput(speed=SPEED)
    loop, *_ = make_loop(respond, ScriptedInput(clip, at=0.5, speed=SPEED), audio_out, max_turns=1)
    summary = loop.run()
    assert summary.ended_by == "max_turns"
    np.testing.assert_array_equal(audio_out.played, answer)


# ----------------------------------------------------------------------------- devices


def test_scripted_input_keeps_scripted_time():
    audio = np.linspace(-0.5, 0.5, 3000, dtype=np.float32)
    source = ScriptedInput(audio, at=0.1, speed=10.0, duration=0.5)
    started = time.monotonic()
    with source:
        blocks = []
        while (block := source.read()) is not None:
            blocks.append(block)
    elapsed = time.monotonic() - started
    signal_ = np.concatenate(blocks)
    assert len(signal_) == 15 * BLOCK_SAMPLES  # whole blocks within 0.5 s
    np.testing.assert_array_equal(signal_[1600:4600], audio)
    assert signal_[:1600].any() == 0 and not signal_[4600:].any()
    assert 0.045 <= elapsed < 0.5  # 0.48 s of audio at 10x


def test_recording_output_plays_in_time_and_honours_stop():
    out = RecordingOutput(speed=10.0)
    with out:
        out.play(tone(1.0))
        assert not out.idle()
        assert out.wait(timeout=2.0)  # 1 s at 10x: about 0.1 s
        np.testing.assert_array_equal(out.played, tone(1.0))
        out.play(tone(10.0))
        time.sleep(0.05)
        out.stop()
        assert out.idle()
        assert len(out.played) < SAMPLE_RATE + 5 * SAMPLE_RATE
        assert out.dropped + len(out.played) == 11 * SAMPLE_RATE
        times = [t for t, _ in out.log]
        assert times == sorted(times)


def _sounddevice_or_skip():
    try:
        return audio_io.import_sounddevice()
    except AudioError as exc:
        pytest.skip(f"sounddevice unusable here: {exc}")


def test_missing_sounddevice_or_portaudio_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)
    with pytest.raises(AudioError, match=r"pip install 'spiritlm-edge\[mic\]'"):
        SoundDeviceInput().start()

    def no_portaudio(name):
        raise OSError("PortAudio library not found")

    monkeypatch.setattr(audio_io, "importlib", types.SimpleNamespace(import_module=no_portaudio))
    with pytest.raises(AudioError, match="libportaudio2"):
        audio_io.list_devices()


def test_no_audio_device_is_a_clear_error(no_leftover_threads):
    sd = _sounddevice_or_skip()
    if audio_io.list_devices():
        pytest.skip("this machine has audio devices")
    with pytest.raises(AudioError, match="No audio input device found.*spiritlm-edge devices"):
        SoundDeviceInput().start()
    with pytest.raises(AudioError, match="No audio output device found"):
        SoundDeviceOutput().start()
    with pytest.raises(AudioError, match="'USB mic' not usable.*--input-device"):
        SoundDeviceInput("USB mic").start()
    # The whole session fails the same way, with nothing left running.
    with pytest.raises(AudioError, match="No audio input device"):
        run_mic_session(FakeRespond(), max_seconds=1)
    assert isinstance(sd.PortAudioError, type)


def test_real_devices_capture_and_play(no_leftover_threads):
    _sounddevice_or_skip()
    devices = audio_io.list_devices()
    if not any(d["inputs"] for d in devices) or not any(d["outputs"] for d in devices):
        pytest.skip(f"needs an audio input and output device; PortAudio sees {len(devices)} device(s)")
    with SoundDeviceInput() as mic:
        blocks = [mic.read() for _ in range(10)]
    assert all(b.shape == (BLOCK_SAMPLES,) and b.dtype == np.float32 for b in blocks)
    with SoundDeviceOutput() as speaker:
        speaker.play(tone(0.2, 440.0) * 0.1)
        speaker.flush()
        assert speaker.wait(timeout=3.0)


class FakeSoundDevice(types.SimpleNamespace):
    """Just enough of the sounddevice module to drive our PortAudio classes at 48 kHz."""

    class PortAudioError(Exception):
        pass

    def __init__(self, rate=48000):
        super().__init__()
        self.rate = rate
        self.output = []
        self.default = types.SimpleNamespace(device=[0, 0])

    def query_devices(self, device=None, kind=None):
        if device not in (None, 0, "Fake"):
            raise ValueError(f"No {kind} device matching {device!r}")
        return {"index": 0, "name": "Fake", "default_samplerate": float(self.rate)}

    def check_input_settings(self, **kwargs):
        raise self.PortAudioError("Invalid sample rate")

    check_output_settings = check_input_settings

    def _stream(self, callback, blocksize, is_input):
        fake = self

        class Stream:
            def __init__(self):
                self.stop_event = threading.Event()
                self.thread = threading.Thread(target=self.run, daemon=True)

            def start(self):
                self.thread.start()

            def run(self):
                n = 0
                status = types.SimpleNamespace(input_overflow=False)
                while not self.stop_event.is_set():
                    if is_input:  # a 440 Hz tone at the device rate
                        t = (n + np.arange(blocksize)) / fake.rate
                        callback(
                            (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[:, None], blocksize, None, status
                        )
                    else:
                        out = np.empty((blocksize, 1), dtype=np.float32)
                        callback(out, blocksize, None, status)
                        fake.output.append(out[:, 0].copy())
                    n += blocksize
                    time.sleep(0.0005)

            def abort(self):
                self.stop_event.set()
                self.thread.join()

            def close(self):
                pass

        return Stream()

    def InputStream(self, device, samplerate, channels, dtype, blocksize, callback):
        assert samplerate == self.rate and channels == 1
        return self._stream(callback, blocksize, True)

    def OutputStream(self, device, samplerate, channels, dtype, blocksize, callback):
        return self._stream(callback, blocksize, False)


def test_portaudio_classes_resample_device_rates(monkeypatch, no_leftover_threads):
    fake = FakeSoundDevice(rate=48000)
    monkeypatch.setitem(sys.modules, "sounddevice", fake)

    with SoundDeviceInput("0") as mic:
        captured = np.concatenate([mic.read() for _ in range(40)])
    assert captured.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(captured[4096 : 4096 + 8192]))
    assert np.fft.rfftfreq(8192, 1 / SAMPLE_RATE)[spectrum.argmax()] == pytest.approx(440, abs=2)
    assert np.abs(captured[4096:]).max() == pytest.approx(0.5, abs=0.02)

    with SoundDeviceOutput("Fake") as speaker:
        speaker.play(tone(0.25, 1000.0))
        speaker.flush()
        assert speaker.wait(timeout=5.0)
    # read what the device got once its stream is closed: its callback thread may still be
    # appending the last block when wait() returns
    played = np.concatenate(fake.output)
    loud = np.flatnonzero(np.abs(played) > 0.05)
    assert (loud[-1] - loud[0]) / 48000 == pytest.approx(0.25, abs=0.01)

    with SoundDeviceOutput("Fake") as speaker:
        speaker.play(tone(5.0))
        speaker.stop()
        assert speaker.idle()
    with pytest.raises(AudioError, match="'USB mic' not usable"):
        SoundDeviceInput("USB mic").start()


def test_device_listing_and_summary_text():
    devices = [
        {
            "index": 0,
            "name": "Built-in Mic",
            "hostapi": "ALSA",
            "inputs": 2,
            "outputs": 0,
            "default_samplerate": 48000.0,
            "default_input": True,
            "default_output": False,
        },
        {
            "index": 3,
            "name": "USB Headset",
            "hostapi": "ALSA",
            "inputs": 1,
            "outputs": 2,
            "default_samplerate": 16000.0,
            "default_input": False,
            "default_output": True,
        },
    ]
    table = audio_io.format_devices(devices).splitlines()
    assert table[1].startswith("> ") and "Built-in Mic (ALSA)" in table[1] and "48.0k" in table[1]
    assert table[2].startswith(" <") and "USB Headset" in table[2]
    assert "no audio devices" in audio_io.format_devices([])
    from spiritlm_edge.runtime.live import SessionSummary, Turn

    summary = SessionSummary(
        [Turn(np.zeros(1), 1.0, interrupted=True), Turn(np.zeros(1), 5.0)], 12.34, "interrupted", True
    )
    assert str(summary) == "2 turns, 1 interrupted in 12.3 s of audio (ended by Ctrl-C)"
    assert "no speech detected" in str(SessionSummary([], 3.0, "max_seconds", False))


def test_devices_command_runs_without_a_model():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "spiritlm_edge.cli", "devices"], capture_output=True, text=True)
    try:
        audio_io.import_sounddevice()
    except AudioError:
        assert out.returncode == 2 and "error:" in out.stderr
        return
    assert out.returncode == 0, out.stderr
    assert "devices" in out.stdout or "#" in out.stdout
