"""``spiritlm-edge serve``: the Realtime WebSocket API, the kiosk page, health and metrics.

Built on aiohttp: one maintained dependency that is an HTTP server, a WebSocket server
(with ping/pong heartbeats and a frame-size cap) and a static file server, on asyncio,
with no separate ASGI server to run. Routes:

``GET /v1/realtime``  WebSocket, the Realtime protocol (``server/realtime.py``); ``?model=`` is accepted
``GET /``             the kiosk page (``server/static/``)
``GET /healthz``      200 once the engines are loaded, 503 while loading
``GET /metrics``      Prometheus text format

Security: loopback by default; any other address needs a token (``Authorization: Bearer``
or the ``openai-insecure-api-key.<token>`` WebSocket subprotocol browsers can send); the
browser ``Origin`` must be this server's own or one given with ``allow_origins``; TLS with
a certificate and key (browsers give the microphone to a page on another machine only over
HTTPS).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from spiritlm_edge.runtime.errors import SpiritLMEdgeError
from spiritlm_edge.server.engine import Engine
from spiritlm_edge.server.realtime import Limits, RealtimeSession

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
KEY_SUBPROTOCOL = "openai-insecure-api-key."  # the form the OpenAI browser clients send a key in
HEARTBEAT_S = 20.0
FRAME_CAP_FACTOR = 4  # frames above this many times max_message_bytes close the connection (1009)

ENGINE: web.AppKey[Engine | None] = web.AppKey("engine", Engine | None)  # type: ignore[arg-type]
CONFIG: web.AppKey[ServerConfig] = web.AppKey("config", object)  # type: ignore[arg-type]
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", object)  # type: ignore[arg-type]
SESSIONS: web.AppKey[set[Any]] = web.AppKey("sessions", set)
LOAD_ERROR: web.AppKey[str] = web.AppKey("load_error", str)


class ServerConfigError(SpiritLMEdgeError):
    """A server setting that would be unsafe or cannot work."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    allow_origins: list[str] = field(default_factory=list)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    limits: Limits = field(default_factory=Limits)

    def check(self) -> None:
        """Refuse settings that expose the model without a token, or half a TLS pair."""
        if not is_loopback(self.host) and not self.token:
            raise ServerConfigError(
                f"Binding {self.host} exposes the model to the network: give --token SECRET (clients send "
                "'Authorization: Bearer SECRET'), or bind 127.0.0.1."
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ServerConfigError("Give both --tls-cert and --tls-key (PEM files), or neither.")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not Path(path).is_file():
                raise ServerConfigError(f"TLS file {path} does not exist.")
        if self.token is not None and (len(self.token) < 8 or not self.token.isprintable() or " " in self.token):
            raise ServerConfigError("--token must be at least 8 printable characters without spaces.")

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls_cert is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(str(self.tls_cert), str(self.tls_key))
        except (ssl.SSLError, OSError) as exc:
            raise ServerConfigError(f"Cannot load the TLS certificate/key: {exc}.") from None
        return context


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Metrics:
    """What /metrics reports, in a registry of its own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.turns = Counter("spiritlm_turns", "Responses by final status.", ["status"], registry=r)
        self.first_audio = Histogram(
            "spiritlm_time_to_first_audio_seconds",
            "From response start to its first audio delta.",
            registry=r,
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
        )
        self.turn_seconds = Histogram(
            "spiritlm_turn_seconds",
            "From response start to response.done.",
            registry=r,
            buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0),
        )
        self.tokens_per_s = Histogram(
            "spiritlm_decode_tokens_per_second",
            "LM decode speed per turn.",
            registry=r,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
        )
        self.sessions = Gauge("spiritlm_sessions", "Open Realtime connections.", registry=r)
        self.sessions_total = Counter("spiritlm_connections", "Realtime connections accepted.", registry=r)
        self.errors = Counter("spiritlm_errors", "Error events sent, by code.", ["code"], registry=r)

    def turn(self, status: str, first_audio_s: float | None, total_s: float, tokens_per_s: float | None) -> None:
        self.turns.labels(status).inc()
        if first_audio_s is not None:
            self.first_audio.observe(first_audio_s)
        self.turn_seconds.observe(total_s)
        if tokens_per_s:
            self.tokens_per_s.observe(tokens_per_s)

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()


# ----------------------------------------------------------------------------- handlers


def _origin_allowed(request: web.Request, config: ServerConfig) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser: the token (if any) decides
    own = f"{request.scheme}://{request.host}"
    return origin in (own, *config.allow_origins)


def _token_ok(request: web.Request, token: str | None) -> bool:
    if not token:
        return True
    offered = []
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        offered.append(auth[7:].strip())
    for protocol in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        protocol = protocol.strip()
        if protocol.startswith(KEY_SUBPROTOCOL):
            offered.append(protocol[len(KEY_SUBPROTOCOL) :])
    return any(hmac.compare_digest(candidate.encode(), token.encode()) for candidate in offered)


def _refuse(metrics: Metrics, status: int, code: str, message: str) -> web.Response:
    """An HTTP answer to a handshake we refuse (the WebSocket never opens)."""
    metrics.error(code)
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


async def realtime_ws(request: web.Request) -> web.StreamResponse:
    app = request.app
    config, metrics = app[CONFIG], app[METRICS]
    if not _origin_allowed(request, config):
        return _refuse(
            metrics,
            403,
            "forbidden_origin",
            "This Origin may not connect; start the server with --allow-origin ORIGIN to allow it.",
        )
    if not _token_ok(request, config.token):
        return _refuse(metrics, 401, "invalid_token", "Missing or wrong token: send 'Authorization: Bearer TOKEN'.")
    engine = app[ENGINE]
    if engine is None:
        return web.json_response(
            {"error": {"code": "not_ready", "message": "The model is still loading."}},
            status=503,
            headers={"Retry-After": "5"},
        )
    limits = config.limits
    ws = web.WebSocketResponse(
        protocols=("realtime",),
        heartbeat=HEARTBEAT_S,
        compress=False,
        max_msg_size=limits.max_message_bytes * FRAME_CAP_FACTOR,
    )
    await ws.prepare(request)
    sessions = app[SESSIONS]
    if len(sessions) >= limits.max_connections:
        metrics.error("busy")
        await ws.send_json(
            {
                "type": "error",
                "event_id": "event_busy",
                "error": {
                    "type": "server_error",
                    "code": "busy",
                    "message": f"The server holds {limits.max_connections} connections already; try again later.",
                },
            }
        )
        await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"busy")
        return ws

    async def send(event: dict[str, Any]) -> None:
        if ws.closed:
            raise ConnectionError("closed")
        await ws.send_str(json.dumps(event, separators=(",", ":")))

    session = RealtimeSession(engine, send, limits, metrics)
    sessions.add((session, ws))
    metrics.sessions.inc()
    metrics.sessions_total.inc()
    try:
        await session.start()
        while True:
            try:
                message = await ws.receive(timeout=limits.idle_timeout_s)
            except asyncio.TimeoutError:
                await session.error("idle_timeout", f"No event for {limits.idle_timeout_s:g} s: closing.")
                break
            if message.type == WSMsgType.TEXT:
                await session.handle(message.data)
            elif message.type == WSMsgType.BINARY:
                await session.error(
                    "binary_frame",
                    "Events are JSON text frames; binary frames are not part of "
                    "the protocol (audio goes base64 in input_audio_buffer.append).",
                )
            else:  # CLOSE, CLOSING, CLOSED, or ERROR (e.g. a frame over the cap: closed with 1009)
                if message.type == WSMsgType.ERROR:
                    log.info("connection closed: %s", ws.exception())
                break
    finally:
        await session.close()
        sessions.discard((session, ws))
        metrics.sessions.dec()
        if not ws.closed:
            await ws.close()
    return ws


async def healthz(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    if LOAD_ERROR in request.app:
        return web.json_response({"status": "failed", "error": request.app[LOAD_ERROR]}, status=500)
    if engine is None:
        return web.json_response({"status": "loading"}, status=503)
    return web.json_response(
        {
            "status": "ready",
            "variant": engine.variant,
            "sessions": len(request.app[SESSIONS]),
            "queued_turns": engine.queued,
        }
    )


async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def security_headers(request: web.Request, handler: Any) -> web.StreamResponse:
    response = await handler(request)
    if not isinstance(response, web.WebSocketResponse):
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; media-src 'self' blob:",
        )
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def create_app(config: ServerConfig, engine: Engine | None = None, load_engine: Any = None) -> web.Application:
    """The aiohttp application. ``engine``: a loaded model; or ``load_engine``, a function that
    loads one, run in a thread at start-up while /healthz says "loading"."""
    config.check()
    app = web.Application(middlewares=[security_headers], client_max_size=1 << 16)
    app[CONFIG] = config
    app[ENGINE] = engine
    app[METRICS] = Metrics()
    app[SESSIONS] = set()
    app.router.add_get("/v1/realtime", realtime_ws)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)

    async def load(app: web.Application) -> Any:
        task = None
        if app[ENGINE] is None and load_engine is not None:

            async def loader() -> None:
                started = time.perf_counter()
                try:
                    app[ENGINE] = await asyncio.get_running_loop().run_in_executor(None, load_engine)
                except Exception as exc:
                    app[LOAD_ERROR] = str(exc)
                    log.error("loading the model failed: %s", exc)
                    return
                log.info("model loaded in %.1f s: ready", time.perf_counter() - started)

            task = asyncio.create_task(loader())
        yield
        if task is not None and not task.done():
            task.cancel()

    async def shutdown(app: web.Application) -> None:
        # SIGTERM / Ctrl-C: cancel the turns in flight (the worker stops within one decode
        # step) and tell every client why its connection closes.
        for session, ws in list(app[SESSIONS]):  # type: ignore[index]
            await session.error("server_shutdown", "The server is shutting down.", type="server_error")
            await session.close("server_shutdown")
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

    async def cleanup(app: web.Application) -> None:
        engine = app[ENGINE]
        if load_engine is not None and engine is not None:  # an engine handed in stays its owner's
            await asyncio.get_running_loop().run_in_executor(None, engine.close)

    app.cleanup_ctx.append(load)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    return app


def serve(bundle: str | os.PathLike, config: ServerConfig, **spirit_lm_options: Any) -> None:
    """Load ``bundle`` and serve until SIGTERM / Ctrl-C (both end cleanly)."""
    config.check()
    ssl_context = config.ssl_context()

    def load_engine() -> Engine:
        return Engine.from_bundle(bundle, max_queued_turns=config.limits.max_queued_turns, **spirit_lm_options)

    from spiritlm_edge.runtime.bundle import Bundle

    Bundle(bundle)  # a wrong path is a clear error now, not in the loader thread
    app = create_app(config, load_engine=load_engine)
    scheme = "https" if ssl_context else "http"
    host = f"[{config.host}]" if ":" in config.host else config.host
    log.info(
        "serving %s on %s://%s:%d (page /, WebSocket /v1/realtime, /healthz, /metrics)",
        bundle,
        scheme,
        host,
        config.port,
    )
    web.run_app(
        app,
        host=config.host,
        port=config.port,
        ssl_context=ssl_context,
        print=None,
        shutdown_timeout=10.0,
        handle_signals=True,
    )
