"""The FastAPI app: one generation core, the API families mounted over it, one guard in front.

The guard, as llama-server: with API keys every path but /health needs `Authorization: Bearer KEY`
or `X-Api-Key: KEY` (constant-time comparison); a browser's CORS preflight carries no key; bodies
are capped. Errors from every route have llama-server's shape. No endpoint reads or writes a
client-given path.
"""
from __future__ import annotations

import contextlib
import hmac
import html
import ipaddress
from urllib.parse import urlsplit
import logging
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ..errors import SwapMoEError
from ..settings import SamplingSettings
from . import anthropic, native, ollama, openai, swapmoe
from .core import APIError, Core, ServerSettings, error_body

log = logging.getLogger(__name__)
PUBLIC_PATHS = frozenset({"/health", "/v1/health"})  # no API key needed (llama-server's list)


# no web UI ships here: "/" says what the server is and where its APIs are (`--no-ui`: 404)
_INDEX = """<!doctype html>
<html><head><meta charset="utf-8"><title>swapmoe-gguf</title></head><body>
<h1>swapmoe-gguf: {alias}</h1>
<p>A llama-server-compatible API on a Mixture-of-Experts model under a memory budget. There is no web UI;
point a client at <code>/v1</code> (OpenAI), <code>/v1/messages</code> (Anthropic) or <code>/api</code> (Ollama).</p>
</body></html>
"""


def _is_local(origin: str) -> bool:
    host = urlsplit(origin).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _json_error(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)


def create_app(llm: Any, settings: ServerSettings | None = None, sampling: SamplingSettings | None = None) -> FastAPI:
    s = settings or ServerSettings()
    core = Core(llm, s, sampling)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        core.close()

    app = FastAPI(title="swapmoe-gguf", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.core, app.state.max_body_bytes = core, s.max_body_bytes
    keys = [k.encode() for k in s.api_key]
    origins = ",".join(s.cors_origins) or "*"

    def cors(request: Request, res: Response) -> None:
        """llama-server's CORS: "*" echoes the caller's origin (with credentials), "localhost" echoes
        only local origins, anything else is sent as given. Header names keep llama-server's case."""
        origin = request.headers.get("origin", "")
        allow = origins
        if origins == "*":
            allow = origin
        elif origins == "localhost":
            allow = origin if origin and _is_local(origin) else ""
        if allow:
            res.raw_headers.append((b"Access-Control-Allow-Origin", allow.encode("latin-1", "replace")))

    @app.middleware("http")
    async def guard(request: Request, call_next):  # type: ignore[no-untyped-def]
        if request.method == "OPTIONS":  # a browser's preflight carries no key
            res = Response(b"", media_type="text/html")
            res.raw_headers += [(b"Access-Control-Allow-Credentials", b"true"),
                                (b"Access-Control-Allow-Methods", b"GET, POST, DELETE, OPTIONS"),
                                (b"Access-Control-Allow-Headers", b"*")]
            cors(request, res)
            return res
        if keys and request.url.path not in PUBLIC_PATHS and not (request.url.path == "/" and request.method == "GET"):
            given = request.headers.get("authorization", "") or request.headers.get("x-api-key", "")
            given = given[7:] if given.lower().startswith("bearer ") else given
            if not any(hmac.compare_digest(given.encode(), k) for k in keys):
                return _json_error(APIError(401, "Invalid API Key", "authentication_error"))
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > s.max_body_bytes):
            return _json_error(APIError(413, f"request body over {s.max_body_bytes} bytes", code="request_too_large"))
        res = await call_next(request)
        cors(request, res)
        return res

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return _json_error(e)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, e: RequestValidationError) -> JSONResponse:
        msg = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'body'}: {err.get('msg')}"
                        for err in e.errors()[:3]) or "malformed request"
        return _json_error(APIError(400, msg))

    @app.exception_handler(SwapMoEError)
    async def swapmoe_error(_: Request, e: SwapMoEError) -> JSONResponse:
        return _json_error(APIError(400, str(e)))

    if s.ui:
        @app.get("/")
        async def index() -> HTMLResponse:
            return HTMLResponse(_INDEX.format(alias=html.escape(core.alias)))

    for family in (native, openai, anthropic, ollama, swapmoe):
        app.include_router(family.router(core))
    return app


def serve(llm: Any, settings: ServerSettings, sampling: SamplingSettings) -> None:
    import uvicorn

    app = create_app(llm, settings, sampling)
    log.warning("serving %s on http://%s:%d (%d slots; %d of %d experts per layer, %s)", settings.alias or
                llm.vmodel.info.path.name, settings.host, settings.port, settings.parallel, llm.vmodel.slots,
                llm.vmodel.n_expert, llm.policy_name)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
