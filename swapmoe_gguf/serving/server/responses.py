"""OpenAI's Responses API (`/v1/responses`, also without /v1), text in and text out, as llama-server
serves it: `input` as a string or a list of messages, `instructions`, `max_output_tokens`, streaming
with the response.* events. Tools, previous_response_id and stored responses are not offered (400)."""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request

from ..engine import Done, Progress, Token
from .core import APIError, Core
from .grammar import structured
from .http import parse_json, sse
from .openai import progress, render_chat
from .tools import ToolCalling


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    inp = body.get("input")
    msgs: list[dict[str, Any]] = []
    if body.get("instructions"):
        msgs.append({"role": "system", "content": str(body["instructions"])})
    if isinstance(inp, str):
        return msgs + [{"role": "user", "content": inp}]
    if not isinstance(inp, list) or not inp:
        raise APIError(400, "\"input\" must be a string or a non-empty array of messages")
    for item in inp:
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise APIError(400, "only message items are supported in \"input\" (no tool outputs or references)")
        role = "system" if item.get("role") == "developer" else item.get("role")
        msgs.append({"role": role, "content": item.get("content")})
    return msgs


def _usage(d: Done) -> dict[str, Any]:
    return {"input_tokens": d.n_prompt, "output_tokens": d.n_predicted, "total_tokens": d.n_prompt + d.n_predicted,
            "input_tokens_details": {"cached_tokens": d.n_cached}, "output_tokens_details": {"reasoning_tokens": 0}}


def router(core: Core) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/responses/input_tokens")
    @r.post("/responses/input_tokens")
    async def input_tokens(request: Request) -> dict[str, Any]:
        body = await parse_json(request)
        prompt = render_chat(core, {**body, "messages": _messages(body)}, ToolCalling([], "none", False))
        return {"object": "response.input_tokens", "input_tokens": len(core.prompt_tokens(prompt))}

    @r.post("/v1/responses")
    @r.post("/responses")
    async def responses(request: Request) -> Any:
        body = await parse_json(request)
        for k in ("tools", "previous_response_id"):
            if body.get(k):
                raise APIError(400, f"\"{k}\" is not supported by this server's Responses API")
        chat = {**body, "messages": _messages(body)}
        prompt = render_chat(core, chat, ToolCalling([], "none", False))
        req = core.request(core.prompt_tokens(prompt), {**chat, "grammar": structured(body)},
                           n_predict_key="max_output_tokens")
        rid, mid = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        created = int(time.time())

        def response(status: str, text: str, d: Done | None) -> dict[str, Any]:
            out = [] if d is None else [{"type": "message", "id": mid, "status": "completed", "role": "assistant",
                                         "content": [{"type": "output_text", "text": text, "annotations": [],
                                                      "logprobs": []}]}]
            res = {"id": rid, "object": "response", "created_at": created, "status": status, "model": core.alias,
                   "output": out, "output_text": text, "error": None, "incomplete_details": None,
                   "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
                   "max_output_tokens": body.get("max_output_tokens"), "temperature": req.sampling.temperature,
                   "top_p": req.sampling.top_p}
            if d is not None:
                res["usage"] = _usage(d)
                if d.finish_reason == "length":
                    res["status"], res["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
            return res

        if not body.get("stream"):
            d, _ = await core.complete(req, request)
            return response("completed", d.text, d) | {"timings": d.timings}
        job = core.start(req)

        async def events() -> AsyncIterator[tuple[str, dict[str, Any]]]:
            seq = 0

            def ev(kind: str, **kw: Any) -> tuple[str, dict[str, Any]]:
                nonlocal seq
                seq += 1
                return kind, {"type": kind, "sequence_number": seq, **kw}

            yield ev("response.created", response=response("in_progress", "", None))
            yield ev("response.in_progress", response=response("in_progress", "", None))
            item = {"type": "message", "id": mid, "status": "in_progress", "role": "assistant", "content": []}
            yield ev("response.output_item.added", output_index=0, item=item)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            yield ev("response.content_part.added", item_id=mid, output_index=0, content_index=0, part=part)
            text, t0, first, n = "", time.perf_counter(), None, 0
            async for e in core.stream(job, request):
                if isinstance(e, Progress):
                    yield ev("response.in_progress", response=response("in_progress", "", None),
                             prompt_progress=progress(e))
                elif isinstance(e, Token):
                    n += 1
                    now = time.perf_counter()
                    first = first or now
                    if not e.text:
                        continue
                    text += e.text
                    extra = {}
                    if body.get("timings_per_token"):  # measured so far, as llama-server's partial timings
                        extra["timings"] = {"prompt_ms": 1e3 * (first - t0),
                                            "prompt_per_second": len(req.prompt) / max(first - t0, 1e-9),
                                            "predicted_n": n, "predicted_ms": 1e3 * (now - first),
                                            "predicted_per_second": (n - 1) / (now - first) if now > first else 0.0}
                    yield ev("response.output_text.delta", item_id=mid, output_index=0, content_index=0,
                             delta=e.text, logprobs=[], **extra)
                else:
                    yield ev("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=text,
                             logprobs=[])
                    yield ev("response.content_part.done", item_id=mid, output_index=0, content_index=0,
                             part=part | {"text": text})
                    final = response("completed", text, e)
                    yield ev("response.output_item.done", output_index=0, item=final["output"][0])
                    yield ev("response.completed", response=final, timings=e.timings)

        return sse(events(), done=None, event=True)

    return r
