"""One Realtime API connection: the protocol's events in, the model's answer out.

:class:`RealtimeSession` speaks the core subset of the OpenAI Realtime API (GA event
names; docs/protocol.md lists every event and field). It does not know about sockets: the
server hands it each text message (:meth:`RealtimeSession.handle`) and gives it a coroutine
that sends one event (``send``). Each connection has its own session configuration, input
audio buffer, turn taking (:class:`~spiritlm_edge.runtime.turns.TurnTaking`, the live
loop's state machine) and :class:`~spiritlm_edge.runtime.pipeline.Conversation`; the model
is shared through :class:`~spiritlm_edge.server.engine.Engine`.

Audio on the wire is 16-bit little-endian mono PCM, base64, at 24 kHz (the protocol's rate)
or at 16 kHz (our extension, the model's own rate, no resampling); soxr converts.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import itertools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import soxr

from spiritlm_edge.runtime.audio import SAMPLE_RATE
from spiritlm_edge.runtime.errors import SpiritLMEdgeError
from spiritlm_edge.runtime.events import AudioChunk, TextDelta, TurnEnd
from spiritlm_edge.runtime.sampling import SamplingConfig
from spiritlm_edge.runtime.turns import (
    DEFAULT_BARGE_IN_MIN_MS,
    BargeIn,
    SpeechIgnored,
    SpeechStarted,
    SpeechStopped,
    TurnEnded,
    TurnTaking,
)
from spiritlm_edge.runtime.vad import BLOCK_SAMPLES, TurnDetector
from spiritlm_edge.server.engine import Busy, Engine, StreamedSpeech, TurnRequest

log = logging.getLogger(__name__)

PROTOCOL_RATE = 24000
INPUT_RATES = (24000, 16000)  # 16 kHz: our documented extension
MIN_COMMIT_MS = 100  # as the published API: a commit needs at least 100 ms of audio
IDLE_BUFFER_S = 1.0  # with server VAD, audio kept while nobody speaks (for a manual commit)
MAX_OUTPUT_TOKENS_CAP = 4096  # the protocol's own upper bound


class ProtocolError(Exception):
    """A client event we answer with an ``error`` event; the connection stays up."""

    def __init__(self, code: str, message: str, param: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.code, self.message, self.param, self.type = code, message, param, type


@dataclass
class Limits:
    """What one connection may send and hold (see docs/protocol.md, "Limits")."""

    max_message_bytes: int = 1 << 20  # a larger message gets an error event (the frame cap closes at 4x)
    max_turn_audio_s: float = 60.0  # input audio buffered for one turn
    max_text_chars: int = 4000  # text of one conversation item
    idle_timeout_s: float = 300.0  # no client message for this long closes the connection
    max_connections: int = 8
    max_queued_turns: int = 4  # turns waiting for the model, all connections (the Engine enforces it; serve passes it)


def default_session(engine: Engine) -> dict[str, Any]:
    """The session a connection starts with, in the GA shape (``type: "realtime"``)."""
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": "sess_" + secrets.token_hex(8),
        "model": f"spiritlm-{engine.variant}",
        "output_modalities": ["audio"],
        "instructions": "",
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": 200,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": PROTOCOL_RATE},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": default_detection(),
            },
            "output": {"format": {"type": "audio/pcm", "rate": PROTOCOL_RATE}, "voice": "2", "speed": 1.0},
        },
        # extensions: Spirit LM's sampling
        "temperature": 0.9,
        "top_p": 0.95,
    }


def sampling_config(config: dict[str, Any], n_ctx: int) -> SamplingConfig:
    """The runtime's :class:`SamplingConfig` for a session or response configuration: the one
    place where protocol settings become sampling settings (temperature 0 is greedy)."""
    max_tokens = config["max_output_tokens"]
    temperature = float(config["temperature"])
    return SamplingConfig(
        max_new_tokens=n_ctx // 2 if max_tokens == "inf" else int(max_tokens),
        do_sample=temperature > 0,
        temperature=temperature,
        top_p=float(config["top_p"]),
    )


def output_modality(modalities: list[str]) -> str:
    """Protocol output modalities -> Spirit LM's: audio -> SPEECH, text -> TEXT, both -> ARBITRARY
    (the model chooses; its text is the audio's transcript)."""
    kinds = set(modalities)
    if kinds == {"audio"}:
        return "SPEECH"
    if kinds == {"text"}:
        return "TEXT"
    return "ARBITRARY"


# ----------------------------------------------------------------------------- validation


def _expect(value: Any, kind: type | tuple[type, ...], param: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ProtocolError("invalid_type", f"{param} must be {names}, got {json.dumps(value)[:80]}.", param)
    return value


def _number(value: Any, param: str, low: float, high: float) -> float:
    _expect(value, (int, float), param)
    if not low <= value <= high:
        raise ProtocolError("invalid_value", f"{param} must be between {low} and {high}, got {value}.", param)
    return float(value)


def _unknown(obj: dict, known: set[str], where: str) -> None:
    extra = sorted(set(obj) - known)
    if extra:
        raise ProtocolError("unknown_parameter", f"Unknown parameter '{where}.{extra[0]}'.", f"{where}.{extra[0]}")


def _unsupported(param: str, why: str) -> ProtocolError:
    return ProtocolError("unsupported_feature", f"{param} is not supported by spiritlm-edge: {why}", param)


def _audio_format(value: Any, param: str) -> dict[str, Any]:
    _expect(value, dict, param)
    _unknown(value, {"type", "rate"}, param)
    if value.get("type", "audio/pcm") != "audio/pcm":
        raise ProtocolError(
            "invalid_audio_format",
            f"{param}.type {value.get('type')!r} is not supported: use 'audio/pcm' (16-bit little-endian mono).",
            f"{param}.type",
        )
    rate = value.get("rate", PROTOCOL_RATE)
    if rate not in INPUT_RATES or isinstance(rate, bool):
        raise ProtocolError(
            "invalid_audio_format", f"{param}.rate {rate!r} is not supported: use 24000 (or 16000).", f"{param}.rate"
        )
    return {"type": "audio/pcm", "rate": rate}


def _voice(value: Any, param: str) -> str:
    voice = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if voice not in ("0", "1", "2", "3"):
        raise ProtocolError(
            "invalid_value",
            f"{param} {value!r} is not a voice of this model: use '0', '1', '2' or '3' (the vocoder's speakers).",
            param,
        )
    return voice


def _max_tokens(value: Any, param: str) -> int | str:
    if value == "inf":
        return "inf"
    _expect(value, int, param)
    if not 1 <= value <= MAX_OUTPUT_TOKENS_CAP:
        raise ProtocolError("invalid_value", f"{param} must be between 1 and {MAX_OUTPUT_TOKENS_CAP} or 'inf'.", param)
    return value


def _modalities(value: Any, param: str) -> list[str]:
    _expect(value, list, param)
    if not value or any(m not in ("audio", "text") for m in value) or len(set(value)) != len(value):
        raise ProtocolError("invalid_value", f"{param} must be ['audio'], ['text'] or ['audio', 'text'].", param)
    return list(value)


def apply_session_update(session: dict[str, Any], update: Any) -> dict[str, Any]:
    """A new session: ``session`` with ``update`` applied, or ProtocolError (nothing applied)."""
    _expect(update, dict, "session")
    new = copy.deepcopy(session)
    _unknown(
        update,
        {
            "type",
            "model",
            "output_modalities",
            "instructions",
            "tools",
            "tool_choice",
            "max_output_tokens",
            "audio",
            "temperature",
            "top_p",
            "tracing",
            "include",
            "truncation",
            "prompt",
            "id",
            "object",
        },
        "session",
    )
    if update.get("type", "realtime") != "realtime":
        raise ProtocolError(
            "invalid_value",
            "session.type must be 'realtime' (transcription sessions are not supported).",
            "session.type",
        )
    if "model" in update:
        new["model"] = str(_expect(update["model"], str, "session.model"))
    if "output_modalities" in update:
        new["output_modalities"] = _modalities(update["output_modalities"], "session.output_modalities")
    if update.get("instructions"):
        raise _unsupported(
            "session.instructions",
            "Spirit LM is a continuation model without a system prompt; give context as conversation items instead.",
        )
    if update.get("tools"):
        raise _unsupported("session.tools", "Spirit LM cannot call tools.")
    if update.get("tool_choice") not in (None, "auto", "none"):
        raise _unsupported("session.tool_choice", "Spirit LM cannot call tools.")
    if update.get("prompt"):
        raise _unsupported("session.prompt", "there are no stored prompts on the device.")
    if update.get("include"):
        raise _unsupported("session.include", "there is no input transcription.")
    if "max_output_tokens" in update:
        new["max_output_tokens"] = _max_tokens(update["max_output_tokens"], "session.max_output_tokens")
    if "temperature" in update:
        new["temperature"] = _number(update["temperature"], "session.temperature", 0.0, 2.0)
    if "top_p" in update:
        top_p = _number(update["top_p"], "session.top_p", 0.0, 1.0)
        if top_p == 0:
            raise ProtocolError("invalid_value", "session.top_p must be in (0, 1].", "session.top_p")
        new["top_p"] = top_p
    audio = update.get("audio")
    if audio is not None:
        _expect(audio, dict, "session.audio")
        _unknown(audio, {"input", "output"}, "session.audio")
        if audio.get("input") is not None:
            _apply_input(new["audio"]["input"], _expect(audio["input"], dict, "session.audio.input"))
        if audio.get("output") is not None:
            out = _expect(audio["output"], dict, "session.audio.output")
            _unknown(out, {"format", "voice", "speed"}, "session.audio.output")
            if "format" in out:
                new["audio"]["output"]["format"] = _audio_format(out["format"], "session.audio.output.format")
            if "voice" in out:
                new["audio"]["output"]["voice"] = _voice(out["voice"], "session.audio.output.voice")
            if out.get("speed", 1.0) != 1.0:
                raise _unsupported("session.audio.output.speed", "the vocoder speaks at the model's own pace.")
    return new


def _apply_input(current: dict[str, Any], update: dict[str, Any]) -> None:
    where = "session.audio.input"
    _unknown(update, {"format", "transcription", "noise_reduction", "turn_detection"}, where)
    if "format" in update:
        current["format"] = _audio_format(update["format"], f"{where}.format")
    if update.get("transcription"):
        raise _unsupported(f"{where}.transcription", "no separate transcription model runs on the device.")
    if update.get("noise_reduction"):
        raise _unsupported(f"{where}.noise_reduction", "use the browser's or the device's noise suppression.")
    if "turn_detection" not in update:
        return
    detection = update["turn_detection"]
    if detection is None:
        current["turn_detection"] = None
        return
    param = f"{where}.turn_detection"
    _expect(detection, dict, param)
    kind = detection.get("type", "server_vad")
    if kind != "server_vad":
        raise _unsupported(f"{param}.type", f"{kind!r}: only 'server_vad' (or null for manual commits).")
    _unknown(
        detection,
        {
            "type",
            "threshold",
            "prefix_padding_ms",
            "silence_duration_ms",
            "create_response",
            "interrupt_response",
            "barge_in_min_ms",
            "idle_timeout_ms",
        },
        param,
    )
    if detection.get("idle_timeout_ms") is not None:
        raise _unsupported(f"{param}.idle_timeout_ms", "the model does not speak unprompted.")
    new = dict(current["turn_detection"] or default_detection())
    new["type"] = "server_vad"
    if "threshold" in detection:
        new["threshold"] = _number(detection["threshold"], f"{param}.threshold", 0.05, 0.95)
    for key, high in (("prefix_padding_ms", 2000), ("silence_duration_ms", 5000), ("barge_in_min_ms", 5000)):
        if key in detection:
            new[key] = int(_number(detection[key], f"{param}.{key}", 0 if key != "silence_duration_ms" else 100, high))
    for key in ("create_response", "interrupt_response"):
        if key in detection:
            new[key] = bool(_expect(detection[key], bool, f"{param}.{key}"))
    current["turn_detection"] = new


def default_detection() -> dict[str, Any]:
    return {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 700,
        "create_response": True,
        "interrupt_response": True,
        "barge_in_min_ms": int(DEFAULT_BARGE_IN_MIN_MS),
    }


def decode_pcm16(data: Any, param: str) -> np.ndarray:
    """base64 16-bit little-endian PCM -> int16 samples, or ProtocolError."""
    _expect(data, str, param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_audio", f"{param} is not valid base64.", param) from None
    if len(raw) % 2:
        raise ProtocolError(
            "invalid_audio", f"{param} holds {len(raw)} bytes: 16-bit PCM needs an even number of bytes.", param
        )
    return np.frombuffer(raw, dtype="<i2")


def encode_pcm16(samples: np.ndarray) -> str:
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode("ascii")


# ----------------------------------------------------------------------------- the session


@dataclass
class _Response:
    id: str
    item_id: str
    modalities: list[str]
    voice: str
    output_rate: int
    request: TurnRequest
    started: float
    task: asyncio.Task | None = None
    cancel_reason: str | None = None  # "client_cancelled" | "turn_detected" | "server_shutdown" | ...
    text: str = ""
    audio_samples: int = 0  # at the output rate
    first_audio_s: float | None = None
    resampler: Any = None
    previous_item: str | None = None

    @property
    def ids(self) -> dict[str, Any]:
        """The fields that place a delta: response, item, output and content index."""
        return {"response_id": self.id, "item_id": self.item_id, "output_index": 0, "content_index": 0}

    @property
    def text_only(self) -> bool:
        return self.modalities == ["text"]


Send = Callable[[dict[str, Any]], Awaitable[None]]


class RealtimeSession:
    """The protocol state of one connection (see the module doc)."""

    def __init__(self, engine: Engine, send: Send, limits: Limits | None = None, metrics: Any = None):
        self.engine = engine
        self._send = send
        self.limits = limits or Limits()
        self.metrics = metrics
        self.session = default_session(engine)
        self.conversation = engine.conversation()
        self._ids = itertools.count(1)
        self._vad = engine.new_vad()
        self._turns = self._make_turn_taking()
        self._resampler: Any = None
        self._block_rest = np.zeros(0, np.float32)  # 16 kHz samples short of a VAD block
        self._buffer: list[np.ndarray] = []  # 16 kHz input audio since the last commit
        self._buffer_samples = 0
        self._speech_item: str | None = None  # item id announced by speech_started
        self._pending: list[tuple[str, Any]] = []  # committed inputs not yet answered
        self._last_item: str | None = None
        self._response: _Response | None = None
        self._assistant_audio_ms: dict[str, int] = {}  # item id -> audio sent, for truncate
        self._listening: Any = None  # the turn being spoken, encoded and prefilled meanwhile
        self._closed = False

    # -- plumbing -----------------------------------------------------------------------

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{secrets.token_hex(6)}{next(self._ids):04d}"

    async def send(self, event: dict[str, Any]) -> None:
        if self._closed:
            return
        event = {"event_id": self._id("event"), **event}
        try:
            await self._send(event)
        except (ConnectionError, RuntimeError):
            self._closed = True  # the client is gone: everything is freed by close()

    async def error(
        self,
        code: str,
        message: str,
        event_id: str | None = None,
        param: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        if self.metrics is not None:
            self.metrics.error(code)
        error = {"type": type, "code": code, "message": message, "param": param, "event_id": event_id}
        await self.send({"type": "error", "error": error})

    async def start(self) -> None:
        await self.send({"type": "session.created", "session": self.session})

    async def close(self, reason: str = "client_gone") -> None:
        """Cancel the answer in flight and wait for the model to let go (within one decode step)."""
        self._drop_listening()
        response = self._response
        if response is not None:
            self._cancel(response, reason)
            if response.task is not None:
                await asyncio.gather(response.task, return_exceptions=True)
        self._closed = True

    # -- dispatch -----------------------------------------------------------------------

    async def handle(self, message: str | bytes) -> None:
        """One client message; every problem becomes an ``error`` event."""
        if len(message) > self.limits.max_message_bytes:
            await self.error(
                "message_too_large",
                f"The message has {len(message)} bytes; the limit is "
                f"{self.limits.max_message_bytes}. Send audio in smaller appends (e.g. 100 ms).",
            )
            return
        try:
            event = json.loads(message)
        except (ValueError, UnicodeDecodeError) as exc:
            await self.error("invalid_json", f"The message is not valid JSON: {exc}.")
            return
        if not isinstance(event, dict):
            await self.error("invalid_event", "An event is a JSON object with a 'type'.")
            return
        event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        kind = event.get("type")
        handler = self._handlers().get(kind) if isinstance(kind, str) else None
        if handler is None:
            await self.error(
                "unknown_event",
                f"Unsupported event type {kind!r}: see docs/protocol.md for the events spiritlm-edge accepts.",
                event_id,
                "type",
            )
            return
        try:
            await handler(event)
        except ProtocolError as exc:
            await self.error(exc.code, exc.message, event_id, exc.param, exc.type)
        except Busy as exc:
            await self.error("busy", f"The model is busy ({exc}); try again shortly.", event_id, type="server_error")
        except SpiritLMEdgeError as exc:  # the runtime refused the input (bad audio, too long for the context)
            await self.error("invalid_value", str(exc), event_id)
        except Exception as exc:  # a bug of ours: this event fails, the connection and the others go on
            log.exception("handling %s failed", kind)
            await self.error("server_error", f"Handling {kind} failed: {exc}", event_id, type="server_error")

    def _handlers(self) -> dict[str, Callable[[dict[str, Any]], Awaitable[None]]]:
        return {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit,
            "input_audio_buffer.clear": self._clear,
            "conversation.item.create": self._item_create,
            "conversation.item.truncate": self._truncate,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
        }

    # -- session --------------------------------------------------------------------------

    def _make_turn_taking(self) -> TurnTaking | None:
        detection = self.session["audio"]["input"]["turn_detection"]
        if detection is None:
            return None
        detector = TurnDetector(
            threshold=detection["threshold"],
            end_silence_ms=detection["silence_duration_ms"],
            pad_ms=detection["prefix_padding_ms"],
            # cut a never-ending turn before the buffer limit (which also holds the idle pre-roll) is hit
            max_utterance_s=max(1.0, self.limits.max_turn_audio_s - 2 * IDLE_BUFFER_S),
        )
        return TurnTaking(
            self._vad, detector, barge_in=detection["interrupt_response"], barge_in_min_ms=detection["barge_in_min_ms"]
        )

    async def _session_update(self, event: dict[str, Any]) -> None:
        old = self.session
        self.session = apply_session_update(old, event.get("session", {}))
        if self.session["audio"]["input"] != old["audio"]["input"]:
            # New turn detection or input format: the stream starts afresh.
            self._resampler, self._block_rest = None, np.zeros(0, np.float32)
            getattr(self._vad, "reset", lambda: None)()
            self._drop_listening()
            self._turns = self._make_turn_taking()
        await self.send({"type": "session.updated", "session": self.session})

    # -- input audio ----------------------------------------------------------------------

    async def _append(self, event: dict[str, Any]) -> None:
        pcm = decode_pcm16(event.get("audio"), "audio")
        rate = self.session["audio"]["input"]["format"]["rate"]
        samples = pcm.astype(np.float32) / 32768.0
        if rate != SAMPLE_RATE:
            if self._resampler is None:
                self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            samples = self._resampler.resample_chunk(samples)
        limit = int(self.limits.max_turn_audio_s * SAMPLE_RATE)
        if self._buffer_samples + len(samples) > limit:
            raise ProtocolError(
                "input_audio_buffer_full",
                f"The input audio buffer holds at most "
                f"{self.limits.max_turn_audio_s:g} s per turn: commit or clear it.",
                "audio",
            )
        self._buffer.append(samples)
        self._buffer_samples += len(samples)
        if self._turns is not None:
            await self._hear(samples)

    async def _hear(self, samples: np.ndarray) -> None:
        turns = self._turns
        assert turns is not None  # called with server VAD only
        audio = np.concatenate([self._block_rest, samples]) if len(self._block_rest) else samples
        n_blocks = len(audio) // BLOCK_SAMPLES
        self._block_rest = audio[n_blocks * BLOCK_SAMPLES :].copy()
        for i in range(n_blocks):
            block = audio[i * BLOCK_SAMPLES : (i + 1) * BLOCK_SAMPLES]
            answering = self._response is not None and self._response.cancel_reason is None
            for turn_event in turns.feed(block, answering=answering):
                await self._on_turn_event(turn_event)
            self._stream_utterance(turns, block)
        if not turns.speaking and self._speech_item is None:
            self._trim_buffer(int(IDLE_BUFFER_S * SAMPLE_RATE))

    def _stream_utterance(self, turns: TurnTaking, block: np.ndarray) -> None:
        """Feed the utterance being spoken to its Listening: started when speech is confirmed
        outside an answer, or once a barge-in has cancelled the answer."""
        if not turns.speaking or (self._response is not None and self._response.cancel_reason is None):
            return
        # engine.listen gives None with whole-turn encoding: then nothing is fed
        self._listening = turns.follow(self._listening, block, lambda: self.engine.listen(self.conversation))

    def _drop_listening(self) -> None:
        if self._listening is not None:
            self._listening.cancel()
            self._listening = None

    def _trim_buffer(self, keep: int) -> None:
        if self._buffer_samples <= keep:
            return
        audio = np.concatenate(self._buffer)[-keep:] if keep else np.zeros(0, np.float32)
        self._buffer, self._buffer_samples = [audio], len(audio)

    async def _on_turn_event(self, event: Any) -> None:
        detection = self.session["audio"]["input"]["turn_detection"]
        if isinstance(event, SpeechStarted):
            self._speech_item = self._id("item")
            await self.send(
                {
                    "type": "input_audio_buffer.speech_started",
                    "item_id": self._speech_item,
                    "audio_start_ms": int(event.audio_start_ms),
                }
            )
        elif isinstance(event, BargeIn):
            if self._response is not None and detection["interrupt_response"]:
                self._cancel(self._response, "turn_detected")
        elif isinstance(event, SpeechStopped):
            await self.send(
                {
                    "type": "input_audio_buffer.speech_stopped",
                    "item_id": self._speech_item,
                    "audio_end_ms": int(event.audio_end_ms),
                }
            )
        elif isinstance(event, TurnEnded):
            item_id, self._speech_item = self._speech_item or self._id("item"), None
            self._buffer, self._buffer_samples = [], 0
            listening, self._listening = self._listening, None
            speech = event.audio if listening is None else StreamedSpeech(listening, event.audio)
            await self._commit_audio(speech, item_id)
            if detection["create_response"]:
                await self._start_response({}, None)
        elif isinstance(event, SpeechIgnored):
            log.debug("ignored %.0f ms of speech (%s)", event.speech_ms, event.reason)
            self._speech_item = None
            self._drop_listening()

    async def _commit(self, event: dict[str, Any]) -> None:
        ms = self._buffer_samples * 1000 // SAMPLE_RATE
        if ms < MIN_COMMIT_MS:
            raise ProtocolError(
                "input_audio_buffer_commit_empty",
                f"Error committing input audio buffer: buffer "
                f"too small. Expected at least {MIN_COMMIT_MS}ms of audio, but buffer only has "
                f"{ms:.2f}ms of audio.",
            )
        audio = np.concatenate(self._buffer)
        self._buffer, self._buffer_samples = [], 0
        self._drop_listening()  # a manual commit takes the whole buffer: encode it whole
        if self._turns is not None:
            self._turns.detector.reset()
        item_id, self._speech_item = self._speech_item or self._id("item"), None
        await self._commit_audio(audio, item_id)

    async def _commit_audio(self, audio: np.ndarray | StreamedSpeech, item_id: str) -> None:
        previous, self._last_item = self._last_item, item_id
        self._pending.append(("SPEECH", audio))
        await self.send({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": previous})
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        await self.send({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
        await self.send({"type": "conversation.item.done", "previous_item_id": previous, "item": item})

    async def _clear(self, event: dict[str, Any]) -> None:
        self._buffer, self._buffer_samples = [], 0
        self._block_rest = np.zeros(0, np.float32)
        self._speech_item = None
        self._drop_listening()
        if self._turns is not None:
            self._turns.detector.reset()
        await self.send({"type": "input_audio_buffer.cleared"})

    # -- conversation items ---------------------------------------------------------------

    async def _item_create(self, event: dict[str, Any]) -> None:
        item = _expect(event.get("item"), dict, "item")
        if item.get("type", "message") != "message":
            raise _unsupported(f"item.type {item.get('type')!r}", "only messages (Spirit LM cannot call tools).")
        if item.get("role") != "user":
            raise _unsupported(
                f"item.role {item.get('role')!r}",
                "only 'user' items: Spirit LM has no system prompt, and assistant items come from the model.",
            )
        content = _expect(item.get("content"), list, "item.content")
        if not content:
            raise ProtocolError("invalid_value", "item.content is empty.", "item.content")
        inputs: list[tuple[str, Any]] = []
        for index, part in enumerate(content):
            param = f"item.content[{index}]"
            _expect(part, dict, param)
            kind = part.get("type")
            if kind == "input_text":
                text = _expect(part.get("text"), str, f"{param}.text")
                if len(text) > self.limits.max_text_chars:
                    raise ProtocolError(
                        "text_too_long",
                        f"{param}.text has {len(text)} characters; the limit is {self.limits.max_text_chars}.",
                        f"{param}.text",
                    )
                if text.strip():
                    inputs.append(("TEXT", text))
            elif kind == "input_audio":
                pcm = decode_pcm16(part.get("audio"), f"{param}.audio")
                rate = self.session["audio"]["input"]["format"]["rate"]
                if len(pcm) > self.limits.max_turn_audio_s * rate:
                    raise ProtocolError(
                        "input_audio_buffer_full",
                        f"{param}.audio is longer than {self.limits.max_turn_audio_s:g} s.",
                        f"{param}.audio",
                    )
                if len(pcm) * 1000 < MIN_COMMIT_MS * rate:
                    raise ProtocolError(
                        "invalid_audio", f"{param}.audio is shorter than {MIN_COMMIT_MS} ms.", f"{param}.audio"
                    )
                samples = pcm.astype(np.float32) / 32768.0
                if rate != SAMPLE_RATE:
                    samples = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ")
                inputs.append(("SPEECH", samples))
            else:
                raise _unsupported(f"{param}.type {kind!r}", "use 'input_text' or 'input_audio'.")
        if not inputs:
            raise ProtocolError("invalid_value", "item.content holds no text and no audio.", "item.content")
        item_id = item.get("id") if isinstance(item.get("id"), str) and item.get("id") else self._id("item")
        previous, self._last_item = self._last_item, item_id
        self._pending.extend(inputs)
        out = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [
                {"type": p["type"], "text": p["text"]}
                if p["type"] == "input_text"
                else {"type": "input_audio", "transcript": None}
                for p in content
            ],
        }
        await self.send({"type": "conversation.item.added", "previous_item_id": previous, "item": out})
        await self.send({"type": "conversation.item.done", "previous_item_id": previous, "item": out})

    async def _truncate(self, event: dict[str, Any]) -> None:
        item_id = _expect(event.get("item_id"), str, "item_id")
        audio_end_ms = _expect(event.get("audio_end_ms"), int, "audio_end_ms")
        if item_id not in self._assistant_audio_ms:
            raise ProtocolError(
                "item_not_found", f"No assistant audio item {item_id!r} in this conversation.", "item_id"
            )
        sent = self._assistant_audio_ms[item_id]
        if not 0 <= audio_end_ms <= sent:
            raise ProtocolError(
                "invalid_value",
                f"audio_end_ms {audio_end_ms} is outside the item's {sent} ms of audio.",
                "audio_end_ms",
            )
        self._assistant_audio_ms[item_id] = audio_end_ms
        await self.send(
            {
                "type": "conversation.item.truncated",
                "item_id": item_id,
                "content_index": int(event.get("content_index", 0) or 0),
                "audio_end_ms": audio_end_ms,
            }
        )

    # -- responses ------------------------------------------------------------------------

    async def _response_create(self, event: dict[str, Any]) -> None:
        options = event.get("response") or {}
        await self._start_response(_expect(options, dict, "response"), event.get("event_id"))

    async def _response_cancel(self, event: dict[str, Any]) -> None:
        response = self._response
        wanted = event.get("response_id")
        if response is None or response.cancel_reason is not None or (wanted and wanted != response.id):
            raise ProtocolError("response_cancel_not_active", "Cancellation failed: no active response found.")
        self._cancel(response, "client_cancelled")

    def _cancel(self, response: _Response, reason: str) -> None:
        if response.cancel_reason is None:
            response.cancel_reason = reason
        response.request.cancel.set()

    def _response_config(self, options: dict[str, Any]) -> dict[str, Any]:
        _unknown(
            options,
            {
                "output_modalities",
                "max_output_tokens",
                "temperature",
                "top_p",
                "audio",
                "instructions",
                "tools",
                "tool_choice",
                "conversation",
                "metadata",
                "input",
                "prompt",
            },
            "response",
        )
        if options.get("instructions"):
            raise _unsupported("response.instructions", "Spirit LM takes no instructions.")
        if options.get("tools"):
            raise _unsupported("response.tools", "Spirit LM cannot call tools.")
        if options.get("conversation") not in (None, "auto"):
            raise _unsupported("response.conversation", "every response belongs to the connection's conversation.")
        if options.get("input") is not None or options.get("prompt"):
            raise _unsupported("response.input", "a response answers the conversation's pending items.")
        config = {k: self.session[k] for k in ("output_modalities", "max_output_tokens", "temperature", "top_p")}
        config["voice"] = self.session["audio"]["output"]["voice"]
        if "output_modalities" in options:
            config["output_modalities"] = _modalities(options["output_modalities"], "response.output_modalities")
        if "max_output_tokens" in options:
            config["max_output_tokens"] = _max_tokens(options["max_output_tokens"], "response.max_output_tokens")
        if "temperature" in options:
            config["temperature"] = _number(options["temperature"], "response.temperature", 0.0, 2.0)
        if "top_p" in options:
            config["top_p"] = _number(options["top_p"], "response.top_p", 1e-6, 1.0)
        audio = options.get("audio")
        if audio:
            out = _expect(_expect(audio, dict, "response.audio").get("output") or {}, dict, "response.audio.output")
            if "voice" in out:
                config["voice"] = _voice(out["voice"], "response.audio.output.voice")
        return config

    async def _start_response(self, options: dict[str, Any], event_id: str | None) -> None:
        config = self._response_config(options)
        if self._response is not None and self._response.cancel_reason is None:
            raise ProtocolError(
                "conversation_already_has_active_response",
                "Conversation already has an active "
                f"response in progress: {self._response.id}. Wait until the response is finished "
                "before creating a new one (or cancel it).",
            )
        if not self._pending and not self.conversation.segments:
            raise ProtocolError(
                "nothing_to_respond_to", "The conversation is empty: commit audio or create a user item first."
            )
        self.engine.reserve()  # raises Busy; from here on, the response's task gives the place back
        previous = self._response
        inputs, self._pending = self._pending, []
        request = TurnRequest(
            inputs,
            output_modality(config["output_modalities"]),
            int(config["voice"]),
            sampling_config(config, self.engine.n_ctx),
        )
        response = _Response(
            self._id("resp"),
            self._id("item"),
            config["output_modalities"],
            config["voice"],
            self.session["audio"]["output"]["format"]["rate"],
            request,
            time.perf_counter(),
        )
        self._response = response
        response.task = asyncio.create_task(self._run_response(response, config, previous))

    def _response_object(self, response: _Response, status: str, output: list, **extra: Any) -> dict[str, Any]:
        return {
            "object": "realtime.response",
            "id": response.id,
            "status": status,
            "output": output,
            "conversation_id": self.session["id"],
            "output_modalities": response.modalities,
            "audio": {
                "output": {"format": {"type": "audio/pcm", "rate": response.output_rate}, "voice": response.voice}
            },
            **extra,
        }

    def _content(self, response: _Response) -> dict[str, Any]:
        if response.modalities == ["text"]:
            return {"type": "output_text", "text": response.text}
        return {"type": "output_audio", "transcript": response.text}

    def _item(self, response: _Response, status: str) -> dict[str, Any]:
        return {
            "id": response.item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": [self._content(response)],
        }

    async def _run_response(self, response: _Response, config: dict[str, Any], previous: _Response | None) -> None:
        try:
            await self._open_response(response, config, previous)
        except BaseException:
            self.engine.release()  # the turn never reached the model: give back its place in the queue
            raise
        await self._stream_response(response)

    async def _open_response(self, response: _Response, config: dict[str, Any], previous: _Response | None) -> None:
        if previous is not None and previous.task is not None:
            await asyncio.gather(previous.task, return_exceptions=True)  # answers never overlap
        ids, text_only = response.ids, response.text_only
        await self.send(
            {
                "type": "response.created",
                "response": self._response_object(
                    response, "in_progress", [], max_output_tokens=config["max_output_tokens"]
                ),
            }
        )
        item = self._item(response, "in_progress")
        item["content"] = []
        await self.send(
            {"type": "response.output_item.added", "response_id": response.id, "output_index": 0, "item": item}
        )
        response.previous_item, self._last_item = self._last_item, response.item_id
        await self.send({"type": "conversation.item.added", "previous_item_id": response.previous_item, "item": item})
        part = {"type": "text", "text": ""} if text_only else {"type": "audio", "transcript": ""}
        await self.send({"type": "response.content_part.added", **ids, "part": part})

    async def _stream_response(self, response: _Response) -> None:
        ids, text_only = response.ids, response.text_only
        events: asyncio.Queue = asyncio.Queue()
        status, timings, failure = "completed", {}, None
        runner = asyncio.create_task(self.engine.run_turn(self.conversation, response.request, events.put_nowait))
        try:
            while not runner.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, runner}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                await self._stream_event(response, getter.result(), ids, text_only)
            outcome = runner.result()
            status, timings = outcome.status, outcome.timings
        except Exception as exc:  # a model failure ends this response, not the connection
            log.exception("response %s failed", response.id)
            status, failure = "failed", {"type": "server_error", "code": "model_error", "message": str(exc)}
        await self._finish_response(response, status, timings, failure, ids, text_only)

    async def _stream_event(self, response: _Response, event: Any, ids: dict, text_only: bool) -> None:
        if response.cancel_reason is not None:
            return  # cancelled: nothing more goes out, the worker is stopping
        if isinstance(event, TextDelta):
            response.text += event.text
            kind = "response.output_text.delta" if text_only else "response.output_audio_transcript.delta"
            await self.send({"type": kind, **ids, "delta": event.text})
        elif isinstance(event, AudioChunk) and not text_only:
            samples = np.asarray(event.samples, np.float32).reshape(-1)
            if response.output_rate != event.sample_rate:
                if response.resampler is None:
                    response.resampler = soxr.ResampleStream(
                        event.sample_rate, response.output_rate, 1, dtype="float32", quality="HQ"
                    )
                samples = response.resampler.resample_chunk(samples)
            await self._send_audio(response, samples, ids)
        elif isinstance(event, TurnEnd) and event.text and not response.text:
            response.text = event.text

    async def _send_audio(self, response: _Response, samples: np.ndarray, ids: dict) -> None:
        if not len(samples):
            return
        if response.first_audio_s is None:
            response.first_audio_s = time.perf_counter() - response.started
        response.audio_samples += len(samples)
        await self.send({"type": "response.output_audio.delta", **ids, "delta": encode_pcm16(samples)})

    async def _finish_response(
        self, response: _Response, status: str, timings: dict, failure: dict | None, ids: dict, text_only: bool
    ) -> None:
        if status == "completed" and response.cancel_reason is None and response.resampler is not None:
            await self._send_audio(response, response.resampler.resample_chunk(np.zeros(0, np.float32), last=True), ids)
        details: dict[str, Any] | None = None
        if response.cancel_reason in ("client_cancelled", "turn_detected"):
            status, details = "cancelled", {"type": "cancelled", "reason": response.cancel_reason}
        elif response.cancel_reason is not None:  # the server ended it (shutdown, client gone): no protocol reason
            error = {
                "type": "server_error",
                "code": response.cancel_reason,
                "message": f"cancelled: {response.cancel_reason}",
            }
            status, details = "cancelled", {"type": "cancelled", "error": error}
        elif status == "failed":
            details = {"type": "failed", "error": failure}
        elif timings.get("new_tokens", 0) >= response.request.sampling.max_new_tokens:
            status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        audio_ms = response.audio_samples * 1000 // response.output_rate
        if text_only:
            await self.send({"type": "response.output_text.done", **ids, "text": response.text})
        else:
            await self.send({"type": "response.output_audio.done", **ids})
            await self.send({"type": "response.output_audio_transcript.done", **ids, "transcript": response.text})
            self._assistant_audio_ms[response.item_id] = audio_ms
        part = {"type": "text", "text": response.text} if text_only else {"type": "audio", "transcript": response.text}
        await self.send({"type": "response.content_part.done", **ids, "part": part})
        item = self._item(response, "completed" if status == "completed" else "incomplete")
        await self.send(
            {"type": "response.output_item.done", "response_id": response.id, "output_index": 0, "item": item}
        )
        await self.send({"type": "conversation.item.done", "previous_item_id": response.previous_item, "item": item})
        input_tokens, output_tokens = int(timings.get("prompt_tokens", 0)), int(timings.get("new_tokens", 0))
        usage = {
            "total_tokens": input_tokens + output_tokens,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
        }
        total_s = time.perf_counter() - response.started
        first_audio_ms = None if response.first_audio_s is None else round(response.first_audio_s * 1000, 1)
        extension = {
            "audio_ms": audio_ms,
            "first_audio_ms": first_audio_ms,
            "total_ms": round(total_s * 1000, 1),
            "timings": timings,
        }
        await self.send(
            {
                "type": "response.done",
                "response": self._response_object(
                    response, status, [item], status_details=details, usage=usage, spiritlm=extension
                ),
            }
        )
        if self.metrics is not None:
            self.metrics.turn(status, response.first_audio_s, total_s, timings.get("decode_tokens_per_s"))
        if self._response is response:
            self._response = None
