"""The Realtime server (server/): protocol, interoperability with the official openai SDK,
bad input, limits, security, concurrency, cancellation, shutdown. Every server event is
validated against the openai SDK's own pydantic models (tests/server_utils.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import soxr
from server_utils import Client, RunningServer, chunks, clip_24k, decode_deltas, pcm16_b64

from spiritlm_edge.server.app import SESSIONS, ServerConfig, ServerConfigError, create_app
from spiritlm_edge.server.engine import Engine
from spiritlm_edge.server.realtime import Limits

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def engine(tiny_base_bundle):
    engine = Engine.from_bundle(tiny_base_bundle, n_threads=1, max_queued_turns=16)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine):
    limits = Limits(max_connections=12, max_queued_turns=16, max_message_bytes=256 * 1024)
    running = RunningServer(create_app(ServerConfig(port=0, limits=limits), engine=engine))
    yield running
    running.stop()


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


TEXT_ONLY = {
    "type": "session.update",
    "session": {"type": "realtime", "output_modalities": ["text"], "max_output_tokens": 8},
}


def text_item(text: str) -> dict:
    return {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
    }


async def text_turn(client: Client, text: str = "Hello there", **response) -> list[dict]:
    await client.send(text_item(text))
    await client.send({"type": "response.create", **({"response": response} if response else {})})
    return await client.until("response.done")


async def speak(client: Client, audio_24k: np.ndarray, silence_s: float = 2.5) -> None:
    signal_ = np.concatenate([audio_24k, np.zeros(int(silence_s * 24000), np.float32)])
    for piece in chunks(signal_):
        await client.send({"type": "input_audio_buffer.append", "audio": pcm16_b64(piece)})


async def update_session(client: Client, **session) -> dict:
    """session.update with these fields; returns the session.updated event."""
    await client.send({"type": "session.update", "session": session})
    return (await client.until("session.updated"))[-1]


async def start_long_answer(client: Client, text: str) -> None:
    """A fresh connection's first answer, long enough to be stopped while it streams audio."""
    await client.recv()
    await client.send({"type": "session.update", "session": {"max_output_tokens": 4096}})
    await client.send(text_item(text))
    await client.send({"type": "response.create"})
    await client.until("response.output_audio.delta")


# ----------------------------------------------------------------------------- the protocol


def test_spoken_turn_with_server_vad(server, clip):
    async def main():
        async with Client(server.url) as client:
            created = await client.recv()
            assert created["type"] == "session.created" and created["session"]["type"] == "realtime"
            await client.send(
                {
                    "type": "session.update",
                    "session": {
                        "type": "realtime",
                        "max_output_tokens": 60,
                        "audio": {
                            "input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 2000}},
                            "output": {"voice": "1"},
                        },
                    },
                }
            )
            updated = await client.until("session.updated")
            assert updated[-1]["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 2000
            await speak(client, clip_24k(clip))
            events = await client.until("response.done", timeout=90)
            return [e["type"] for e in events], events

    kinds, events = run(main())
    order = [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "response.created",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_audio.delta",
        "response.output_audio.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.done",
    ]
    positions = [kinds.index(k) for k in order]
    assert positions == sorted(positions), kinds
    started = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")
    stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
    # The clip's speech starts ~0.2 s in and ends ~0.25 s before its end; 2 s of silence end the turn.
    assert 0 <= started["audio_start_ms"] <= 400
    clip_ms = len(clip) / 16
    assert clip_ms + 1500 <= stopped["audio_end_ms"] <= clip_ms + 2400
    audio = decode_deltas(events)
    assert len(audio) > 0.3 * 24000 and np.sqrt(np.mean(audio**2)) > 1e-3  # 24 kHz PCM, not silence
    done = events[-1]["response"]
    assert done["status"] in ("completed", "incomplete") and done["usage"]["output_tokens"] > 0
    assert done["spiritlm"]["audio_ms"] == pytest.approx(len(audio) / 24, abs=1)
    assert done["spiritlm"]["first_audio_ms"] > 0 and "decode_s" in done["spiritlm"]["timings"]
    assert done["output"][0]["role"] == "assistant"
    # the server's default: the turn was encoded (and prefilled, as far as it got) while it arrived
    assert "streamed_prefill_tokens" in done["spiritlm"]["timings"]


def test_paced_speech_is_prefilled_while_it_arrives(server, engine, clip):
    """Audio sent at twice real time: the Listening encodes and prefills during the turn,
    and only the rest is left when it ends."""
    # an earlier test may have left this very prompt in the cache (KV reuse across connections)
    engine.spirit_lm.lm.reset()

    async def main():
        async with Client(server.url) as client:
            await client.recv()
            await update_session(
                client,
                max_output_tokens=20,
                audio={"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 2000}}},
            )
            signal_ = np.concatenate([clip_24k(clip), np.zeros(int(2.5 * 24000), np.float32)])
            for piece in chunks(signal_):
                await client.send({"type": "input_audio_buffer.append", "audio": pcm16_b64(piece)})
                await asyncio.sleep(len(piece) / 24000 / 2)
            return await client.until("response.done", timeout=90)

    done = run(main())[-1]["response"]
    timings = done["spiritlm"]["timings"]
    assert timings["streamed_windows"] >= 2 and timings["streamed_prefill_tokens"] > 0
    # the 2.5 s of trailing silence let the turn be finished on trial before the detector ended it
    assert timings["streamed_finish"] == 1.0


def test_text_turn_and_kv_reuse(server, engine):
    async def main():
        async with Client(server.url) as client:
            await client.recv()
            await client.send(TEXT_ONLY)
            await client.until("session.updated")
            first = await text_turn(client, "The capital of France is")
            second = await text_turn(client, "and of Italy")
            return first, second

    first, second = run(main())
    for events in (first, second):
        kinds = [e["type"] for e in events]
        assert "response.output_audio.delta" not in kinds
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        done_text = next(e for e in events if e["type"] == "response.output_text.done")["text"]
        assert done_text == deltas
        assert events[-1]["response"]["usage"]["output_tokens"] > 0
    # The second turn's prompt holds the first turn: more prompt tokens than the first.
    assert second[-1]["response"]["usage"]["input_tokens"] > first[-1]["response"]["usage"]["input_tokens"]


def test_mixed_turn_manual_commit_and_16k_extension(server, clip):
    async def main():
        async with Client(server.url) as client:
            await client.recv()
            pcm16k = {"type": "audio/pcm", "rate": 16000}
            audio = {"input": {"format": pcm16k, "turn_detection": None}, "output": {"format": pcm16k}}
            await update_session(client, max_output_tokens=30, audio=audio)
            for piece in chunks(clip[:32000], rate=16000):
                await client.send({"type": "input_audio_buffer.append", "audio": pcm16_b64(piece)})
            await client.send({"type": "input_audio_buffer.commit"})
            committed = await client.until("input_audio_buffer.committed")
            await client.send(text_item("and then"))
            await client.send({"type": "response.create", "response": {"output_modalities": ["audio", "text"]}})
            events = await client.until("response.done")
            return committed, events

    committed, events = run(main())
    assert not any(e["type"].startswith("input_audio_buffer.speech") for e in committed)  # no VAD
    done = events[-1]["response"]
    assert done["audio"]["output"]["format"]["rate"] == 16000 and done["output_modalities"] == ["audio", "text"]
    assert done["spiritlm"]["audio_ms"] == pytest.approx(len(decode_deltas(events)) / 16, abs=1)


def test_cancel_stops_generation_within_a_decode_step(server, engine):
    async def main():
        async with Client(server.url) as client:
            await start_long_answer(client, "Tell me everything")
            cancelled_at = time.perf_counter()
            await client.send({"type": "response.cancel"})
            events = await client.until("response.done")
            elapsed = time.perf_counter() - cancelled_at
            done = events[-1]["response"]
            # The worker is free again at once: the next turn runs.
            await client.send({"type": "session.update", "session": {"max_output_tokens": 10}})
            again = await text_turn(client, "Again")
            return done, elapsed, again

    done, elapsed, again = run(main())
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
    assert done["output"][0]["status"] == "incomplete"
    assert done["usage"]["output_tokens"] < 4096
    assert elapsed < 3.0  # within a decode step, or the end of the vocoder chunk being computed
    assert again[-1]["response"]["status"] in ("completed", "incomplete")
    assert engine.queued == 0


@pytest.mark.slow
def test_barge_in_cancels_the_answer_and_answers_the_new_turn(server, clip):
    async def main():
        async with Client(server.url) as client:
            await client.recv()
            vad = {"type": "server_vad", "silence_duration_ms": 500}
            await update_session(client, max_output_tokens=4096, audio={"input": {"turn_detection": vad}})
            await client.send(text_item("Talk for a long time"))
            await client.send({"type": "response.create"})
            await client.until("response.output_audio.delta")
            await speak(client, clip_24k(clip[: int(2.8 * 16000)]), silence_s=1.0)
            first = await client.until("response.done")
            second = await client.until("response.done")
            return first, second

    first, second = run(main())
    assert first[-1]["response"]["status"] == "cancelled"
    assert first[-1]["response"]["status_details"]["reason"] == "turn_detected"
    kinds = [e["type"] for e in first + second]
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("response.done")
    assert "input_audio_buffer.committed" in kinds
    assert second[-1]["response"]["status"] in ("completed", "incomplete")


def test_truncate_reports_what_was_played(server):
    async def main():
        async with Client(server.url) as client:
            await client.recv()
            await client.send({"type": "session.update", "session": {"max_output_tokens": 40}})
            events = await text_turn(client, "Hi")
            item = events[-1]["response"]["output"][0]["id"]
            played = events[-1]["response"]["spiritlm"]["audio_ms"] // 2
            await client.send(
                {"type": "conversation.item.truncate", "item_id": item, "content_index": 0, "audio_end_ms": played}
            )
            truncated = await client.recv()
            await client.send(
                {"type": "conversation.item.truncate", "item_id": item, "content_index": 0, "audio_end_ms": 10**6}
            )
            error = await client.recv()
            return truncated, error, played

    truncated, error, played = run(main())
    assert truncated["type"] == "conversation.item.truncated" and truncated["audio_end_ms"] == played
    assert error["type"] == "error" and error["error"]["code"] == "invalid_value"


# ----------------------------------------------------------------------------- the official SDK


def test_openai_sdk_spoken_turn(server, clip):
    from openai import AsyncOpenAI

    async def main():
        client = AsyncOpenAI(api_key="unused-on-loopback", websocket_base_url=f"ws://127.0.0.1:{server.port}/v1")
        async with client.realtime.connect(model="spiritlm") as connection:
            await connection.session.update(
                session={
                    "type": "realtime",
                    "output_modalities": ["audio"],
                    "max_output_tokens": 60,
                    "audio": {
                        "input": {
                            "format": {"type": "audio/pcm", "rate": 24000},
                            "turn_detection": {"type": "server_vad", "silence_duration_ms": 2000},
                        },
                        "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "2"},
                    },
                }
            )
            audio = np.concatenate([clip_24k(clip), np.zeros(3 * 24000, np.float32)])
            for piece in chunks(audio):
                await connection.input_audio_buffer.append(audio=pcm16_b64(piece))
            seen, pcm = [], bytearray()
            async for event in connection:
                seen.append(event.type)
                if event.type == "response.output_audio.delta":
                    pcm += base64.b64decode(event.delta)
                if event.type == "error":
                    raise AssertionError(event.error.message)
                if event.type == "response.done":
                    return seen, np.frombuffer(bytes(pcm), "<i2"), event.response

    seen, pcm, response = run(main())
    assert "input_audio_buffer.speech_stopped" in seen and "input_audio_buffer.committed" in seen
    assert len(pcm) > 0.3 * 24000 and np.abs(pcm).max() > 100
    assert response.status in ("completed", "incomplete") and response.usage.output_tokens > 0


def test_openai_sdk_text_turn(server):
    from openai import AsyncOpenAI

    async def main():
        client = AsyncOpenAI(api_key="unused-on-loopback", websocket_base_url=f"ws://127.0.0.1:{server.port}/v1")
        async with client.realtime.connect(model="spiritlm") as connection:
            await connection.session.update(
                session={"type": "realtime", "output_modalities": ["text"], "max_output_tokens": 12}
            )
            await connection.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello"}]}
            )
            await connection.response.create()
            text = ""
            async for event in connection:
                if event.type == "response.output_text.delta":
                    text += event.delta
                elif event.type == "response.output_text.done":
                    assert event.text == text
                elif event.type == "error":
                    raise AssertionError(event.error.message)
                elif event.type == "response.done":
                    return text, event.response

    text, response = run(main())
    assert response.output_modalities == ["text"] and response.usage.output_tokens > 0
    assert response.output[0].content[0].text == text


# ----------------------------------------------------------------------------- bad input


BAD_MESSAGES = [
    ("{not json", "invalid_json"),
    ("[1, 2]", "invalid_event"),
    (json.dumps({"type": "no.such.event"}), "unknown_event"),
    (
        json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}}),
        "invalid_audio_format",
    ),
    (
        json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"rate": 44100}}}}}),
        "invalid_audio_format",
    ),
    (json.dumps({"type": "session.update", "session": {"instructions": "Be nice"}}), "unsupported_feature"),
    (
        json.dumps({"type": "session.update", "session": {"tools": [{"type": "function", "name": "f"}]}}),
        "unsupported_feature",
    ),
    (json.dumps({"type": "session.update", "session": {"temperature": "hot"}}), "invalid_type"),
    (json.dumps({"type": "session.update", "session": {"audio": {"output": {"voice": "alloy"}}}}), "invalid_value"),
    (json.dumps({"type": "session.update", "session": {"bogus": 1}}), "unknown_parameter"),
    (
        json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01\x02\x03").decode()}),
        "invalid_audio",
    ),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "@@not base64@@"}), "invalid_audio"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": 12}), "invalid_type"),
    (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty"),
    (json.dumps({"type": "response.cancel"}), "response_cancel_not_active"),
    (
        json.dumps(
            {
                "type": "conversation.item.create",
                "item": {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "x"}]},
            }
        ),
        "unsupported_feature",
    ),
    (
        json.dumps(
            {
                "type": "conversation.item.create",
                "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x" * 5000}]},
            }
        ),
        "text_too_long",
    ),
    (
        json.dumps({"type": "conversation.item.truncate", "item_id": "nope", "content_index": 0, "audio_end_ms": 0}),
        "item_not_found",
    ),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (300 * 1024)}), "message_too_large"),
]


def test_bad_input_gets_an_error_and_the_next_turn_works(server):
    async def main():
        async with Client(server.url) as client:
            await client.recv()
            errors = []
            for message, _ in BAD_MESSAGES:
                await client.send(message)
                event = await client.recv()
                errors.append(event)
            await client.ws.send_bytes(b"\x00\x01")
            binary = await client.recv()
            await client.send(TEXT_ONLY)
            await client.until("session.updated")
            turn = await text_turn(client)
            return errors, binary, turn

    errors, binary, turn = run(main())
    for (message, code), event in zip(BAD_MESSAGES, errors, strict=True):
        assert event["type"] == "error" and event["error"]["code"] == code, (message[:80], event)
        assert event["error"]["message"]
    assert binary["error"]["code"] == "binary_frame"
    assert turn[-1]["response"]["status"] in ("completed", "incomplete")


def test_error_names_the_offending_event(server):
    async def main():
        async with Client(server.url) as client:
            await client.recv()
            await client.send({"type": "response.cancel", "event_id": "evt_client_42"})
            return await client.recv()

    event = run(main())
    assert event["error"]["event_id"] == "evt_client_42" and event["error"]["type"] == "invalid_request_error"


def test_a_frame_over_the_cap_closes_only_that_connection(server):
    async def main():
        async with Client(server.url) as bystander:
            await bystander.recv()
            async with Client(server.url) as client:
                await client.recv()
                try:
                    await client.send("x" * (2 * 1024 * 1024))  # over 4 x max_message_bytes
                except ConnectionError:
                    # the server may close (and the kernel reset) the socket while this client is
                    # still writing the frame: the connection is closed either way
                    code = "reset while sending"
                else:
                    await client.ws.receive(timeout=10)
                    code = client.ws.close_code
            await bystander.send(TEXT_ONLY)
            await bystander.until("session.updated")
            turn = await text_turn(bystander)
            return code, turn

    code, turn = run(main())
    # 1009 (message too big) when the client reads the server's close frame; 1006 or a reset while
    # sending when the kernel resets the socket first because the server never read the frame's rest
    assert code in (1009, 1006, "reset while sending")
    assert turn[-1]["response"]["status"] in ("completed", "incomplete")


def _random_bad_message(rng: random.Random) -> str:
    """A message that must be refused (each kind is invalid by construction)."""
    kind = rng.randrange(9)
    if kind == 0:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(1, 200)))
    if kind == 1:
        return json.dumps(rng.choice([None, 1, "x", [1, {"type": "x"}], True, 2.5]))
    if kind == 2:
        return json.dumps({"type": "".join(rng.choice("abc._") for _ in range(rng.randrange(1, 30)))})
    if kind == 3:
        return json.dumps(
            {
                "type": "input_audio_buffer.append",
                "audio": rng.choice(
                    [None, 5, [], "!!", base64.b64encode(os.urandom(2 * rng.randrange(1, 50) + 1)).decode()]
                ),
            }
        )
    if kind == 4:
        field = rng.choice(["temperature", "top_p", "max_output_tokens", "output_modalities", "voice"])
        value = rng.choice([-1, 99999, "x", [], {}, None if field != "voice" else 7])
        session = {"audio": {"output": {"voice": value}}} if field == "voice" else {field: value}
        return json.dumps({"type": "session.update", "session": session})
    if kind == 5:
        return json.dumps(
            {
                "type": "conversation.item.create",
                "item": rng.choice(
                    [
                        None,
                        {},
                        {"type": "message", "role": "user", "content": []},
                        {"type": "function_call"},
                        {"role": "user", "content": [{"type": 1}]},
                    ]
                ),
            }
        )
    if kind == 6:
        return json.dumps({"type": "response.cancel", "response_id": rng.choice([None, "resp_x"])})
    if kind == 7:
        return json.dumps({"type": "input_audio_buffer.commit", "event_id": str(rng.random())})
    return json.dumps(
        {
            "type": "response.create",
            "response": rng.choice(
                [{"instructions": "x"}, {"output_modalities": ["video"]}, {"conversation": "none"}, {"bogus": 1}, 5]
            ),
        }
    )


def test_fuzz_1000_messages_each_get_an_error_and_the_next_turn_works(server):
    rng = random.Random(1234)
    messages = [_random_bad_message(rng) for _ in range(1000)]

    async def main():
        async with Client(server.url) as client:
            await client.recv()
            started = time.perf_counter()
            for message in messages:
                await client.send(message)
            replies = [await client.recv(timeout=30) for _ in messages]
            elapsed = time.perf_counter() - started
            await client.send(TEXT_ONLY)
            await client.until("session.updated")
            turn = await text_turn(client)
            return replies, elapsed, turn

    replies, elapsed, turn = run(main())
    assert [r["type"] for r in replies] == ["error"] * 1000
    assert elapsed < 60
    assert turn[-1]["response"]["status"] in ("completed", "incomplete")


# ----------------------------------------------------------------------------- load and lifetime


def test_ten_clients_at_once_and_one_too_many_is_busy(engine):
    limits = Limits(max_connections=10, max_queued_turns=16)
    running = RunningServer(create_app(ServerConfig(port=0, limits=limits), engine=engine))

    async def one(i):
        async with Client(running.url) as client:
            await client.recv()
            await client.send(TEXT_ONLY)
            await client.until("session.updated")
            events = await text_turn(client, f"Client {i}")
            return events[-1]["response"]["status"]

    async def main():
        clients = [Client(running.url) for _ in range(10)]
        for c in clients:
            await c.__aenter__()
        try:
            for c in clients:
                await c.recv()
            async with Client(running.url) as extra:  # the eleventh
                busy = await extra.recv()
                await extra.ws.receive(timeout=5)
                code = extra.ws.close_code
        finally:
            for c in clients:
                await c.__aexit__(None, None, None)
        statuses = await asyncio.gather(*(one(i) for i in range(10)))
        return busy, code, statuses

    try:
        started = time.perf_counter()
        busy, code, statuses = run(main(), timeout=120)
        elapsed = time.perf_counter() - started
    finally:
        running.stop()
    assert busy["type"] == "error" and busy["error"]["code"] == "busy" and code == 1013
    assert all(s in ("completed", "incomplete") for s in statuses)
    assert elapsed < 90


def test_disconnect_mid_answer_frees_everything(server, engine):
    async def main():
        async with Client(server.url) as client:
            await start_long_answer(client, "Go on and on")
        gone = time.perf_counter()
        sessions = server.app[SESSIONS]
        while (engine.queued or sessions) and time.perf_counter() - gone < 10:
            await asyncio.sleep(0.01)
        freed, open_sessions = time.perf_counter() - gone, len(sessions)
        async with Client(server.url) as client:
            await client.recv()
            await client.send(TEXT_ONLY)
            turn = await text_turn(client)
        return freed, open_sessions, turn

    freed, open_sessions, turn = run(main())
    # the model stops within a decode step (or at the end of the vocoder chunk it is in)
    assert freed < 3.0 and open_sessions == 0
    assert turn[-1]["response"]["status"] in ("completed", "incomplete")


@pytest.mark.slow
def test_soak_200_turns_memory_is_flat(server, capsys):
    process = psutil.Process()

    async def main():
        rss = {}
        async with Client(server.url) as client:
            await client.recv()
            await client.send({"type": "session.update", "session": {"max_output_tokens": 6}})
            await client.until("session.updated")
            for turn in range(1, 201):
                events = await text_turn(client, f"Turn {turn}")
                assert events[-1]["response"]["status"] in ("completed", "incomplete")
                if turn in (10, 200):
                    rss[turn] = process.memory_info().rss
        return rss

    started = time.perf_counter()
    rss = run(main(), timeout=600)
    elapsed = time.perf_counter() - started
    growth_mb = (rss[200] - rss[10]) / 2**20
    with capsys.disabled():
        print(
            f"\nsoak: 200 turns (text in, speech out) in {elapsed:.1f} s; RSS at turn 10 {rss[10] / 2**20:.1f} MiB, "
            f"at turn 200 {rss[200] / 2**20:.1f} MiB ({growth_mb:+.1f} MiB)"
        )
    assert growth_mb < 40  # flat: the conversation's text grows by a few KB; leaks would be MBs per turn


# ----------------------------------------------------------------------------- security


def test_token_origin_and_bind_checks(engine):
    running = RunningServer(
        create_app(ServerConfig(port=0, token="s3cret-token", allow_origins=["https://kiosk.local"]), engine=engine)
    )
    import aiohttp

    async def status(headers=None, protocols=()):
        try:
            async with Client(running.url, headers=headers, protocols=protocols) as client:
                event = await client.recv()
                return event["type"], client.ws.protocol
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status, None

    async def main():
        return {
            "none": await status(),
            "wrong": await status({"Authorization": "Bearer nope-nope-nope"}),
            "bearer": await status({"Authorization": "Bearer s3cret-token"}),
            "subprotocol": await status(protocols=("realtime", "openai-insecure-api-key.s3cret-token")),
            "bad_origin": await status({"Authorization": "Bearer s3cret-token", "Origin": "https://evil.example"}),
            "own_origin": await status(
                {"Authorization": "Bearer s3cret-token", "Origin": f"http://127.0.0.1:{running.port}"}
            ),
            "allowed_origin": await status({"Authorization": "Bearer s3cret-token", "Origin": "https://kiosk.local"}),
        }

    try:
        results = run(main())
    finally:
        running.stop()
    assert results["none"][0] == 401 and results["wrong"][0] == 401
    assert results["bearer"][0] == "session.created"
    assert results["subprotocol"] == ("session.created", "realtime")
    assert results["bad_origin"][0] == 403
    assert results["own_origin"][0] == "session.created" and results["allowed_origin"][0] == "session.created"
    with pytest.raises(ServerConfigError, match="--token"):
        create_app(ServerConfig(host="0.0.0.0"), engine=engine)
    with pytest.raises(ServerConfigError, match="--token"):
        create_app(ServerConfig(host="192.168.1.20"), engine=engine)
    with pytest.raises(ServerConfigError, match="tls-key"):
        create_app(ServerConfig(tls_cert="cert.pem"), engine=engine)
    create_app(ServerConfig(host="::1"), engine=engine)  # loopback needs no token


def test_healthz_metrics_and_page(server):
    import urllib.request

    with urllib.request.urlopen(f"{server.http}/healthz") as r:
        assert r.status == 200 and json.load(r)["status"] == "ready"
    with urllib.request.urlopen(f"{server.http}/metrics") as r:
        metrics = r.read().decode()
    for name in (
        "spiritlm_turns_total",
        "spiritlm_time_to_first_audio_seconds_bucket",
        "spiritlm_turn_seconds_count",
        "spiritlm_decode_tokens_per_second",
        "spiritlm_sessions",
        "spiritlm_errors_total",
    ):
        assert name in metrics
    with urllib.request.urlopen(f"{server.http}/") as r:
        page = r.read().decode()
        assert "<html" in page and "default-src 'self'" in r.headers["Content-Security-Policy"]
    # nothing from the internet
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page


def test_tls_with_a_self_signed_certificate(engine, tmp_path):
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    config = ServerConfig(port=0, tls_cert=cert_path, tls_key=key_path)
    running = RunningServer(create_app(config, engine=engine), ssl_context=config.ssl_context())
    trusting = ssl.create_default_context(cafile=str(cert_path))

    async def main():
        async with Client(running.url, ssl=trusting) as client:
            await client.recv()
            await client.send(TEXT_ONLY)
            await client.until("session.updated")
            turn = await text_turn(client)
        try:  # a client that does not trust the certificate is refused by TLS itself
            async with Client(running.url, ssl=ssl.create_default_context()):
                return turn, False
        except Exception:
            return turn, True

    try:
        turn, refused = run(main())
    finally:
        running.stop()
    assert running.url.startswith("wss://") and turn[-1]["response"]["status"] in ("completed", "incomplete")
    assert refused


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_command_answers_then_exits_cleanly_on_sigterm(tiny_base_bundle):
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spiritlm_edge.cli",
            "serve",
            "--bundle",
            str(tiny_base_bundle),
            "--port",
            str(port),
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    import urllib.request

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    if json.load(r)["status"] == "ready":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "the server did not become ready"
            time.sleep(0.2)

        async def main():
            async with Client(f"ws://127.0.0.1:{port}/v1/realtime") as client:
                await start_long_answer(client, "Keep talking")
                process.send_signal(signal.SIGTERM)
                events = []
                try:
                    while True:
                        events.append(await client.recv(timeout=20))
                except ConnectionError:
                    pass
                return events, client.ws.close_code

        events, close_code = run(main())
        rc = process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
        output = process.stdout.read()
    kinds = [e["type"] for e in events]
    assert "response.done" in kinds, (kinds, output)
    done = next(e for e in events if e["type"] == "response.done")["response"]
    assert done["status"] == "cancelled" and done["status_details"]["error"]["code"] == "server_shutdown"
    assert any(e["type"] == "error" and e["error"]["code"] == "server_shutdown" for e in events)
    assert close_code == 1001 and rc == 0, output


# ----------------------------------------------------------------------------- the kiosk page

CHROMIUM = "/usr/bin/chromium"
# Chromium as root on a machine without a network: no sandbox, GPU, QUIC, first-run or background traffic
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = os.environ.get("SPIRITLM_KIOSK_SCREENSHOT")  # e.g. docs/kiosk.png: keep the mid-answer screenshot


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no Debian chromium here: apt-get install chromium")
def test_kiosk_page_in_a_real_browser(server, clip, tmp_path):
    """Headless Chromium with a fake microphone fed from the LibriSpeech clip: the page goes
    listening -> thinking -> speaking -> listening, plays the answer and shows its latency."""
    import soundfile
    from playwright.sync_api import sync_playwright

    microphone = tmp_path / "microphone.wav"
    speech = np.concatenate([np.zeros(8000, np.float32), clip[: int(2.8 * 16000)], np.zeros(20 * 16000, np.float32)])
    soundfile.write(microphone, soxr.resample(speech, 16000, 48000), 48000, subtype="PCM_16")
    args = [
        *CHROMIUM_FLAGS,
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}",
        "--autoplay-policy=no-user-gesture-required",
    ]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            # bypass_csp: the test's own probes are evaluated scripts, which the page's CSP forbids
            page = browser.new_page(viewport={"width": 1280, "height": 760}, bypass_csp=True)
            console = []
            page.on("console", lambda message: console.append(message.text))
            page.goto(f"{server.http}/")
            page.wait_for_function("document.querySelector('#connection').textContent === 'connected'", timeout=20000)
            page.click("#start")
            page.wait_for_function("window.kiosk.states.includes('listening')", timeout=20000)
            page.wait_for_function(
                "window.kiosk.states.includes('speaking') && window.kiosk.played > 4800", timeout=90000
            )
            shot = tmp_path / "kiosk.png"
            page.screenshot(path=str(shot))
            page.wait_for_function(
                "window.kiosk.turns.length >= 1 && window.kiosk.states.lastIndexOf('listening')"
                " > window.kiosk.states.indexOf('speaking')",
                timeout=90000,
            )
            states = page.evaluate("window.kiosk.states")
            turns = page.evaluate("window.kiosk.turns")
            latency = page.inner_text("#turns tr:last-child .first-audio")
            errors = page.evaluate("window.kiosk.errors")
        finally:
            browser.close()
    first_listening = states.index("listening")
    speaking = states.index("speaking", first_listening)
    assert "thinking" in states[first_listening:speaking], states
    assert "listening" in states[speaking:], states
    assert turns[0]["firstAudioMs"] is not None and turns[0]["firstAudioMs"] > 0
    assert latency.endswith(" ms") and int(latency.split()[0]) == turns[0]["firstAudioMs"]
    assert errors == [], (errors, console)
    if SCREENSHOT:
        import shutil

        shutil.copyfile(shot, SCREENSHOT)


def test_readme_server_example_runs(server, capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Server") :]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    exec(compile(code.replace("127.0.0.1:8765", f"127.0.0.1:{server.port}"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"^(completed|incomplete) \d+ ms of speech", out, flags=re.M), out


def test_server_imports_without_torch():
    """The edge install serves: the server's modules import with torch and the export layers blocked."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchaudio", "transformers", "onnx") or \\
                name.startswith(("spiritlm_edge.export", "spiritlm_edge.quant")):
            raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Block())
import spiritlm_edge.server.app, spiritlm_edge.server.realtime, spiritlm_edge.server.engine
assert "torch" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_idle_connection_is_closed_with_an_error(engine):
    running = RunningServer(create_app(ServerConfig(port=0, limits=Limits(idle_timeout_s=0.5)), engine=engine))

    async def main():
        async with Client(running.url) as client:
            await client.recv()
            error = await client.recv(timeout=5)
            await client.ws.receive(timeout=5)
            return error, client.ws.closed

    try:
        error, closed = run(main())
    finally:
        running.stop()
    assert error["error"]["code"] == "idle_timeout" and closed


@pytest.mark.slow
def test_turns_beyond_the_queue_get_busy(engine):
    running = RunningServer(create_app(ServerConfig(port=0, limits=Limits(max_queued_turns=1)), engine=engine))
    queue_limit, engine.max_queued_turns = engine.max_queued_turns, 1

    async def one(i):
        async with Client(running.url) as client:
            await client.recv()
            await client.send({"type": "session.update", "session": {"max_output_tokens": 600}})
            await client.send(text_item(f"Client {i}"))
            await client.send({"type": "response.create"})
            while True:
                event = await client.recv()
                if event["type"] == "error":
                    return event["error"]["code"]
                if event["type"] == "response.done":
                    return event["response"]["status"]

    async def main():
        return await asyncio.gather(*(one(i) for i in range(4)))

    try:
        results = run(main())
    finally:
        engine.max_queued_turns = queue_limit
        running.stop()
    # one runs, one waits, the others are told the model is busy (and their connections stay usable)
    assert results.count("busy") >= 1 and sum(r in ("completed", "incomplete") for r in results) >= 2, results
    assert "failed" not in results  # refused before the response starts, never half-way


def test_serve_refuses_a_network_bind_without_a_token(tiny_base_bundle):
    from pathlib import Path

    exe = Path(sys.executable).parent / "spiritlm-edge"
    result = subprocess.run(
        [str(exe), "serve", "--bundle", str(tiny_base_bundle), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--token" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no Debian chromium here: apt-get install chromium")
def test_kiosk_page_says_when_the_microphone_is_refused_and_reconnects(engine):
    """No fake-UI flag: Chromium refuses the microphone (headless, nobody to ask); then the server
    goes away and comes back on the same port: the page says so and reconnects by itself."""
    from playwright.sync_api import sync_playwright

    first = RunningServer(create_app(ServerConfig(port=0), engine=engine))
    port = first.port
    args = [
        *CHROMIUM_FLAGS,
        "--use-fake-device-for-media-stream",
        "--deny-permission-prompts",
    ]
    second = None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = browser.new_page(bypass_csp=True)
            page.goto(f"{first.http}/")
            page.wait_for_function("document.querySelector('#connection').textContent === 'connected'", timeout=20000)
            page.click("#start")
            page.wait_for_selector("#message:not([hidden])", timeout=20000)
            refused = page.inner_text("#message")
            first.stop()
            page.wait_for_function(
                "document.querySelector('#connection').textContent === 'disconnected'", timeout=20000
            )
            gone = page.inner_text("#message")
            state = page.text_content("#state")
            second = RunningServer(create_app(ServerConfig(port=0), engine=engine), port=port)
            page.wait_for_function("document.querySelector('#connection').textContent === 'connected'", timeout=30000)
            back = page.inner_text("#message")
        finally:
            browser.close()
            if second is not None:
                second.stop()
    assert "microphone was refused" in refused
    assert "went away" in gone and "reconnecting" in gone and state == "offline"
    assert back == ""


def test_cancel_takes_effect_before_the_next_decode_step():
    """The LM proxy checks the cancel flag after every token, before llama.cpp decodes another."""
    import threading

    from spiritlm_edge.server.engine import TurnCancelled, _InterruptibleLM

    class FakeLM:
        n_ctx = 64

        def __init__(self):
            self.decoded, self.closed = 0, False

        def generate(self, ids, max_new_tokens=10, **kwargs):
            def tokens():
                try:
                    for i in range(max_new_tokens):
                        self.decoded += 1  # one decode step per token
                        yield i
                finally:
                    self.closed = True

            return tokens()

    lm = FakeLM()
    proxy = _InterruptibleLM(lm)
    assert proxy.n_ctx == 64  # everything else is the LM's own
    proxy.cancel = cancel = threading.Event()
    got = []
    with pytest.raises(TurnCancelled):
        for token in proxy.generate([1, 2], max_new_tokens=100):
            got.append(token)
            if token == 3:
                cancel.set()
    assert got == [0, 1, 2, 3] and lm.decoded == 4 and lm.closed
