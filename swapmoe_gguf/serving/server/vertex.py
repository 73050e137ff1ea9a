"""Google Vertex AI's custom-container prediction protocol, as llama-server offers it: with
`AIP_MODE=PREDICTION` in the environment, `POST $AIP_PREDICT_ROUTE` (default /predict) takes
`{"instances": [...]}`, each instance a request to one of this server's POST routes named by its
`@requestFormat` (a camelCase alias such as "chatCompletions" for /v1/chat/completions, or the path),
runs them concurrently (they share the slots like any requests) and answers `{"predictions": [...]}`;
`AIP_HTTP_PORT` sets the port and `AIP_HEALTH_ROUTE` adds a health route.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ...base.errors import SwapMoEError
from .core import APIError, error_body
from .http import parse_json

MAX_INSTANCES = 128


def enabled() -> bool:
    return os.environ.get("AIP_MODE", "") == "PREDICTION"


def port(default: int) -> int:
    try:
        return int(os.environ.get("AIP_HTTP_PORT", default))
    except ValueError:
        return default


def alias(path: str) -> str:
    """"/v1/chat/completions" -> "chatCompletions", "/apply-template" -> "applyTemplate"."""
    s = path[3:] if path.startswith("/v1") and len(path) > 3 else path
    s = s.lstrip("/").split("{")[0].split(":")[0]
    return re.sub(r"[/_-]+(.)", lambda m: m.group(1).upper(), s).rstrip("/_-")


def _post_paths(app: FastAPI) -> dict[str, str]:
    def walk(routes: Any) -> Any:
        for r in routes:
            inner = getattr(r, "original_router", None)
            yield from walk(inner.routes) if inner is not None else [r]
    paths: dict[str, str] = {}
    for r in walk(app.routes):
        if "POST" in (getattr(r, "methods", None) or ()) and "{" not in r.path:
            paths.setdefault(alias(r.path), r.path)   # the first registration wins, as llama-server
            paths.setdefault(r.path, r.path)
    return paths


async def _call(app: FastAPI, request: Request, path: str, payload: dict[str, Any]) -> Any:
    """One internal POST through the whole app (guard included), its JSON answer."""
    body = json.dumps(payload).encode()
    headers = [(k, v) for k, v in request.scope["headers"] if k.lower() not in (b"content-length", b"content-type")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {**request.scope, "path": path, "raw_path": path.encode(), "query_string": b"", "headers": headers}
    sent, out, status = False, bytearray(), 500

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # nothing more: the caller finishes first
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg: dict[str, Any]) -> None:
        nonlocal status
        if msg["type"] == "http.response.start":
            status = msg["status"]
        elif msg["type"] == "http.response.body":
            out.extend(msg.get("body", b""))

    await app(scope, receive, send)
    try:
        return json.loads(bytes(out))
    except ValueError:
        return bytes(out).decode("utf-8", "replace")


def install(app: FastAPI) -> None:
    """Add the predict (and health) routes; call after every other route is registered."""
    predict = os.environ.get("AIP_PREDICT_ROUTE", "/predict") or "/predict"
    paths = _post_paths(app)
    if predict in paths:
        raise SwapMoEError(f"AIP_PREDICT_ROUTE={predict} conflicts with an existing route")
    health = os.environ.get("AIP_HEALTH_ROUTE", "")
    if health:
        app.add_api_route(health, lambda: {"status": "ok"}, methods=["GET"])

    async def run(request: Request) -> JSONResponse:
        data = await parse_json(request)
        instances = data.get("instances")
        if not isinstance(instances, list):
            raise APIError(400, "request body must include an array field named instances")
        if len(instances) > MAX_INSTANCES:
            raise APIError(400, f"instances array exceeds maximum size of {MAX_INSTANCES}")

        async def one(inst: Any) -> Any:
            if not isinstance(inst, dict):
                return error_body(APIError(400, "each instance must be a JSON object"))
            fmt = inst.get("@requestFormat")
            if not isinstance(fmt, str):
                return error_body(APIError(400, "each instance must include a string @requestFormat"))
            if fmt not in paths:
                return error_body(APIError(400, f"no handler registered for @requestFormat: {fmt}"))
            payload = {k: v for k, v in inst.items() if k != "@requestFormat"} | (
                {"stream": False} if "stream" in inst else {})
            return await _call(app, request, paths[fmt], payload)

        return JSONResponse({"predictions": list(await asyncio.gather(*(one(i) for i in instances)))})

    app.add_api_route(predict, run, methods=["POST"])
