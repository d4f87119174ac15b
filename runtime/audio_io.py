"""Live audio devices: a microphone that yields 512-sample blocks and a speaker that can be
cut off mid-word.

An input device, once started, returns consecutive blocks of float32 mono 16 kHz samples
from :meth:`AudioInput.read` (``BLOCK_SAMPLES`` each, the window Silero VAD takes), or
None when its stream has ended. An output device queues samples with
:meth:`AudioOutput.play`, drops everything still queued with :meth:`AudioOutput.stop`
(barge-in) and says whether it has played everything with :meth:`AudioOutput.idle`.
Both are context managers (``with`` starts and closes them).

:class:`SoundDeviceInput` / :class:`SoundDeviceOutput` use PortAudio through
``sounddevice`` (the ``mic`` extra), resampling with soxr when the device does not run at
16 kHz. :class:`ScriptedInput` / :class:`RecordingOutput` stand in for them in tests and
demos: they keep real time, or a multiple of it.
"""

from __future__ import annotations

import collections
import importlib
import logging
import queue
import threading
import time
from typing import Any

import numpy as np

from spiritlm_edge.runtime.audio import SAMPLE_RATE
from spiritlm_edge.runtime.errors import AudioError

log = logging.getLogger(__name__)

BLOCK_SAMPLES = 512  # 32 ms at 16 kHz
LIST_DEVICES_HINT = "List the devices with `spiritlm-edge devices` (or `spiritlm-edge run --list-devices`)"
# A started microphone that delivers nothing for this long is broken or muted by the system.
STALL_SECONDS = 3.0


class AudioInput:
    """A source of ``BLOCK_SAMPLES``-sample float32 mono 16 kHz blocks."""

    sample_rate = SAMPLE_RATE
    block_samples = BLOCK_SAMPLES

    @property
    def latency(self) -> float:
        """Seconds between a sound reaching the microphone and its block being readable (as the
        device reports it; echo cancellation aligns its reference with it)."""
        return 0.0

    def start(self) -> None:
        pass

    def read(self) -> np.ndarray | None:
        """The next block (waits for it), or None once the input has ended."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AudioOutput:
    """A sink that plays queued float32 mono 16 kHz samples in order."""

    sample_rate = SAMPLE_RATE

    def __init__(self):
        self._buffer = _PlaybackBuffer()
        # Every sample handed to the device, silence included: echo cancellation's far end.
        self.reference = FarEndReference()

    @property
    def latency(self) -> float:
        """Seconds between a sample being handed to the device and it leaving the speaker."""
        return 0.0

    def start(self) -> None:
        pass

    def play(self, samples: np.ndarray) -> None:
        """Queue ``samples`` after whatever is still playing; returns at once."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if samples.size:
            self._buffer.push(samples)

    def flush(self) -> None:
        """No more samples follow for now (lets a resampler emit its tail)."""

    def stop(self) -> None:
        """Drop everything not played yet; silence follows within one device block."""
        self._buffer.clear()

    def idle(self) -> bool:
        """True when every queued sample has been handed to the device."""
        return self._buffer.empty()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until idle (True) or ``timeout`` seconds have passed (False)."""
        return self._buffer.wait_empty(timeout)

    def close(self) -> None:
        self.stop()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _PlaybackBuffer:
    """Queued samples shared between ``play`` (any thread) and the device's pull."""

    def __init__(self):
        self._chunks: collections.deque = collections.deque()
        self._offset = 0  # samples of _chunks[0] already pulled
        self._lock = threading.Lock()
        self._empty = threading.Condition(self._lock)

    def push(self, samples: np.ndarray) -> None:
        with self._lock:
            self._chunks.append(samples)

    def clear(self) -> None:
        with self._lock:
            self._chunks.clear()
            self._offset = 0
            self._empty.notify_all()

    def empty(self) -> bool:
        with self._lock:
            return not self._chunks

    def wait_empty(self, timeout: float | None) -> bool:
        with self._lock:
            return self._empty.wait_for(lambda: not self._chunks, timeout)

    def pull(self, out: np.ndarray) -> int:
        """Fill ``out`` with queued samples, zeros after them; returns how many were real."""
        filled = 0
        with self._lock:
            while filled < len(out) and self._chunks:
                chunk = self._chunks[0]
                take = min(len(out) - filled, len(chunk) - self._offset)
                out[filled : filled + take] = chunk[self._offset : self._offset + take]
                filled += take
                self._offset += take
                if self._offset == len(chunk):
                    self._chunks.popleft()
                    self._offset = 0
            if not self._chunks:
                self._empty.notify_all()
        out[filled:] = 0.0
        return filled


class FarEndReference:
    """What an output device was handed, sample by sample on one continuous timeline (silence
    included), for echo cancellation.

    The device side calls :meth:`write` with each block it hands to the device (at its own
    rate: resampled here to 16 kHz). The loop calls :meth:`read` once per microphone block
    with the two devices' latencies: the first read (and any read after the timelines
    drifted apart by more than ``RESYNC_SECONDS`` for ``RESYNC_READS`` reads in a row: a
    stalled or restarted device; a host API that hands out several blocks at once makes
    shorter swings)
    places the read position ``lag`` behind the newest sample written; later reads continue
    exactly where the previous one ended, so that the canceller sees a steady delay.
    ``breaks`` counts the times the echo path may have jumped (resyncs, and underruns the
    device reported through :meth:`mark_break`): an echo canceller should start afresh
    then, which re-converges faster than it re-learns a shifted path.
    """

    CAPACITY_SECONDS = 4.0
    RESYNC_SECONDS = 0.2
    RESYNC_READS = 8

    def __init__(self):
        self._ring = np.zeros(int(self.CAPACITY_SECONDS * SAMPLE_RATE), dtype=np.float32)
        self._written = 0  # samples written since the start, on the 16 kHz timeline
        self._cursor: int | None = None  # next sample read() returns
        self._drifting = 0  # reads in a row that found the cursor out of place
        self._lock = threading.Lock()
        self._resampler = None
        self._rate = SAMPLE_RATE
        self.resyncs = 0  # times read() had to jump: underruns, device restarts
        self.breaks = 0

    def mark_break(self) -> None:
        """The device played something else than it was handed (an underrun), or restarted."""
        self.breaks += 1

    @property
    def written(self) -> int:
        return self._written

    def write(self, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if rate != SAMPLE_RATE:
            if self._resampler is None or rate != self._rate:
                import soxr

                self._resampler, self._rate = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32"), rate
            samples = self._resampler.resample_chunk(samples)
        with self._lock:
            n, size = len(samples), len(self._ring)
            if n >= size:
                samples, n = samples[-size:], size
            start = self._written % size
            first = min(n, size - start)
            self._ring[start : start + first] = samples[:first]
            self._ring[: n - first] = samples[first:]
            self._written += n

    def read(self, n: int, lag: int = 0) -> np.ndarray:
        """The ``n`` samples after the previous read; zeros for what was never written."""
        with self._lock:
            expected = self._written - lag - n
            off = self._cursor is not None and abs(self._cursor - expected) > self.RESYNC_SECONDS * SAMPLE_RATE
            self._drifting = self._drifting + 1 if off else 0
            if self._cursor is None or self._drifting >= self.RESYNC_READS:
                self._drifting = 0
                if self._cursor is not None:
                    self.resyncs += 1
                    self.breaks += 1
                    log.info(
                        "echo reference realigned by %+.0f ms (output underrun or device restart)",
                        (expected - self._cursor) * 1000 / SAMPLE_RATE,
                    )
                self._cursor = expected
            start, self._cursor = self._cursor, self._cursor + n
            out = np.zeros(n, dtype=np.float32)
            size = len(self._ring)
            lo, hi = max(start, self._written - size, 0), min(start + n, self._written)
            if lo < hi:
                idx = np.arange(lo, hi) % size
                out[lo - start : hi - start] = self._ring[idx]
            return out


# --------------------------------------------------------------------------- scripted devices


class ScriptedInput(AudioInput):
    """Plays scheduled utterances over silence (plus optional noise), at ``speed`` times real
    time, like a microphone would deliver them.

    ``ScriptedInput(clip, at=0.5, speed=4).add(other, at=12.0)`` gives silence, ``clip`` from
    0.5 s, ``other`` from 12 s of stream time, then silence; ``duration`` ends the stream
    (read() returns None), and ``interrupt_at`` raises KeyboardInterrupt from read() at that
    stream time, as Ctrl-C would.
    """

    def __init__(
        self,
        audio: np.ndarray | None = None,
        at: float = 0.5,
        speed: float = 1.0,
        duration: float | None = None,
        noise: float = 0.0,
        interrupt_at: float | None = None,
        seed: int = 0,
    ):
        if speed <= 0:
            raise AudioError(f"ScriptedInput speed {speed} must be positive.")
        self.speed = speed
        self.duration = duration
        self.noise = noise
        self.interrupt_at = interrupt_at
        self._rng = np.random.default_rng(seed)
        self._events: list[tuple[int, np.ndarray]] = []
        self.position = 0  # samples delivered so far
        self._t0: float | None = None
        if audio is not None:
            self.add(audio, at)

    def add(self, audio: np.ndarray, at: float) -> ScriptedInput:
        """Schedule ``audio`` (16 kHz) to start ``at`` seconds into the stream."""
        self._events.append((round(at * SAMPLE_RATE), np.asarray(audio, dtype=np.float32).reshape(-1)))
        return self

    @property
    def seconds(self) -> float:
        return self.position / SAMPLE_RATE

    def start(self) -> None:
        self._t0 = time.monotonic()
        self.position = 0

    def read(self) -> np.ndarray | None:
        if self._t0 is None:
            self.start()
        assert self._t0 is not None
        start, end = self.position, self.position + BLOCK_SAMPLES
        if self.interrupt_at is not None and start >= self.interrupt_at * SAMPLE_RATE:
            raise KeyboardInterrupt
        if self.duration is not None and end > self.duration * SAMPLE_RATE:
            return None
        # A block is there once its last sample has been "spoken".
        delay = self._t0 + end / (SAMPLE_RATE * self.speed) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        block = np.zeros(BLOCK_SAMPLES, dtype=np.float32)
        if self.noise:
            block += self._rng.normal(0.0, self.noise, BLOCK_SAMPLES).astype(np.float32)
        for offset, audio in self._events:
            lo, hi = max(start, offset), min(end, offset + len(audio))
            if lo < hi:
                block[lo - start : hi - start] += audio[lo - offset : hi - offset]
        self.position = end
        return block


class RecordingOutput(AudioOutput):
    """Plays into memory at ``speed`` times real time: ``played`` holds every sample that got
    "played", ``log`` (monotonic time, samples played so far) per device block, ``stops`` the
    times stop() cut queued audio off."""

    def __init__(self, speed: float = 1.0, block_samples: int = BLOCK_SAMPLES):
        super().__init__()
        self.speed = speed
        self.block_samples = block_samples
        self._played: list[np.ndarray] = []
        self.log: list[tuple[float, int]] = []
        self.stops: list[float] = []
        self.dropped = 0  # samples queued but never played because of stop()
        self._stop_thread = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def played(self) -> np.ndarray:
        return np.concatenate(self._played) if self._played else np.zeros(0, dtype=np.float32)

    def start(self) -> None:
        if self._thread is None:
            self._stop_thread.clear()
            self._thread = threading.Thread(target=self._run, name="RecordingOutput", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._buffer._lock:
            queued = sum(len(c) for c in self._buffer._chunks) - self._buffer._offset
        self.dropped += queued
        if queued:
            self.stops.append(time.monotonic())
        super().stop()

    def close(self) -> None:
        super().close()
        self._stop_thread.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        period = self.block_samples / (SAMPLE_RATE * self.speed)
        out = np.zeros(self.block_samples, dtype=np.float32)
        total = 0
        next_tick = time.monotonic()
        while not self._stop_thread.is_set():
            n = self._buffer.pull(out)
            self.reference.write(out)
            if n:
                self._played.append(out[:n].copy())
                total += n
                self.log.append((time.monotonic(), total))
            next_tick += period
            delay = next_tick - time.monotonic()
            if delay > 0:
                self._stop_thread.wait(delay)
            else:
                next_tick = time.monotonic()


# --------------------------------------------------------------------------- PortAudio devices


def import_sounddevice():
    """The ``sounddevice`` module, or an AudioError saying what to install."""
    try:
        return importlib.import_module("sounddevice")
    except ImportError:
        raise AudioError("Live audio needs the sounddevice package: pip install 'spiritlm-edge[mic]'.") from None
    except OSError as exc:  # sounddevice raises OSError when libportaudio is missing
        raise AudioError(
            f"sounddevice cannot load PortAudio ({exc}). Install it: `sudo apt-get install "
            "libportaudio2` (Debian/Ubuntu/Jetson), `brew install portaudio` (macOS)."
        ) from None


def list_devices() -> list[dict]:
    """Every PortAudio device: index, name, host API, input/output channels, default rate, and
    whether it is the default input/output."""
    sd = import_sounddevice()
    try:
        devices = sd.query_devices()
        default_in, default_out = sd.default.device
        hostapis = sd.query_hostapis()
    except sd.PortAudioError as exc:
        raise AudioError(f"PortAudio cannot list audio devices ({exc}).") from None
    return [
        {
            "index": d["index"],
            "name": d["name"],
            "hostapi": hostapis[d["hostapi"]]["name"],
            "inputs": d["max_input_channels"],
            "outputs": d["max_output_channels"],
            "default_samplerate": d["default_samplerate"],
            "default_input": d["index"] == default_in,
            "default_output": d["index"] == default_out,
        }
        for d in devices
    ]


def format_devices(devices: list[dict]) -> str:
    """A table of :func:`list_devices`' output, marking the defaults with > (input) and < (output)."""
    if not devices:
        return "PortAudio sees no audio devices (none connected, or no permission to use them)."
    lines = [" #  in out  rate   name (host API)"]
    for d in devices:
        mark = (">" if d["default_input"] else " ") + ("<" if d["default_output"] else " ")
        lines.append(
            f"{mark}{d['index']:>2} {d['inputs']:>3} {d['outputs']:>3} {d['default_samplerate'] / 1000:>5.1f}k "
            f"{d['name']} ({d['hostapi']})"
        )
    lines.append(
        "> default input, < default output; pass an index or part of a name to --input-device / --output-device"
    )
    return "\n".join(lines)


def _parse_device(device):
    """``--input-device 3`` means index 3; anything else is a (part of a) device name."""
    if isinstance(device, str) and device.strip().lstrip("-").isdigit():
        return int(device)
    return device


def _open_params(sd, device, kind: str) -> tuple[object, int, str]:
    """(device for sounddevice, sample rate to open it at, its name) for one direction."""
    device = _parse_device(device)
    try:
        info = sd.query_devices(device, kind=kind)
    except (ValueError, sd.PortAudioError) as exc:
        if device is None:
            raise AudioError(
                f"No audio {kind} device found ({exc}). Plug in / enable a "
                f"{'microphone' if kind == 'input' else 'speaker or headphones'}, check that "
                f"PortAudio (libportaudio2) sees it; {LIST_DEVICES_HINT}."
            ) from None
        raise AudioError(
            f"Audio {kind} device {device!r} not usable ({exc}). {LIST_DEVICES_HINT} and pass "
            f"--{kind}-device with an index or a unique part of a name."
        ) from None
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    try:  # most devices run at 16 kHz natively or through the host API's converter
        check(device=info["index"], samplerate=SAMPLE_RATE, channels=1, dtype="float32")
        rate = SAMPLE_RATE
    except Exception:  # PortAudioError "Invalid sample rate" and friends: resample ourselves
        rate = int(info["default_samplerate"])
    return info["index"], rate, info["name"]


class SoundDeviceInput(AudioInput):
    """A microphone through PortAudio; blocks come out at 16 kHz whatever the device's rate."""

    def __init__(self, device: int | str | None = None):
        self.device = device
        self._queue: queue.Queue = queue.Queue()
        self._stream: Any = None  # a sounddevice stream once started
        self._resampler = None
        self._pending = np.zeros(0, dtype=np.float32)
        self.overflows = 0

    def start(self) -> None:
        sd = import_sounddevice()
        index, rate, name = _open_params(sd, self.device, "input")
        if rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        device_block = max(1, round(BLOCK_SAMPLES * rate / SAMPLE_RATE))
        try:
            self._stream = sd.InputStream(
                device=index,
                samplerate=rate,
                channels=1,
                dtype="float32",
                blocksize=device_block,
                callback=self._callback,
            )
            self._stream.start()
        except Exception as exc:
            self._stream = None
            raise AudioError(f"Cannot open microphone {name!r} at {rate} Hz ({exc}). {LIST_DEVICES_HINT}.") from None
        log.info("microphone: %s at %d Hz", name, rate)

    @property
    def latency(self) -> float:
        # PortAudio's input latency, plus what waits in our queue when the loop runs late.
        if self._stream is None:
            return 0.0
        queued = self._queue.qsize() * self._stream.blocksize / self._stream.samplerate
        return float(self._stream.latency) + queued + len(self._pending) / SAMPLE_RATE

    def _callback(self, indata, frames, time_info, status) -> None:
        if status.input_overflow:
            self.overflows += 1
        self._queue.put(indata[:, 0].copy())

    def read(self) -> np.ndarray | None:
        if self._stream is None:
            self.start()
        waited = 0.0
        while len(self._pending) < BLOCK_SAMPLES:
            try:
                # Short timeouts keep the main thread responsive to Ctrl-C.
                data = self._queue.get(timeout=0.1)
            except queue.Empty:
                waited += 0.1
                if waited >= STALL_SECONDS:
                    raise AudioError(
                        f"The microphone delivered no audio for {STALL_SECONDS:.0f} s; it may be "
                        f"muted, unplugged or in use by another program. {LIST_DEVICES_HINT}."
                    ) from None
                continue
            if self._resampler is not None:
                data = self._resampler.resample_chunk(data)
            self._pending = np.concatenate([self._pending, data])
        block, self._pending = self._pending[:BLOCK_SAMPLES], self._pending[BLOCK_SAMPLES:]
        return block

    def close(self) -> None:
        if self._stream is not None:
            try:
                self._stream.abort()
                self._stream.close()
            finally:
                self._stream = None
        if self.overflows:
            log.warning("the microphone overflowed %d times (the CPU was too busy to keep up)", self.overflows)


class SoundDeviceOutput(AudioOutput):
    """A speaker through PortAudio; stop() silences it within one device block (32 ms)."""

    def __init__(self, device: int | str | None = None):
        super().__init__()
        self.device = device
        self._stream: Any = None  # a sounddevice stream once started
        self._rate = SAMPLE_RATE
        self._resampler = None
        self._resample_lock = threading.Lock()
        self._started = False

    def start(self) -> None:
        sd = import_sounddevice()
        index, self._rate, name = _open_params(sd, self.device, "output")
        self._new_resampler()
        try:
            # The stream runs for the whole session and plays zeros when idle, so that a new
            # answer starts without the latency of opening a stream.
            self._stream = sd.OutputStream(
                device=index,
                samplerate=self._rate,
                channels=1,
                dtype="float32",
                blocksize=max(1, round(BLOCK_SAMPLES * self._rate / SAMPLE_RATE)),
                callback=self._callback,
            )
            self._stream.start()
        except Exception as exc:
            self._stream = None
            raise AudioError(
                f"Cannot open audio output {name!r} at {self._rate} Hz ({exc}). {LIST_DEVICES_HINT}."
            ) from None
        log.info("speaker: %s at %d Hz", name, self._rate)
        if self._started:
            self.reference.mark_break()  # a restarted device: the echo path starts anew
        self._started = True

    def _new_resampler(self) -> None:
        if self._rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(SAMPLE_RATE, self._rate, 1, dtype="float32", quality="HQ")

    @property
    def latency(self) -> float:
        return 0.0 if self._stream is None else float(self._stream.latency)

    def _callback(self, outdata, frames, time_info, status) -> None:
        self._buffer.pull(outdata[:, 0])
        if getattr(status, "output_underflow", False):
            self.reference.mark_break()
        self.reference.write(outdata[:, 0], self._rate)

    def play(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._resampler is not None:
            with self._resample_lock:
                samples = self._resampler.resample_chunk(samples)
        super().play(samples)

    def flush(self) -> None:
        if self._resampler is not None:
            with self._resample_lock:
                tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
                self._new_resampler()
            super().play(tail)

    def stop(self) -> None:
        super().stop()
        with self._resample_lock:
            self._new_resampler()  # forget the interrupted answer's filter state

    def close(self) -> None:
        self.stop()
        if self._stream is not None:
            try:
                self._stream.abort()
                self._stream.close()
            finally:
                self._stream = None
