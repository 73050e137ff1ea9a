"""The FastAPI app: one generation core, the API families mounted over it, one guard in front
(guard.py: CORS, API keys, body limit, as llama-server). Errors from every route have llama-server's
shape. No endpoint reads or writes a client-given path (slot files stay in --slot-save-path).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ...base.errors import SwapMoEError
from ..settings import SamplingSettings
from ..settings import ServerSettings
from . import anthropic, native, ollama, openai, responses, swapmoe, vertex, webui
from .core import APIError, Core, error_body
from .guard import PUBLIC_PATHS, Guard  # noqa: F401  (PUBLIC_PATHS: re-exported)

log = logging.getLogger(__name__)


def _json_error(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)


def create_app(llm: Any, settings: ServerSettings | None = None, sampling: SamplingSettings | None = None,
               loader: Callable[[], Any] | None = None) -> FastAPI:
    """`loader` builds the model again (after --sleep-idle-seconds freed it)."""
    s = settings or ServerSettings()
    core = Core(llm, s, sampling, loader)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watch = asyncio.create_task(_sleep_when_idle(core)) if s.sleep_idle_seconds >= 0 and loader else None
        yield
        if watch is not None:
            watch.cancel()
        core.close()

    app = FastAPI(title="swapmoe-gguf", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.core, app.state.max_body_bytes = core, s.max_body_bytes
    app.add_middleware(Guard, keys=s.api_key, origins=",".join(s.cors_origins) or "*",
                       max_body=s.max_body_bytes, public=webui.public_paths(s.ui))

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

    app.include_router(webui.router(core, s.ui))  # the page at / (--no-ui: none)
    for family in (native, openai, responses, anthropic, ollama, swapmoe):
        app.include_router(family.router(core))
    if vertex.enabled():  # AIP_MODE=PREDICTION: Vertex AI's /predict over the routes above
        vertex.install(app)
    return app


async def _sleep_when_idle(core: Core) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(0.2)
        await loop.run_in_executor(None, core.maybe_sleep)


def serve(llm: Any, settings: ServerSettings, sampling: SamplingSettings,
          loader: Callable[[], Any] | None = None) -> None:
    """Serve until interrupted; `--host a,b` listens on every address given (as llama-server)."""
    import socket

    import uvicorn

    app = create_app(llm, settings, sampling, loader)
    if vertex.enabled():
        settings = dataclasses.replace(settings, port=vertex.port(settings.port))
    hosts = [h.strip().strip("[]") for h in settings.host.split(",") if h.strip()]
    socks = []
    for h in hosts:
        family = socket.AF_INET6 if ":" in h else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((h, settings.port))
        except OSError as e:
            sock.close()
            raise SwapMoEError(f"serve: cannot listen on {h}:{settings.port}: {e.strerror}") from None
        socks.append(sock)
    log.warning("serving %s on %s (%d slots; %d of %d experts per layer, %s)", settings.alias or
                llm.vmodel.info.path.name, ", ".join(f"http://{h if ':' not in h else f'[{h}]'}:{settings.port}"
                                                     for h in hosts),
                settings.parallel, llm.vmodel.slots, llm.vmodel.n_expert, llm.policy_name)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=socks)
