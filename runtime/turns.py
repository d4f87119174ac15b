"""Turn taking: who speaks when, for the microphone loop and the server alike.

:class:`TurnTaking` is a sans-I/O state machine: it is fed 32 ms blocks of 16 kHz audio,
told whether an answer is being produced or played, and returns what happened. It owns
no device, thread or clock (positions are counted in samples fed), so the live loop
(``runtime/live.py``, a microphone and a speaker) and the Realtime server
(``server/realtime.py``, audio arriving over a WebSocket) take turns the same way::

    turns = TurnTaking(SileroVAD(), TurnDetector(end_silence_ms=700))
    for event in turns.feed(block, answering=loop_is_answering):
        if isinstance(event, BargeIn): ...        # stop the answer now
        elif isinstance(event, TurnEnded): ...    # answer event.audio

Rules:

* Speech is confirmed after the detector's ``start_ms`` (:class:`SpeechStarted`); the
  turn ends after ``end_silence_ms`` of silence (:class:`SpeechStopped`, then
  :class:`TurnEnded` with the utterance, or :class:`SpeechIgnored` when it was too short
  to be a turn).
* Barge-in: while an answer runs, speech that lasts ``barge_in_min_ms`` cuts it
  (:class:`BargeIn`) and becomes the next turn. Shorter speech ("mm-hmm", a cough) is a
  back-channel: the answer goes on and the speech is ignored.
* ``barge_in=False``: while an answer runs the microphone is not listened to at all
  (speakers without echo cancellation, where the answer would interrupt itself); the VAD
  and the detector start afresh when the answer is over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from spiritlm_edge.runtime.errors import AudioError
from spiritlm_edge.runtime.vad import BLOCK_MS, BLOCK_SAMPLES, SpeechDiscarded, SpeechStart, TurnDetector, Utterance

# Speech shorter than this during an answer is a back-channel, not an interruption.
DEFAULT_BARGE_IN_MIN_MS = 300.0


@dataclass
class SpeechStarted:
    """Speech is confirmed. ``audio_start_ms``: where the utterance (with its pre-roll)
    begins, in ms of audio fed since the start (or the last ``reset``)."""

    audio_start_ms: float
    during_answer: bool


@dataclass
class BargeIn:
    """The user has spoken over the answer for ``barge_in_min_ms``: stop the answer."""

    audio_ms: float  # position of the block that confirmed it


@dataclass
class SpeechStopped:
    """The speech is over (``end_silence_ms`` of silence, or the length cap);
    ``audio_end_ms`` includes that silence."""

    audio_end_ms: float


@dataclass
class TurnEnded:
    """A user turn to answer: the utterance with its padding."""

    audio: np.ndarray
    speech_ms: float
    audio_start_ms: float
    audio_end_ms: float
    forced: bool = False  # cut at the detector's max_utterance_s rather than ended by silence


@dataclass
class SpeechIgnored:
    """Speech that is not a turn: ``"short"`` (under the detector's ``min_speech_ms``) or
    ``"backchannel"`` (under ``barge_in_min_ms``, spoken while an answer ran)."""

    speech_ms: float
    reason: str


TurnEvent = SpeechStarted | BargeIn | SpeechStopped | TurnEnded | SpeechIgnored


class TurnTaking:
    """VAD -> speech started / stopped -> end of turn -> barge-in (see the module doc)."""

    def __init__(
        self,
        vad: Callable[[np.ndarray], float],
        detector: TurnDetector | None = None,
        barge_in: bool = True,
        barge_in_min_ms: float = DEFAULT_BARGE_IN_MIN_MS,
    ):
        if barge_in_min_ms < 0:
            raise AudioError(f"barge_in_min_ms must be >= 0, got {barge_in_min_ms}.")
        self.vad = vad
        self.detector = detector or TurnDetector()
        self.barge_in = barge_in
        self.barge_in_min_ms = float(barge_in_min_ms)
        self.blocks_fed = 0
        self._was_answering = False
        self._reset_speech()

    def _reset_speech(self) -> None:
        self._start_ms = 0.0
        self._during_answer = False  # the current speech began while an answer ran
        self._barged = False  # and has already cut it

    def reset(self) -> None:
        """Forget the audio so far (a new stream; positions count from zero again)."""
        self.detector.reset()
        getattr(self.vad, "reset", lambda: None)()
        self.blocks_fed = 0
        self._was_answering = False
        self._reset_speech()

    @property
    def position_ms(self) -> float:
        return self.blocks_fed * BLOCK_MS

    @property
    def speaking(self) -> bool:
        return self.detector.speaking

    @property
    def committed_samples(self) -> int:
        """Samples of the current utterance that its turn will surely include (see
        :attr:`TurnDetector.committed_blocks`): what a streaming encoder may make final."""
        return self.detector.committed_blocks * BLOCK_SAMPLES

    def utterance_audio(self) -> np.ndarray:
        """The current utterance so far, from its pre-roll (empty when nobody speaks)."""
        return self.detector.utterance_audio()

    def follow(self, listening: Any, block: np.ndarray, start: Callable[[], Any]) -> Any:
        """Feed the utterance being spoken to ``listening`` (a streaming encoder's ``feed``),
        with how much of it the turn will surely keep. Without one, ``start()`` makes it (or
        returns None: nothing to feed) and it gets the utterance so far, pre-roll included;
        then each new ``block``. Returns the listening. Call after :meth:`feed`, while
        :attr:`speaking` and no answer runs."""
        if listening is None:
            listening = start()
            if listening is not None:
                listening.feed(self.utterance_audio(), committed=self.committed_samples)
        else:
            listening.feed(block, committed=self.committed_samples)
        return listening

    def feed(self, block: np.ndarray, answering: bool = False) -> list[TurnEvent]:
        """One block of ``BLOCK_SAMPLES`` samples at 16 kHz; ``answering``: an answer is being
        produced or played now. Returns what happened, in order (usually nothing)."""
        if len(block) != BLOCK_SAMPLES:
            raise AudioError(f"turn taking takes blocks of {BLOCK_SAMPLES} samples at 16 kHz; got {len(block)}.")
        if self._was_answering and not answering and not self.barge_in:
            # The microphone was deaf during the answer: start from a clean state.
            self.detector.reset()
            getattr(self.vad, "reset", lambda: None)()
            self._reset_speech()
        self._was_answering = answering
        self.blocks_fed += 1
        if answering and not self.barge_in:
            return []
        event = self.detector.feed(block, self.vad(block))
        events: list[TurnEvent] = []
        if isinstance(event, SpeechStart):
            self._start_ms = (self.blocks_fed - self.detector.utterance_blocks) * BLOCK_MS
            self._during_answer, self._barged = answering, False
            events.append(SpeechStarted(self._start_ms, answering))
        if (
            answering
            and self._during_answer
            and not self._barged
            and self.detector.speaking
            and self.detector.speech_ms >= self.barge_in_min_ms
        ):
            self._barged = True
            events.append(BargeIn(self.position_ms))
        if isinstance(event, (Utterance, SpeechDiscarded)):
            events.append(SpeechStopped(self.position_ms))
            backchannel = self._during_answer and not self._barged and event.speech_ms < self.barge_in_min_ms
            if isinstance(event, SpeechDiscarded):
                events.append(SpeechIgnored(event.speech_ms, "short"))
            elif backchannel:
                events.append(SpeechIgnored(event.speech_ms, "backchannel"))
            else:
                events.append(TurnEnded(event.audio, event.speech_ms, self._start_ms, self.position_ms, event.forced))
            self._reset_speech()
        return events
