"""Echo cancellation in simulated rooms: how much of its own voice the live loop still hears.

A loudspeaker plays an answer (the far end); the microphone hears it back through a room
(an impulse response from pyroomacoustics' image-source model, after 10-200 ms of device
and air delay, at -20..+6 dB relative to the user's voice), plus noise, plus sometimes the
user talking over it (double talk). Each candidate canceller gets the microphone and the
exact samples played, block by block as the live loop gives them, and we measure::

    python -m spiritlm_edge.bench.aec                      # every candidate, the table of docs/benchmarks.md
    python -m spiritlm_edge.bench.aec --candidates webrtc  # the one the runtime uses

* ERLE (echo return loss enhancement, dB) while only the far end talks, after the first
  second: 10 log10(power of the microphone / power of the cancelled signal);
* convergence: the first time after which a second of far-end speech has a median ERLE of
  25 dB or more;
* false barge-ins: Silero VAD + the live loop's TurnDetector on the cancelled signal of
  echo-only answers; any SpeechStart is an answer the loop would have cut;
* true barge-ins: the user starts talking during the answer; detected when SpeechStart comes
  within 300 ms of the user's onset; near-end SNR: the cancelled signal against the clean
  voice while the user talks;
* cost: CPU seconds per second of audio.

The same simulation drives tests/test_aec.py.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spiritlm_edge.runtime.audio import SAMPLE_RATE, load_audio
from spiritlm_edge.runtime.audio_io import BLOCK_SAMPLES
from spiritlm_edge.runtime.cpu_buffers import cpu_model

REPO = Path(__file__).resolve().parent.parent
VOICES = REPO / "tests" / "data" / "aec"
CLIP = REPO / "runtime" / "data" / "librispeech-7143-88743-0029.flac"
NEAR_RMS = 0.05  # the user's voice at about -26 dBFS
NOISE_DB = -50.0  # microphone noise relative to the user's voice
CONVERGED_DB = 25.0
BARGE_IN_WINDOW_S = 0.3
QUIET_ECHO_DB = -7.0
MAX_LAG = 480  # samples a canceller may delay its output by (30 ms)


# --------------------------------------------------------------------------- signals


@functools.cache
def voice(name: str) -> np.ndarray:
    """A test voice at 16 kHz: "clip" (LibriSpeech) or a tests/data/aec/*.flac name."""
    path = CLIP if name == "clip" else VOICES / f"{name}.flac"
    return load_audio(path)


FAR_VOICES = ("clip", "far-answer1", "far-answer2")
NEAR_VOICES = ("near-stop", "near-question", "near-no", "near-actually")


def active_rms(x: np.ndarray) -> float:
    """RMS over the 32 ms blocks that carry speech (within 30 dB of the loudest)."""
    n = len(x) // BLOCK_SAMPLES
    power = np.mean(x[: n * BLOCK_SAMPLES].reshape(n, BLOCK_SAMPLES) ** 2, axis=1)
    return float(np.sqrt(np.mean(power[power > power.max() * 1e-3])))


def onset(x: np.ndarray) -> int:
    """First sample of speech (the first above 5% of the peak)."""
    return int(np.argmax(np.abs(x) > 0.05 * np.abs(x).max()))


@dataclass(frozen=True)
class Room:
    """One echo path: loudspeaker -> room -> microphone, after ``delay_ms`` of pure delay."""

    seed: int
    delay_ms: float
    level_db: float  # echo relative to the user's voice
    rt60: float = 0.3

    @staticmethod
    def random(seed: int) -> Room:
        rng = np.random.default_rng(seed)
        return Room(seed, float(rng.uniform(10, 200)), float(rng.uniform(-20, 6)), float(rng.uniform(0.15, 0.5)))

    @functools.cached_property
    def impulse_response(self) -> np.ndarray:
        return room_impulse_response(self.seed, self.delay_ms, self.rt60)


@functools.cache
def room_impulse_response(seed: int, delay_ms: float, rt60: float) -> np.ndarray:
    """A shoebox room's response between a loudspeaker and a microphone 5-40 cm apart (image
    sources, pyroomacoustics), behind ``delay_ms`` of pure delay; unit energy."""
    import pyroomacoustics as pra

    rng = np.random.default_rng(seed)
    dims = rng.uniform([3.0, 3.0, 2.4], [7.0, 6.0, 3.2])
    absorption, max_order = pra.inverse_sabine(rt60, dims)
    room = pra.ShoeBox(dims, fs=SAMPLE_RATE, materials=pra.Material(absorption), max_order=min(max_order, 30))
    speaker = rng.uniform([1.0, 1.0, 1.0], dims - 1.0)
    direction = rng.normal(size=3)
    mic = speaker + direction / np.linalg.norm(direction) * rng.uniform(0.05, 0.4)
    room.add_source(speaker)
    room.add_microphone(mic)
    room.compute_rir()
    rir = np.asarray(room.rir[0][0], dtype=np.float64)
    rir = np.concatenate([np.zeros(round(delay_ms * SAMPLE_RATE / 1000)), rir])
    return (rir / np.sqrt(np.sum(rir**2))).astype(np.float32)


@dataclass
class Scene:
    """What the microphone hears, and its parts."""

    far: np.ndarray  # the samples played
    mic: np.ndarray
    echo: np.ndarray
    near: np.ndarray  # the user's voice as it reaches the microphone (zeros when silent)
    near_onset: int | None  # sample where the user starts talking


def scene(room: Room, far: np.ndarray, near: np.ndarray | None = None, near_at: float = 0.0, seed: int = 0) -> Scene:
    """The microphone signal for ``far`` played in ``room`` (and ``near`` said at ``near_at`` s)."""
    rng = np.random.default_rng(seed)
    n = len(far)
    echo = np.convolve(far, room.impulse_response)[:n]
    echo *= NEAR_RMS * 10 ** (room.level_db / 20) / active_rms(echo)
    user = np.zeros(n, dtype=np.float32)
    first = None
    if near is not None:
        start = round(near_at * SAMPLE_RATE)
        take = min(len(near), n - start)
        user[start : start + take] = near[:take] * (NEAR_RMS / active_rms(near))
        first = start + onset(near)
    noise = rng.normal(0.0, NEAR_RMS * 10 ** (NOISE_DB / 20), n)
    mic = np.clip(echo + user + noise, -1.0, 1.0).astype(np.float32)
    return Scene(far.astype(np.float32), mic, echo.astype(np.float32), user, first)


# --------------------------------------------------------------------------- candidates

Canceller = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (mic block, far block) -> clean block


def webrtc_canceller() -> Canceller:
    """What the runtime uses: runtime.aec.EchoCanceller (WebRTC AEC3 through pywebrtc-audio)."""
    from spiritlm_edge.runtime.aec import EchoCanceller

    return EchoCanceller().process


def livekit_canceller() -> Canceller:
    """WebRTC's audio processing module inside the livekit SDK (10 ms int16 frames)."""
    from livekit import rtc

    apm = rtc.AudioProcessingModule(echo_cancellation=True, high_pass_filter=True)
    frame = SAMPLE_RATE // 100
    pending = np.zeros(0, dtype=np.float32)  # processed samples not returned yet
    queue_mic, queue_far = np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)

    def to_frame(x: np.ndarray) -> rtc.AudioFrame:
        pcm = np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)
        return rtc.AudioFrame(pcm.tobytes(), SAMPLE_RATE, 1, frame)

    def process(mic: np.ndarray, far: np.ndarray) -> np.ndarray:
        nonlocal pending, queue_mic, queue_far
        queue_mic, queue_far = np.concatenate([queue_mic, mic]), np.concatenate([queue_far, far])
        out: list[np.ndarray] = [pending]
        while len(queue_mic) >= frame:
            apm.process_reverse_stream(to_frame(queue_far[:frame]))
            captured = to_frame(queue_mic[:frame])
            apm.process_stream(captured)
            out.append(np.frombuffer(bytes(captured.data), dtype=np.int16).astype(np.float32) / 32768)
            queue_mic, queue_far = queue_mic[frame:], queue_far[frame:]
        done = np.concatenate(out)
        result = np.zeros(len(mic), dtype=np.float32)  # the first call lacks 10 ms of output
        take = min(len(mic), len(done))
        result[len(mic) - take :] = done[:take]
        pending = done[take:]
        return result

    return process


def speexdsp_canceller(filter_ms: float = 500.0) -> Canceller:
    """SpeexDSP's MDF echo canceller + its residual echo suppressor, from the distribution's
    libspeexdsp1 through ctypes (no maintained Python binding ships wheels)."""
    path = ctypes.util.find_library("speexdsp")
    if path is None:
        raise RuntimeError("libspeexdsp not found: apt-get install libspeexdsp1")
    lib = ctypes.CDLL(path)
    lib.speex_echo_state_init.restype = ctypes.c_void_p
    lib.speex_preprocess_state_init.restype = ctypes.c_void_p
    for name in ("speex_echo_cancellation", "speex_echo_ctl", "speex_preprocess_ctl", "speex_preprocess_run"):
        getattr(lib, name).argtypes = None
    frame = BLOCK_SAMPLES // 2  # 256 samples: a power of two suits its FFT
    echo = ctypes.c_void_p(lib.speex_echo_state_init(frame, round(filter_ms * SAMPLE_RATE / 1000)))
    rate = ctypes.c_int(SAMPLE_RATE)
    lib.speex_echo_ctl(echo, 24, ctypes.byref(rate))  # SPEEX_ECHO_SET_SAMPLING_RATE
    pre = ctypes.c_void_p(lib.speex_preprocess_state_init(frame, SAMPLE_RATE))
    lib.speex_preprocess_ctl(pre, 24, echo)  # SPEEX_PREPROCESS_SET_ECHO_STATE
    int16_frame = ctypes.c_int16 * frame

    def process(mic: np.ndarray, far: np.ndarray) -> np.ndarray:
        out = np.empty(len(mic), dtype=np.float32)
        for i in range(0, len(mic), frame):
            rec = int16_frame(*np.clip(np.round(mic[i : i + frame] * 32767), -32768, 32767).astype(np.int16))
            play = int16_frame(*np.clip(np.round(far[i : i + frame] * 32767), -32768, 32767).astype(np.int16))
            res = int16_frame()
            lib.speex_echo_cancellation(echo, rec, play, res)
            lib.speex_preprocess_run(pre, res)
            out[i : i + frame] = np.frombuffer(bytes(res), dtype=np.int16) / 32768
        return out

    return process


CANDIDATES: dict[str, Callable[[], Canceller]] = {
    "webrtc": webrtc_canceller,
    "livekit": livekit_canceller,
    "speexdsp": speexdsp_canceller,
}


def cancel(make: Callable[[], Canceller], s: Scene) -> tuple[np.ndarray, float]:
    """The cancelled microphone signal, block by block as the live loop feeds it, and the CPU
    seconds it took."""
    process = make()
    n = len(s.mic) // BLOCK_SAMPLES * BLOCK_SAMPLES
    out = np.zeros(len(s.mic), dtype=np.float32)
    cpu = time.process_time()
    for i in range(0, n, BLOCK_SAMPLES):
        out[i : i + BLOCK_SAMPLES] = process(s.mic[i : i + BLOCK_SAMPLES], s.far[i : i + BLOCK_SAMPLES])
    return out, time.process_time() - cpu


# --------------------------------------------------------------------------- measures


def erle_windows(s: Scene, out: np.ndarray, window_s: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """(start time, ERLE dB) of each window where the echo carries far-end speech and the user is silent."""
    w = round(window_s * SAMPLE_RATE)
    end = len(out) if s.near_onset is None else s.near_onset
    starts, values = [], []
    echo_floor = np.mean(s.echo**2) * 0.1
    for i in range(0, end - w + 1, w):
        echo = np.mean(s.echo[i : i + w] ** 2)
        if echo < echo_floor:
            continue  # a pause in the answer: nothing to cancel
        values.append(10 * np.log10(np.mean(s.mic[i : i + w] ** 2) / max(np.mean(out[i : i + w] ** 2), 1e-12)))
        starts.append(i / SAMPLE_RATE)
    return np.array(starts), np.array(values)


def convergence_s(starts: np.ndarray, erle: np.ndarray, target: float = CONVERGED_DB) -> float:
    """The first window start after which a second of far-end speech has median ERLE >= target."""
    for t in starts:
        ahead = erle[(starts >= t) & (starts < t + 1.0)]
        if len(ahead) >= 2 and np.median(ahead) >= target:
            return float(t)
    return float("inf")


def speech_starts(vad, signal: np.ndarray) -> list[float]:
    """Times (s, at the end of the triggering block) of each SpeechStart the live loop's
    TurnDetector reports on ``signal``."""
    from spiritlm_edge.runtime.vad import SpeechStart, TurnDetector

    detector = TurnDetector()
    vad.reset()
    times = []
    for i in range(0, len(signal) - BLOCK_SAMPLES + 1, BLOCK_SAMPLES):
        block = signal[i : i + BLOCK_SAMPLES]
        if isinstance(detector.feed(block, vad(block)), SpeechStart):
            times.append((i + BLOCK_SAMPLES) / SAMPLE_RATE)
    return times


def near_snr_db(s: Scene, out: np.ndarray) -> float:
    """SNR of the cancelled signal against the clean user's voice, while the user talks."""
    assert s.near_onset is not None
    start, end = s.near_onset, min(len(out) - MAX_LAG, s.near_onset + 2 * SAMPLE_RATE)
    clean = s.near[start:end]
    # The canceller may delay its output (10 ms framing): compare at the best-matching lag.
    lag = max(range(MAX_LAG), key=lambda k: float(np.dot(out[start + k : end + k], clean)))
    return float(10 * np.log10(np.sum(clean**2) / max(np.sum((out[start + lag : end + lag] - clean) ** 2), 1e-12)))


def vad_agreement(vad, s: Scene, out: np.ndarray) -> float:
    """Of the blocks where the VAD hears the clean user, the share it still hears after cancelling."""
    clean = vad.probabilities(s.near) >= 0.5
    heard = vad.probabilities(out) >= 0.5
    n = min(len(clean), len(heard))
    return float(np.mean(heard[:n][clean[:n]])) if clean.any() else 1.0


# --------------------------------------------------------------------------- experiments


def far_signal(i: int) -> np.ndarray:
    return voice(FAR_VOICES[i % len(FAR_VOICES)])


def echo_only(make: Callable[[], Canceller], rooms: list[Room], vad=None) -> dict:
    """Far-end-only answers: ERLE after the first second, convergence, false barge-ins."""
    erle, converged, false_barge_ins, cpu, seconds = [], [], 0, 0.0, 0.0
    for i, room in enumerate(rooms):
        s = scene(room, far_signal(i), seed=room.seed)
        out, spent = cancel(make, s)
        cpu, seconds = cpu + spent, seconds + len(s.mic) / SAMPLE_RATE
        starts, values = erle_windows(s, out)
        erle.append(float(np.median(values[starts >= 1.0])))
        converged.append(convergence_s(starts, values))
        if vad is not None:
            false_barge_ins += len(speech_starts(vad, out)) > 0
    return {
        "answers": len(rooms),
        "erle_median_db": float(np.median(erle)),
        "erle_worst_db": float(np.min(erle)),
        "convergence_median_s": float(np.median(converged)),
        "convergence_worst_s": float(np.max(converged)),
        "converged_within_1s_share": float(np.mean(np.array(converged) <= 1.0)),
        "false_barge_ins": false_barge_ins if vad is not None else None,
        "cpu_per_audio_s": cpu / seconds,
    }


def double_talk(make: Callable[[], Canceller], rooms: list[Room], vad) -> dict:
    """The user talks over the answer: barge-ins within 300 ms, near-end SNR, VAD agreement."""
    detected, early, latencies, snr, agreement = 0, 0, [], [], []
    quiet_echo, quiet_detected, within_1500ms = 0, 0, 0
    for i, room in enumerate(rooms):
        rng = np.random.default_rng(room.seed + 1000)
        near = voice(NEAR_VOICES[i % len(NEAR_VOICES)])
        s = scene(room, far_signal(i), near, near_at=float(rng.uniform(2.0, 6.0)), seed=room.seed)
        out, _ = cancel(make, s)
        assert s.near_onset is not None
        onset_s = s.near_onset / SAMPLE_RATE
        times = speech_starts(vad, out)
        early += any(t < onset_s for t in times)
        hits = [t - onset_s for t in times if onset_s <= t <= onset_s + BARGE_IN_WINDOW_S]
        if hits:
            detected += 1
            latencies.append(hits[0])
        if room.level_db <= QUIET_ECHO_DB:
            quiet_echo += 1
            quiet_detected += bool(hits)
        within_1500ms += any(onset_s <= t <= onset_s + 1.5 for t in times)
        snr.append(near_snr_db(s, out))
        agreement.append(vad_agreement(vad, s, out))
    return {
        "answers": len(rooms),
        "barge_ins_detected": detected,
        "detected_share": detected / len(rooms),
        "barge_in_latency_median_ms": float(np.median(latencies) * 1000) if latencies else None,
        # the echo at the microphone weaker than the user by QUIET_ECHO_DB or more
        "quiet_echo_answers": quiet_echo,
        "quiet_echo_detected_share": quiet_detected / quiet_echo if quiet_echo else None,
        "detected_within_1500ms_share": within_1500ms / len(rooms),
        "false_barge_ins_before_onset": early,
        "near_snr_median_db": float(np.median(snr)),
        "vad_agreement_median": float(np.median(agreement)),
    }


def no_canceller() -> Canceller:
    return lambda mic, far: mic


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", default="none,webrtc,livekit,speexdsp")
    parser.add_argument("--rooms", type=int, default=50, help="echo-only answers (and as many double-talk ones)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from spiritlm_edge.runtime.vad import SileroVAD

    vad = SileroVAD()
    rooms = [Room.random(seed) for seed in range(args.rooms)]
    makers = {"none": no_canceller, **CANDIDATES}
    results: dict[str, dict] = {}
    for name in args.candidates.split(","):
        started = time.perf_counter()
        results[name] = {
            "echo_only": echo_only(makers[name], rooms, vad),
            "double_talk": double_talk(makers[name], rooms, vad),
        }
        results[name]["wall_s"] = time.perf_counter() - started
        if not args.json:
            print(name, json.dumps(results[name], indent=1), flush=True)
    results["machine"] = {"cpu": cpu_model(), "python": platform.python_version()}
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
