"""The guard in front of every route, as llama-server's pre-routing handler, written as a plain ASGI
middleware (FastAPI's `@app.middleware("http")` wraps `receive`, and endpoints then never see a
client that hangs up, so a dropped non-streaming request would run to its end).

- CORS as llama-server: origins "*" echo the caller's origin (with credentials), "localhost" echoes
  only local origins, anything else is sent as given; a preflight (OPTIONS) is answered here, without
  a key. Header names keep llama-server's case.
- API keys: every path but /health (and the web page's files, webui.py) needs `Authorization: Bearer KEY` or
  `X-Api-Key: KEY`, compared in constant time.
- Request bodies above the limit are refused from their Content-Length.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

PUBLIC_PATHS = frozenset({"/health", "/v1/health"})  # no API key needed (llama-server's list)
Scope = dict[str, Any]
ASGI = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def is_local(origin: str) -> bool:
    host = urlsplit(origin).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Guard:
    def __init__(self, app: ASGI, keys: tuple[str, ...], origins: str, max_body: int,
                 public: frozenset[str] = frozenset()):
        self.app, self.keys, self.origins, self.max_body = app, [k.encode() for k in keys], origins, max_body
        self.public = PUBLIC_PATHS | public

    def _allow(self, headers: dict[bytes, bytes]) -> bytes:
        origin = headers.get(b"origin", b"")
        if self.origins == "*":
            return origin
        if self.origins == "localhost":
            return origin if origin and is_local(origin.decode("latin-1")) else b""
        return self.origins.encode("latin-1", "replace")

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        allow = self._allow(headers)
        cors = [(b"Access-Control-Allow-Origin", allow)] if allow else []
        if scope["method"] == "OPTIONS":  # a browser's preflight carries no key
            return await _reply(send, 200, b"", b"text/html", cors + [
                (b"Access-Control-Allow-Credentials", b"true"),
                (b"Access-Control-Allow-Methods", b"GET, POST, DELETE, OPTIONS"), (b"Access-Control-Allow-Headers", b"*")])
        path = scope.get("path", "")
        if self.keys and path not in self.public:
            given = headers.get(b"authorization", b"") or headers.get(b"x-api-key", b"")
            given = given[7:] if given[:7].lower() == b"bearer " else given
            if not any(hmac.compare_digest(given, k) for k in self.keys):
                return await _error(send, 401, "Invalid API Key", "authentication_error", cors)
        size = headers.get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_body):
            return await _error(send, 413, f"request body over {self.max_body} bytes", "invalid_request_error", cors)

        async def send_with_cors(msg: Any) -> None:
            if msg["type"] == "http.response.start" and cors:
                msg = {**msg, "headers": list(msg.get("headers", [])) + cors}
            await send(msg)

        await self.app(scope, receive, send_with_cors)


async def _reply(send: Any, status: int, body: bytes, ctype: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())] + headers})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Any, status: int, message: str, kind: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"error": {"code": status, "message": message, "type": kind, "param": None}}).encode()
    await _reply(send, status, body, b"application/json", headers)
