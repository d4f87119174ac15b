"""Helpers for the server tests: a server in a background thread, a Realtime client that
checks every server event against the official openai SDK's pydantic models."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import typing
from typing import Any

import aiohttp
import numpy as np
import soxr
from aiohttp import web
from openai.types.realtime import RealtimeServerEvent

# event type -> the SDK's pydantic model for it
SERVER_MODELS = {
    model.model_fields["type"].annotation.__args__[0]: model
    for model in typing.get_args(typing.get_args(RealtimeServerEvent)[0])
}


def _as_protocol_rate(value: Any) -> Any:
    """Our 16 kHz extension, seen as the protocol's 24 kHz for validation (the SDK pins the rate)."""
    if isinstance(value, dict):
        if value.get("type") == "audio/pcm" and value.get("rate") == 16000:
            return {**value, "rate": 24000}
        return {k: _as_protocol_rate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_protocol_rate(v) for v in value]
    return value


def validate_server_event(event: dict) -> None:
    """Strict validation with the SDK's own model for the event's type."""
    model = SERVER_MODELS.get(event.get("type"))
    assert model is not None, f"not a server event of the protocol: {event.get('type')!r}"
    model.model_validate(_as_protocol_rate(event), strict=False)


class RunningServer:
    """An aiohttp app served on a free loopback port by its own event loop in a thread."""

    def __init__(self, app: web.Application, ssl_context=None, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app, handle_signals=False)
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.thread.start()

        async def start():
            await self.runner.setup()
            site = web.TCPSite(self.runner, host, port, ssl_context=ssl_context, reuse_address=True)
            await site.start()
            return self.runner.addresses[0][1]

        self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        scheme = "wss" if ssl_context else "ws"
        self.url = f"{scheme}://{host}:{self.port}/v1/realtime"
        self.http = f"{'https' if ssl_context else 'http'}://{host}:{self.port}"

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Client:
    """A bare Realtime WebSocket client (aiohttp) that validates what the server sends."""

    def __init__(self, url: str, headers: dict | None = None, ssl: Any = None, protocols: tuple = ()):
        self.url, self.headers, self.ssl, self.protocols = url, headers or {}, ssl, protocols
        self.events: list[dict] = []

    async def __aenter__(self) -> Client:
        self.http = aiohttp.ClientSession()
        try:
            self.ws = await self.http.ws_connect(
                self.url, headers=self.headers, ssl=self.ssl, protocols=self.protocols, max_msg_size=0
            )
        except BaseException:
            await self.http.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            await self.ws.close()
        except ConnectionError:
            pass  # the server already closed (or the kernel reset) this connection
        finally:
            await self.http.close()

    async def send(self, event: dict | str) -> None:
        await self.ws.send_str(event if isinstance(event, str) else json.dumps(event))

    async def recv(self, timeout: float = 60) -> dict:
        message = await self.ws.receive(timeout=timeout)
        if message.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"connection ended: {message.type!r} {message.data!r} {message.extra!r}")
        event = json.loads(message.data)
        validate_server_event(event)  # the SDK's own models: an independent check of every field
        self.events.append(event)
        return event

    async def until(self, kind: str, timeout: float = 60) -> list[dict]:
        """Events up to and including the first of type ``kind``."""
        got = []
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            event = await self.recv(max(0.1, deadline - asyncio.get_running_loop().time()))
            got.append(event)
            if event["type"] == kind:
                return got


def pcm16_b64(samples: np.ndarray) -> str:
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode()


def decode_deltas(events: list[dict]) -> np.ndarray:
    raw = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")
    return np.frombuffer(raw, "<i2").astype(np.float32) / 32768


def clip_24k(clip_16k: np.ndarray) -> np.ndarray:
    return soxr.resample(clip_16k, 16000, 24000).astype(np.float32)


def chunks(samples: np.ndarray, rate: int = 24000, ms: int = 100):
    step = rate * ms // 1000
    for start in range(0, len(samples), step):
        yield samples[start : start + step]
