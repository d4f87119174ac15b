"""What the Realtime server adds: time to first audio through ``spiritlm-edge serve`` (the
official openai SDK's Realtime client over loopback) against the same turn in-process, on the
same bundle, interleaved in one run.

    python -m spiritlm_edge.bench.server --bundle B --repeat 10 [--max-new-tokens 60] [--json out.json]

Both paths answer the LibriSpeech clip greedily with the LM's KV cache cleared before every
turn, so each turn costs the same work. In-process: ``Conversation.stream`` on the server's
own model, from the call to the first :class:`AudioChunk`. Server: the clip is appended at
24 kHz in 100 ms chunks and committed (manual turn detection, so no VAD silence wait), then
the clock runs from sending ``response.create`` to receiving the first
``response.output_audio.delta``. The server runs in this process on its own event loop thread.
On a loaded machine the two medians are noisy; the paired figure is not: for each server turn,
the client-seen time minus the pipeline's own ``first_audio_s`` of that very turn (reported in
``response.done``), i.e. what the server and the wire add (hand-off to the worker, resampling,
base64, JSON, WebSocket, the client's parsing).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from spiritlm_edge.runtime.audio import BUNDLED_CLIP, load_audio
from spiritlm_edge.runtime.cpu_buffers import cpu_model
from spiritlm_edge.runtime.events import AudioChunk
from spiritlm_edge.server.app import ServerConfig, create_app
from spiritlm_edge.server.engine import Engine

PAUSE_S = 0.3  # between turns


class _ServerThread:
    def __init__(self, engine: Engine):
        from aiohttp import web

        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(create_app(ServerConfig(port=0), engine=engine), handle_signals=False)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> int:
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", 0).start()
            return self.runner.addresses[0][1]

        self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(60)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def in_process_turn(engine: Engine, clip: np.ndarray, sampling: dict[str, Any]) -> float:
    conversation = engine.conversation()
    engine.spirit_lm.lm.reset()
    started = time.perf_counter()
    stream = conversation.stream([("SPEECH", clip)], output_modality="SPEECH", **sampling)
    try:
        for event in stream:
            if isinstance(event, AudioChunk):
                return time.perf_counter() - started
    finally:
        stream.close()
    raise RuntimeError("the in-process turn produced no audio: raise --max-new-tokens")


async def server_turn(engine: Engine, port: int, clip_24k: np.ndarray, max_new_tokens: int) -> tuple[float, float]:
    """Time to first audio seen by the client, and the pipeline's own first_audio_s for the same turn."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="loopback", websocket_base_url=f"ws://127.0.0.1:{port}/v1")
    async with client.realtime.connect(model="spiritlm") as connection:
        session: Any = {  # temperature: our extension (greedy), not in the SDK's session type
            "type": "realtime",
            "output_modalities": ["audio"],
            "max_output_tokens": max_new_tokens,
            "temperature": 0,
            "audio": {"input": {"turn_detection": None}},
        }
        await connection.session.update(session=session)
        pcm = np.clip(np.round(clip_24k * 32767), -32768, 32767).astype("<i2")
        for start in range(0, len(pcm), 2400):
            chunk = base64.b64encode(pcm[start : start + 2400].tobytes()).decode()
            await connection.input_audio_buffer.append(audio=chunk)
        await connection.input_audio_buffer.commit()
        async for event in connection:
            if event.type == "input_audio_buffer.committed":
                break
            if event.type == "error":
                raise RuntimeError(event.error.message)
        engine.spirit_lm.lm.reset()  # the model is idle: same cold cache as the in-process turn
        started = time.perf_counter()
        await connection.response.create()
        first = None
        async for event in connection:
            if event.type == "response.output_audio.delta" and first is None:
                first = time.perf_counter() - started
            elif event.type == "error":
                raise RuntimeError(event.error.message)
            elif event.type == "response.done":
                pipeline = (event.response.model_extra or {}).get("spiritlm", {}).get("timings", {})
                break
    if first is None or "first_audio_s" not in pipeline:
        raise RuntimeError("the server turn produced no audio: raise --max-new-tokens")
    return first, pipeline["first_audio_s"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    engine = Engine.from_bundle(args.bundle, n_threads=args.threads)
    clip = load_audio(BUNDLED_CLIP)
    clip_24k = soxr.resample(clip, 16000, 24000).astype(np.float32)
    sampling = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    server = _ServerThread(engine)
    in_process, through_server, paired = [], [], []
    try:
        for i in range(args.warmup + args.repeat):
            # Alternate which path goes first, and let the previous turn's teardown (connection close,
            # garbage) finish: otherwise the second turn of each pair pays for the first.
            if i % 2 == 0:
                time.sleep(PAUSE_S)
                a = in_process_turn(engine, clip, sampling)
            time.sleep(PAUSE_S)
            b, pipeline = asyncio.run(server_turn(engine, server.port, clip_24k, args.max_new_tokens))
            if i % 2 == 1:
                time.sleep(PAUSE_S)
                a = in_process_turn(engine, clip, sampling)
            if i >= args.warmup:
                in_process.append(a)
                through_server.append(b)
                paired.append(b - pipeline)
    finally:
        server.stop()
        engine.close()
    median_in, median_server = statistics.median(in_process), statistics.median(through_server)
    result = {
        "bundle": str(args.bundle),
        "variant": engine.variant,
        "cpu": cpu_model(),
        "repeat": args.repeat,
        "max_new_tokens": args.max_new_tokens,
        "in_process_first_audio_ms": round(median_in * 1000, 1),
        "server_first_audio_ms": round(median_server * 1000, 1),
        "added_ms": round((median_server - median_in) * 1000, 1),
        "added_percent": round(100 * (median_server - median_in) / median_in, 1),
        "added_paired_ms": round(statistics.median(paired) * 1000, 1),
        "in_process_runs_ms": [round(x * 1000, 1) for x in in_process],
        "server_runs_ms": [round(x * 1000, 1) for x in through_server],
    }
    print(f"time to first audio, median of {args.repeat} ({result['cpu']}):")
    print(f"  in-process            {result['in_process_first_audio_ms']:8.1f} ms")
    print(f"  through the server    {result['server_first_audio_ms']:8.1f} ms  (openai SDK Realtime client, loopback)")
    print(
        f"  added by the server   {result['added_ms']:8.1f} ms  ({result['added_percent']:+.1f} %, "
        "difference of the medians)"
    )
    print(
        f"  added, paired         {result['added_paired_ms']:8.1f} ms  client-seen minus the pipeline's own "
        "first_audio_s, same turn"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
