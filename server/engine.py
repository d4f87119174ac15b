"""The model behind the server: one :class:`SpiritLM`, one worker thread, turns in a bounded queue.

Every connection keeps its own :class:`Conversation` (its dialogue and so the LM's KV
cache prefix), but the model is one: turns run one at a time on a single worker thread,
off the event loop, so a slow turn never stalls pings, health checks or other
connections. A turn that finds ``max_queued_turns`` turns already waiting is refused
with :class:`Busy` (at :meth:`Engine.reserve`) rather than queued without bound.

Speech is encoded and prefilled while the user speaks (``speech_encoding="streaming"``, the
default): a connection's :meth:`Engine.listen` gives a
:class:`~spiritlm_edge.runtime.pipeline.Listening` whose prefill takes the model only when it is
free (``model_lock``, which every turn holds), so one client's speech never delays another's
answer; its turn then arrives as a :class:`StreamedSpeech` input with most of its work done.

Cancellation stops generation within one decode step: the LM's token iterator is wrapped
(:class:`_InterruptibleLM`) so that it checks the turn's cancel flag after every token,
before asking llama.cpp for the next one, and unwinds the whole pipeline (LM, vocoder
stream, conversation) with :class:`TurnCancelled`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from spiritlm_edge.runtime.events import AudioChunk, TextDelta, TurnEnd
from spiritlm_edge.runtime.pipeline import Conversation, Listening, SpiritLM, check_speech_encoding
from spiritlm_edge.runtime.sampling import SamplingConfig
from spiritlm_edge.runtime.speech import StreamingWindow

log = logging.getLogger(__name__)


class TurnCancelled(Exception):
    """Raised inside the worker when a turn's cancel flag is set (response.cancel, barge-in,
    a client gone, shutdown)."""


class Busy(Exception):
    """The model's queue is full: the client should retry later."""


class _InterruptibleLM:
    """The LM with a cancel check between decode steps; everything else is the LM's own."""

    def __init__(self, lm: Any):
        self._lm = lm
        self.cancel: threading.Event | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lm, name)

    def generate(self, ids: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[int]:
        tokens = self._lm.generate(ids, *args, **kwargs)  # checks its arguments now
        return self._checked(tokens, self.cancel)

    @staticmethod
    def _checked(tokens: Iterator[int], cancel: threading.Event | None) -> Iterator[int]:
        try:
            for token in tokens:
                if cancel is not None and cancel.is_set():
                    raise TurnCancelled()
                yield token
                if cancel is not None and cancel.is_set():  # before the next decode step
                    raise TurnCancelled()
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()


@dataclass
class StreamedSpeech:
    """A spoken turn encoded (and prefilled) while it was spoken: its Listening and the
    turn's whole audio."""

    listening: Listening
    audio: Any  # float32 16 kHz


@dataclass
class TurnRequest:
    """One user turn as the server hands it to the model."""

    # ("TEXT", str), ("SPEECH", float32 16 kHz array) or ("SPEECH", StreamedSpeech)
    inputs: list[tuple[str, Any]]
    output_modality: str  # SPEECH, TEXT or ARBITRARY
    speaker_id: int
    sampling: SamplingConfig
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class TurnOutcome:
    status: str  # "completed" or "cancelled"
    timings: dict[str, float] = field(default_factory=dict)
    text: str = ""


class Engine:
    """The shared model (see the module doc)."""

    def __init__(
        self,
        spirit_lm: SpiritLM,
        max_queued_turns: int = 4,
        speech_encoding: str = "streaming",
        window: StreamingWindow | None = None,
    ):
        self.spirit_lm = spirit_lm
        self.speech_encoding = check_speech_encoding(speech_encoding)
        self.window = window
        # held by every turn and by a Listening's prefill: one user of the model at a time
        self.model_lock = threading.Lock()
        self._lm = _InterruptibleLM(spirit_lm.lm)
        # the pipeline pulls its tokens through the cancel check (a proxy: the LM's API, plus the check)
        spirit_lm.lm = self._lm  # type: ignore[assignment]
        self.max_queued_turns = max_queued_turns
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spiritlm-model")
        self._in_flight = 0  # turns running or waiting; touched on the event loop only

    @classmethod
    def from_bundle(
        cls,
        bundle: Any,
        max_queued_turns: int = 4,
        speech_encoding: str = "streaming",
        window: StreamingWindow | None = None,
        **spirit_lm_options: Any,
    ) -> Engine:
        return cls(SpiritLM(bundle, **spirit_lm_options), max_queued_turns, speech_encoding, window)

    @property
    def variant(self) -> str:
        return self.spirit_lm.variant

    @property
    def n_ctx(self) -> int:
        return int(self.spirit_lm.lm.n_ctx)

    @property
    def speakers(self) -> list[int]:
        return list(range(4))

    def new_vad(self) -> Any:
        """A Silero VAD with its own stream state (one per connection), from the bundle."""
        from spiritlm_edge.runtime.vad import SileroVAD

        return SileroVAD(bundle=self.spirit_lm.bundle)

    def conversation(self) -> Conversation:
        return Conversation(self.spirit_lm, output_modality="SPEECH")

    def listen(self, conversation: Conversation) -> Listening | None:
        """A Listening for a turn being spoken in ``conversation`` (None with whole-turn encoding)."""
        if self.speech_encoding != "streaming":
            return None
        return conversation.listen(self.window, model_lock=self.model_lock)

    @property
    def queued(self) -> int:
        return self._in_flight

    def reserve(self) -> None:
        """Take a place in the queue for a turn (call on the event loop, before the response
        starts, so that concurrent requests cannot overfill it). Raises :class:`Busy` when full;
        :meth:`run_turn` gives the place back."""
        if self._in_flight > self.max_queued_turns:
            raise Busy(f"{self._in_flight} turns are running or waiting for the model")
        self._in_flight += 1

    def release(self) -> None:
        """Give back a place taken with :meth:`reserve` that :meth:`run_turn` did not use."""
        self._in_flight -= 1

    async def run_turn(
        self, conversation: Conversation, request: TurnRequest, on_event: Callable[[Any], None]
    ) -> TurnOutcome:
        """Run one turn on the worker, in the place :meth:`reserve` took (given back here);
        ``on_event`` gets the pipeline's events on the event loop, in order, before this returns."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor,
                self._turn,
                conversation,
                request,
                lambda event: _call_soon(loop, on_event, event),
            )
        finally:
            self.release()

    def _turn(self, conversation: Conversation, request: TurnRequest, emit: Callable[[Any], None]) -> TurnOutcome:
        with self.model_lock:
            return self._locked_turn(conversation, request, emit)

    def _encode(self, inputs: list[tuple[str, Any]], timings: dict[str, float]) -> list[tuple[str, str]]:
        segments: list[tuple[str, str]] = []
        for kind, content in inputs:
            if isinstance(content, StreamedSpeech):
                units, streamed = content.listening.finish(content.audio)
                timings.update({k: v for k, v in streamed.items() if k.startswith("streamed_")})
                segments.append(("SPEECH", units))
            else:
                segments.extend(self.spirit_lm.encode_inputs([(kind, content)]))
        return segments

    def _locked_turn(
        self, conversation: Conversation, request: TurnRequest, emit: Callable[[Any], None]
    ) -> TurnOutcome:
        for _, content in request.inputs:
            if request.cancel.is_set() and isinstance(content, StreamedSpeech):
                content.listening.cancel()
        if request.cancel.is_set():
            return TurnOutcome("cancelled")
        started = time.perf_counter()
        # The user's turn joins the dialogue before the answer starts, so that a cancelled
        # answer still leaves what the user said in the model's memory.
        streamed: dict[str, float] = {}
        conversation.segments = conversation.segments + self._encode(request.inputs, streamed)
        encode_s = time.perf_counter() - started
        conversation.speaker_id = request.speaker_id
        self._lm.cancel = request.cancel
        conversation.sampling = request.sampling
        stream = conversation.stream([], output_modality=request.output_modality)
        try:
            for event in stream:
                if isinstance(event, TurnEnd):
                    timings = dict(event.timings, encode_s=encode_s, **streamed)
                    if "first_audio_s" in timings:
                        timings["first_audio_s"] += encode_s
                    timings["total_s"] = time.perf_counter() - started
                    emit(TurnEnd(timings=timings, text=event.text, audio=None, generated=event.generated))
                    return TurnOutcome("completed", timings, event.text)
                if isinstance(event, (TextDelta, AudioChunk)):
                    emit(event)
                if request.cancel.is_set():
                    return TurnOutcome("cancelled")
            return TurnOutcome("completed")
        except TurnCancelled:
            return TurnOutcome("cancelled")
        finally:
            stream.close()  # closing the generator unwinds the pipeline, in this thread
            self._lm.cancel = None

    def close(self) -> None:
        """Wait for the turn in flight (cancel it first) and stop the worker."""
        self._executor.shutdown(wait=True, cancel_futures=True)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[Any], None], event: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, event)
    except RuntimeError:  # the loop is closed (shutdown): nobody is listening any more
        pass
