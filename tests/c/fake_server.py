"""A misbehaving Realtime server for the C client's protocol-error tests (aiohttp).

    fake_server.py PORT_FILE

Listens on a free loopback port, writes it to PORT_FILE, serves WebSockets whose path says
how to misbehave:
  /garbage  a session, then a non-JSON message, one without a type, a binary frame, an audio
            delta that is not base64, an error event; then answers a text turn properly
  /silent   upgrades, then never says anything (no session)
  /refuse   answers session.update with an error event
  /close    a session, then closes the connection with 1011 after the first client message
  /huge     a session, then one 9 MiB text message
  /idle     a session, then reads and never answers (the keep-alive test SIGSTOPs the process)
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys

from aiohttp import WSMsgType, web


async def session(ws: web.WebSocketResponse) -> None:
    await ws.send_json({"type": "session.created", "event_id": "e0", "session": {}})
    async for msg in ws:
        if msg.type == WSMsgType.TEXT and json.loads(msg.data).get("type") == "session.update":
            await ws.send_json({"type": "session.updated", "event_id": "e1", "session": {}})
            return


async def handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=0)
    await ws.prepare(request)
    mode = request.match_info["mode"]
    if mode == "silent":
        await asyncio.sleep(30)
    elif mode == "refuse":
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_json(
                    {
                        "type": "error",
                        "event_id": "e1",
                        "error": {
                            "type": "invalid_request_error",
                            "code": "invalid_value",
                            "message": "voice '9' is not 0..3",
                        },
                    }
                )
    elif mode == "garbage":
        await session(ws)
        await ws.send_str("this is not JSON")
        await ws.send_str('{"no": "type"}')
        await ws.send_bytes(b"\x00\x01")
        await ws.send_json({"type": "response.output_audio.delta", "response_id": "r1", "delta": "%%%not base64%%%"})
        await ws.send_json(
            {
                "type": "error",
                "event_id": "e2",
                "error": {"type": "invalid_request_error", "code": "unknown_event", "message": "made up"},
            }
        )
        async for msg in ws:  # the connection still works: answer a turn
            if msg.type == WSMsgType.TEXT and json.loads(msg.data).get("type") == "response.create":
                pcm = base64.b64encode(b"\x10\x00" * 2400).decode()
                await ws.send_json({"type": "response.created", "response": {"id": "r2"}})
                await ws.send_json({"type": "response.output_audio.delta", "response_id": "r2", "delta": pcm})
                await ws.send_json({"type": "response.done", "response": {"id": "r2", "status": "completed"}})
    elif mode == "close":
        await session(ws)
        await ws.receive()
        await ws.close(code=1011, message=b"internal error")
    elif mode == "idle":  # a session, then only reading (the test freezes this process)
        await session(ws)
        async for _ in ws:
            pass
    elif mode == "huge":
        await session(ws)
        await ws.send_str(json.dumps({"type": "response.output_text.delta", "delta": "x" * (9 << 20)}))
        await asyncio.sleep(10)
    return ws


async def main() -> None:
    app = web.Application()
    app.router.add_get("/{mode}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    with open(sys.argv[1], "w") as f:
        f.write(str(port))
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
