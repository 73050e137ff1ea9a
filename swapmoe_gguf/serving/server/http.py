"""HTTP plumbing shared by the route modules: JSON bodies, server-sent events, NDJSON."""
from __future__ import annotations

import json
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from .core import APIError, error_body

MAX_BODY = 8 << 20


async def parse_json(request: Request, limit: int | None = None) -> dict[str, Any]:
    body = await request.body()
    limit = limit or getattr(request.app.state, "max_body_bytes", MAX_BODY)
    if len(body) > limit:
        raise APIError(413, f"request body over {limit} bytes", code="request_too_large")
    try:
        data = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "malformed JSON in the request body", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


def sse(chunks: AsyncIterator[Any], done: str | None = "[DONE]", event: bool = False) -> StreamingResponse:
    """Server-sent events: `data: {...}` per chunk; an error mid-stream is sent as an error event
    (the status line has already gone out). With `event`, chunks are (event name, data) pairs."""
    async def body() -> AsyncIterator[bytes]:
        try:
            async for c in chunks:
                if event:
                    name, data = c
                    yield f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                else:
                    yield f"data: {json.dumps(c)}\n\n".encode()
        except APIError as e:
            yield f"{'event: error' + chr(10) if event else ''}data: {json.dumps(error_body(e))}\n\n".encode()
            return
        if done:
            yield f"data: {done}\n\n".encode()
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def ndjson(chunks: AsyncIterator[Any]) -> StreamingResponse:
    """Newline-delimited JSON (Ollama's streaming)."""
    async def body() -> AsyncIterator[bytes]:
        try:
            async for c in chunks:
                yield (json.dumps(c) + "\n").encode()
        except APIError as e:
            yield (json.dumps({"error": e.message}) + "\n").encode()
    return StreamingResponse(body(), media_type="application/x-ndjson")
