"""The live conversation loop behind ``spiritlm-edge run --mic``.

Behaviour (one small state machine, driven by microphone blocks of 32 ms):

``listening``
    Every block goes through the VAD and the :class:`TurnDetector`. When the user has
    spoken and then been silent for ``end_silence_ms``, the utterance (with some padding)
    goes to ``respond(audio)`` in a worker thread and the loop moves to ``responding``.
``responding``
    The worker runs the (slow) ``respond`` generator and hands its events to the main
    thread through a queue: text goes to ``on_text`` as it comes, audio chunks are played
    as they stream. The microphone and the VAD keep running. The turn is over when the
    generator is exhausted and the speaker has played everything; then ``listening``.
``barge-in``
    If the user speaks for ``barge_in_min_ms`` while the loop is ``responding``, playback is
    cut at once, the generator is abandoned (closed in its worker at its next yield) and the
    loop is back to listening, already inside the new utterance: the speech that triggered
    the barge-in, with its pre-roll, is the start of the next turn. Shorter speech (an
    "mm-hmm") does not cut the answer. ``barge_in=False`` ignores the microphone while
    answering instead (for speakers without echo cancellation, where the answer itself
    would trigger a barge-in).

The turn-taking rules live in :class:`~spiritlm_edge.runtime.turns.TurnTaking`, shared
with the Realtime server; this module adds the devices, the worker and playback.

Streaming encoding (``listen``, e.g. ``Conversation.listen``; on by default in
``spiritlm-edge run --mic``): from the moment speech is confirmed (or, during an answer,
from the barge-in) the utterance is fed to a
:class:`~spiritlm_edge.runtime.pipeline.Listening`, which encodes and prefills it in its
own thread while the user speaks; at the end of the turn the worker answers with
``listening.respond(audio)`` and only the last chunk is left to encode and prefill. The
microphone loop only appends blocks to it: it never waits for the model.

The session ends after ``max_seconds`` of audio, after ``max_turns`` answered turns, when
the input ends, or on Ctrl-C; every case stops the devices and joins the worker. A failure
inside ``respond`` ends the session and is raised again in the caller's thread.

Echo cancellation (``aec``, an :class:`~spiritlm_edge.runtime.aec.EchoCanceller`): every
microphone block first goes through the canceller with the samples the speaker was playing
when it was captured (the output's :class:`~spiritlm_edge.runtime.audio_io.FarEndReference`,
placed by the two devices' reported latencies), so the VAD and the turn logic hear the user
and not the answer coming back from the loudspeaker.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spiritlm_edge.runtime.aec import EchoCanceller
from spiritlm_edge.runtime.audio import SAMPLE_RATE, resample
from spiritlm_edge.runtime.audio_io import AudioInput, AudioOutput
from spiritlm_edge.runtime.events import AudioChunk, TextDelta, TurnEnd
from spiritlm_edge.runtime.turns import (
    DEFAULT_BARGE_IN_MIN_MS,
    BargeIn,
    SpeechIgnored,
    SpeechStarted,
    TurnEnded,
    TurnTaking,
)
from spiritlm_edge.runtime.vad import TurnDetector

log = logging.getLogger(__name__)

Event = TextDelta | AudioChunk | TurnEnd
Respond = Callable[[np.ndarray], Iterator[Event]]
# Conversation.listen: a streaming turn, whose prefill waits for the given thread (an abandoned answer)
Listen = Callable[..., Any]

# The echo reference is placed this share of the devices' reported latencies back: the
# canceller finds echoes that come late, never ones that come before their reference, and
# PortAudio's figures are often upper bounds (buffers that are not always full).
ALIGNMENT_SHARE = 0.5

# How long closing the session waits for ``respond`` to reach its next yield.
WORKER_JOIN_SECONDS = 30.0


@dataclass
class Turn:
    """One user turn and what came of it."""

    user_audio: np.ndarray
    started_at: float  # seconds of session audio when the user's turn ended
    text: str = ""
    answer_samples: int = 0  # samples of answer audio received from respond
    interrupted: bool = False  # cut short by a barge-in or the end of the session
    timings: dict = field(default_factory=dict)


@dataclass
class SessionSummary:
    turns: list[Turn]
    seconds: float  # of audio captured
    ended_by: str  # "max_seconds", "max_turns", "end_of_input" or "interrupted"
    speech_detected: bool

    def __str__(self) -> str:
        interrupted = sum(t.interrupted for t in self.turns)
        why = {"interrupted": "Ctrl-C", "end_of_input": "end of input"}.get(
            self.ended_by, self.ended_by.replace("_", "-")
        )
        detail = f", {interrupted} interrupted" if interrupted else ""
        speech = "" if self.speech_detected else ", no speech detected"
        return f"{len(self.turns)} turns{detail} in {self.seconds:.1f} s of audio{speech} (ended by {why})"


class _Worker(threading.Thread):
    """Runs one ``respond`` generator; its events go to ``events`` tagged with the turn."""

    _DONE = object()

    def __init__(self, respond: Respond, audio: np.ndarray, events: queue.Queue, turn_id: int):
        super().__init__(name=f"respond-turn-{turn_id}", daemon=True)
        self.respond, self.audio, self.events, self.turn_id = respond, audio, events, turn_id
        self.cancel = threading.Event()

    def run(self) -> None:
        generator = None
        try:
            generator = self.respond(self.audio)
            for event in generator:
                if self.cancel.is_set():
                    break
                self.events.put((self.turn_id, event))
        except BaseException as exc:  # handed to the main thread, which raises it again
            self.events.put((self.turn_id, exc))
        finally:
            # Abandoning: GeneratorExit at the generator's yield runs its cleanup, here in
            # the thread that was running it (a generator cannot be closed from another
            # thread while it executes).
            close = getattr(generator, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("closing the respond generator failed")
            self.events.put((self.turn_id, self._DONE))


class LiveLoop:
    """Microphone -> VAD -> ``respond`` -> speaker, turn after turn (see the module doc)."""

    def __init__(
        self,
        respond: Respond,
        audio_in: AudioInput,
        audio_out: AudioOutput,
        vad: Callable[[np.ndarray], float],
        detector: TurnDetector | None = None,
        on_text: Callable[[str], None] | None = None,
        on_status: Callable[[str], None] | None = None,
        on_turn_end: Callable[[Turn], None] | None = None,
        barge_in: bool = True,
        aec: EchoCanceller | None = None,
        max_seconds: float | None = None,
        max_turns: int | None = None,
        barge_in_min_ms: float = DEFAULT_BARGE_IN_MIN_MS,
        listen: Listen | None = None,
    ):
        self.respond = respond
        self.listen = listen
        self._listening: Any = None  # the Listening of the utterance being spoken (streaming)
        self.audio_in, self.audio_out = audio_in, audio_out
        self.vad = vad
        self.detector = detector or TurnDetector()
        self.turn_taking = TurnTaking(vad, self.detector, barge_in=barge_in, barge_in_min_ms=barge_in_min_ms)
        self.on_text = on_text or (lambda text: None)
        self.on_status = on_status or (lambda message: None)
        self.on_turn_end = on_turn_end or (lambda turn: None)
        self.barge_in = barge_in
        self.max_seconds = max_seconds
        self.max_turns = max_turns
        self.aec = aec
        self._reference_breaks = 0

        self.turns: list[Turn] = []
        self.seconds = 0.0
        self.speech_detected = False
        self._events: queue.Queue = queue.Queue()
        self._worker: _Worker | None = None
        self._current: Turn | None = None  # the turn being answered
        self._generating = False  # the current turn's worker has not finished
        self._got_audio = False  # the current turn's answer came as AudioChunks

    @property
    def responding(self) -> bool:
        return self._current is not None

    # ----------------------------------------------------------------- main loop

    def run(self) -> SessionSummary:
        ended_by = "end_of_input"
        with self.audio_in, self.audio_out:
            try:
                self.on_status("listening (Ctrl-C to quit)")
                while True:
                    if self.max_seconds is not None and self.seconds >= self.max_seconds:
                        ended_by = "max_seconds"
                        break
                    if self.max_turns is not None and len(self.turns) >= self.max_turns and not self.responding:
                        ended_by = "max_turns"
                        break
                    block = self.audio_in.read()
                    if block is None:
                        break
                    self.seconds += len(block) / SAMPLE_RATE
                    self._handle_events()
                    if self.aec is not None:
                        block = self._cancel_echo(self.aec, block)
                    self._hear(block)
            except KeyboardInterrupt:
                ended_by = "interrupted"
            finally:
                self._drop_listening()
                self._abandon_answer()
                self._join_worker()
        if not self.speech_detected:
            self.on_status(f"no speech detected in {self.seconds:.1f} s of audio")
        return SessionSummary(self.turns, self.seconds, ended_by, self.speech_detected)

    def _hear(self, block: np.ndarray) -> None:
        for event in self.turn_taking.feed(block, answering=self.responding):
            if isinstance(event, SpeechStarted):
                self.speech_detected = True
            elif isinstance(event, BargeIn) and self.responding:
                self.on_status("(interrupted)")
                self._abandon_answer()
            elif isinstance(event, TurnEnded):
                self._start_turn(event.audio)
            elif isinstance(event, SpeechIgnored):
                self._drop_listening()
                log.debug("ignored %.0f ms of speech (%s)", event.speech_ms, event.reason)
        if self.listen is not None:
            self._stream_utterance(block)

    def _stream_utterance(self, block: np.ndarray) -> None:
        """Feed the utterance being spoken to its Listening (started when speech is confirmed
        outside an answer, or at a barge-in)."""
        listen = self.listen
        if listen is None or not self.turn_taking.speaking or self.responding:
            return
        # an abandoned answer may still be decoding: the prefill waits for its worker
        self._listening = self.turn_taking.follow(self._listening, block, lambda: listen(after=self._worker))

    def _drop_listening(self) -> None:
        if self._listening is not None:
            self._listening.cancel()
            self._listening = None

    def _cancel_echo(self, aec: EchoCanceller, block: np.ndarray) -> np.ndarray:
        latency = self.audio_in.latency + self.audio_out.latency
        lag = round(latency * ALIGNMENT_SHARE * SAMPLE_RATE)
        aec.device_delay_ms = lag * 1000 / SAMPLE_RATE  # for its log line
        reference = self.audio_out.reference
        far = reference.read(len(block), lag)
        if reference.breaks != self._reference_breaks:  # an underrun or a restarted device
            self._reference_breaks = reference.breaks
            log.info("echo path interrupted (output underrun or device restart): echo cancellation starts afresh")
            aec.reset()
        return aec.process(block, far)

    # ----------------------------------------------------------------- turns

    def _start_turn(self, audio: np.ndarray) -> None:
        listening, self._listening = self._listening, None
        # an abandoned answer must be gone before the model runs again (a Listening has
        # waited for it in its own thread already)
        self._join_worker()
        turn_id = len(self.turns)
        self._current = Turn(user_audio=audio, started_at=self.seconds)
        self.turns.append(self._current)
        self._generating, self._got_audio = True, False
        self.on_status(f"heard {len(audio) / SAMPLE_RATE:.1f} s, answering")
        respond = self.respond if listening is None else listening.respond
        self._worker = _Worker(respond, audio, self._events, turn_id)
        self._worker.start()

    def _handle_events(self) -> None:
        """Apply what the worker produced since the last block; end the turn when it is over."""
        while True:
            try:
                turn_id, event = self._events.get_nowait()
            except queue.Empty:
                break
            turn = self._current
            if turn is None or turn_id != len(self.turns) - 1:
                continue  # left over from an abandoned answer
            if isinstance(event, TextDelta):
                turn.text += event.text
                self.on_text(event.text)
            elif isinstance(event, AudioChunk):
                samples = np.asarray(event.samples, dtype=np.float32).reshape(-1)
                if event.sample_rate != SAMPLE_RATE:
                    samples = resample(samples, event.sample_rate)
                turn.answer_samples += len(samples)
                self._got_audio = True
                self.audio_out.play(samples)
            elif isinstance(event, TurnEnd):
                turn.timings = dict(event.timings)
                if event.text and not turn.text:
                    turn.text = event.text
                # An answer that did not stream its audio plays it whole.
                if not self._got_audio and event.audio is not None and len(event.audio):
                    turn.answer_samples += len(event.audio)
                    self.audio_out.play(event.audio)
            elif event is _Worker._DONE:
                self._generating = False
                self.audio_out.flush()
            elif isinstance(event, BaseException):
                self._current = None
                raise event
        if self._current is not None and not self._generating and self.audio_out.idle():
            turn, self._current = self._current, None
            self.on_turn_end(turn)
            self.on_status("listening")

    def _abandon_answer(self) -> None:
        """Barge-in or shutdown: silence the speaker and let the generator go."""
        self.audio_out.stop()
        if self._worker is not None:
            self._worker.cancel.set()
        if self._current is not None:
            self._current.interrupted = True
            self.on_turn_end(self._current)
            self._current = None

    def _join_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        worker.cancel.set()  # it has finished, or its answer was abandoned
        worker.join(WORKER_JOIN_SECONDS)
        if worker.is_alive():
            log.warning("respond() did not return within %.0f s of being abandoned", WORKER_JOIN_SECONDS)


def _print_text(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_mic_session(
    respond: Respond,
    input_device: int | str | None = None,
    output_device: int | str | None = None,
    max_seconds: float | None = None,
    on_text: Callable[[str], None] | None = _print_text,
    on_status: Callable[[str], None] | None = None,
    on_turn_end: Callable[[Turn], None] | None = None,
    vad_model: str | os.PathLike | None = None,
    bundle=None,
    barge_in: bool = True,
    aec: bool | None = None,
    threshold: float = 0.5,
    end_silence_ms: float = 700.0,
    max_turns: int | None = None,
    barge_in_min_ms: float = DEFAULT_BARGE_IN_MIN_MS,
    listen: Listen | None = None,
) -> SessionSummary:
    """Talk with ``respond`` through the microphone and speaker until Ctrl-C / ``max_seconds``.
    With ``listen`` (``Conversation.listen``) turns are encoded and prefilled while spoken.

    ``input_device`` / ``output_device``: PortAudio index or part of a name (default: the
    system's). ``vad_model``: path to ``silero_vad.onnx``; otherwise the bundle's ``vad``
    component (``bundle``: a directory or a :class:`Bundle`), otherwise the installed
    silero-vad package. ``aec``: cancel the speaker's echo before the VAD (default: whenever
    ``barge_in`` is on). Raises AudioError when there is no usable device, or when ``aec`` is
    on and its library is missing.
    """
    from spiritlm_edge.runtime.audio_io import SoundDeviceInput, SoundDeviceOutput
    from spiritlm_edge.runtime.vad import SileroVAD

    if on_status is None:

        def on_status(message: str) -> None:
            print(f"[{message}]", file=sys.stderr, flush=True)

    if on_turn_end is None and on_text is _print_text:

        def on_turn_end(turn: Turn) -> None:
            if turn.text:
                _print_text("\n")  # end the answer's line before the next status

    vad = SileroVAD(vad_model, bundle=bundle)
    loop = LiveLoop(
        respond,
        SoundDeviceInput(input_device),
        SoundDeviceOutput(output_device),
        vad,
        TurnDetector(threshold=threshold, end_silence_ms=end_silence_ms),
        on_text=on_text,
        on_status=on_status,
        on_turn_end=on_turn_end,
        barge_in=barge_in,
        aec=EchoCanceller() if (barge_in if aec is None else aec) else None,
        max_seconds=max_seconds,
        max_turns=max_turns,
        barge_in_min_ms=barge_in_min_ms,
        listen=listen,
    )
    started = time.monotonic()
    summary = loop.run()
    log.debug("session: %d turns in %.1f s (%s)", len(summary.turns), time.monotonic() - started, summary.ended_by)
    return summary
