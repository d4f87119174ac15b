"""Acoustic echo cancellation: the live loop hears the user, not its own answer.

A robot or a kiosk plays the answer through a loudspeaker a few centimetres from its
microphone; without cancellation the VAD hears the answer and interrupts it. spiritlm-edge
makes every sample it plays, so it has the exact far-end reference: :class:`EchoCanceller`
takes each microphone block with the samples that were playing when it was captured and
returns the block without the echo, for the VAD and the turn logic.

The canceller is WebRTC's AEC3 (the one in Chrome), through the ``pywebrtc-audio`` binding
(wheels for Linux x86_64 / aarch64, macOS and Windows; the ``mic`` extra installs it). It
was chosen over SpeexDSP and over the livekit SDK's copy of the same module by the
simulated-room measurements of ``python -m spiritlm_edge.bench.aec`` (docs/benchmarks.md).

Alignment: the echo of a sample reaches the microphone after the output device's latency,
the air and the input device's latency. The loop places the reference by half of what
PortAudio reports for the two devices (:class:`~spiritlm_edge.runtime.audio_io.FarEndReference`;
half, because an echo that comes before its reference cannot be cancelled and the reported
figures are often upper bounds); the rest (the room, buffers PortAudio does not know about)
is left to AEC3's own delay estimator. After an output underrun or a restarted device the loop
restarts the canceller, which converges again faster than AEC3 re-learns a shifted path. To
say in the logs what delay there is, :class:`EchoCanceller` also measures it: a
cross-correlation (GCC-PHAT) of the reference with the microphone over windows of far-end
speech.
"""

from __future__ import annotations

import importlib
import logging

import numpy as np

from spiritlm_edge.runtime.audio import SAMPLE_RATE
from spiritlm_edge.runtime.errors import AudioError

log = logging.getLogger(__name__)

FRAME_SAMPLES = SAMPLE_RATE // 100  # AEC3 works on 10 ms frames
# The loop's 512-sample blocks are not whole frames: the output lags the input by this much
# so that a full block is always ready (512 mod 160 leaves at most 128 samples waiting).
LATENCY_SAMPLES = 128
# The delay measurement: a window of this much audio, searched for echoes this late.
DELAY_WINDOW_S = 2.0
MAX_DELAY_S = 0.5
EARLY_S = 0.2

INSTALL_HINT = (
    "Echo cancellation needs the pywebrtc-audio package (WebRTC's AEC3): pip install 'spiritlm-edge[mic]' "
    "or pip install pywebrtc-audio. Where it has no wheel, run with --aec off and use headphones, a "
    "speakerphone with its own echo cancellation, or --no-barge-in."
)


def check_available() -> None:
    """Raise AudioError saying what to install when the AEC library is missing."""
    _aec3_class()


def _aec3_class():
    try:
        return importlib.import_module("pywebrtc_audio").EchoCanceller
    except ImportError:
        raise AudioError(INSTALL_HINT) from None


class EchoCanceller:
    """Removes the loudspeaker's echo from microphone blocks (16 kHz mono float32).

    >>> aec = EchoCanceller()
    >>> clean = aec.process(mic_block, far_block)  # same length as mic_block, every block in order

    ``far_block``: the samples that were leaving the loudspeaker while ``mic_block`` was
    captured (zeros while nothing plays), as aligned as the device latencies allow.
    ``device_delay_ms``: the latency already removed by that alignment, only for the log.
    The output is ``LATENCY_SAMPLES`` (8 ms) behind the input.
    """

    latency_samples = LATENCY_SAMPLES

    def __init__(self, device_delay_ms: float = 0.0):
        self._aec = _aec3_class()(sample_rate=SAMPLE_RATE, num_channels=1, stream_delay_ms=0)
        self.device_delay_ms = device_delay_ms
        self.delay = _DelayMeter()
        self.reset()

    def reset(self) -> None:
        """Forget the echo path (it jumped: an underrun, a restarted device). The output keeps
        its latency; the delay measurement goes on."""
        self._aec.reset()
        self._mic = np.zeros(0, dtype=np.float32)
        self._far = np.zeros(0, dtype=np.float32)
        self._out = np.zeros(LATENCY_SAMPLES, dtype=np.float32)

    def process(self, mic: np.ndarray, far: np.ndarray) -> np.ndarray:
        mic = np.asarray(mic, dtype=np.float32).reshape(-1)
        far = np.asarray(far, dtype=np.float32).reshape(-1)
        if mic.shape != far.shape:
            raise AudioError(
                f"Echo cancellation needs as many far-end samples as microphone samples; "
                f"got {far.shape} and {mic.shape}."
            )
        if not (np.isfinite(mic).all() and np.isfinite(far).all()):
            raise AudioError("Echo cancellation got NaN or infinite samples.")
        self._mic = np.concatenate([self._mic, mic])
        self._far = np.concatenate([self._far, far])
        whole = len(self._mic) // FRAME_SAMPLES * FRAME_SAMPLES
        if whole:
            done = self._aec.process(self._mic[:whole], self._far[:whole])
            self._mic, self._far = self._mic[whole:], self._far[whole:]
            self._out = np.concatenate([self._out, done])
        out, self._out = self._out[: len(mic)], self._out[len(mic) :]
        found = self.delay.feed(mic, far)
        if found is not None and found < 0:
            log.warning(
                "the echo arrives %.0f ms before its reference: the devices overstate their latency "
                "(%.0f ms assumed); echo cancellation cannot work like this",
                -found,
                self.device_delay_ms,
            )
        elif found is not None:
            log.info(
                "echo delay: %.0f ms in all, %.0f ms of it device latency the reference was aligned by, "
                "%.0f ms left to AEC3's delay estimator",
                self.device_delay_ms + found,
                self.device_delay_ms,
                found,
            )
        return out


class _DelayMeter:
    """Where the echo of the reference is in the microphone: GCC-PHAT over windows of far-end
    speech. ``feed`` returns the delay in ms when a new, clear estimate differs from the last
    one reported by more than 5 ms, else None."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.delay_ms: float | None = None
        self._mic: list[np.ndarray] = []
        self._far: list[np.ndarray] = []
        self._samples = 0

    def feed(self, mic: np.ndarray, far: np.ndarray) -> float | None:
        if not np.any(far):
            return None  # nothing playing: nothing to find
        self._mic.append(mic)
        self._far.append(far)
        self._samples += len(mic)
        if self._samples < DELAY_WINDOW_S * SAMPLE_RATE:
            return None
        mic_w, far_w = np.concatenate(self._mic), np.concatenate(self._far)
        self._mic, self._far, self._samples = [], [], 0
        n = 1 << int(np.ceil(np.log2(2 * len(mic_w))))
        cross = np.fft.rfft(mic_w, n) * np.conj(np.fft.rfft(far_w, n))
        corr = np.fft.irfft(cross / np.maximum(np.abs(cross), 1e-12), n)
        # lags from -EARLY_S (an echo before its reference: overstated device latencies) to MAX_DELAY_S
        early = int(EARLY_S * SAMPLE_RATE)
        corr = np.concatenate([corr[n - early :], corr[: int(MAX_DELAY_S * SAMPLE_RATE)]])
        peak = int(np.argmax(corr))
        if corr[peak] < 8 * np.std(corr):
            return None  # no clear echo (quiet loudspeaker, double talk)
        found = (peak - early) * 1000 / SAMPLE_RATE
        if self.delay_ms is not None and abs(found - self.delay_ms) <= 5:
            return None
        self.delay_ms = found
        return found
