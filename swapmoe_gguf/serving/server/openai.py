"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models (also without /v1,
as llama-server serves them), with llama-server's extensions (timings, cached tokens)."""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request

from ..chat_template import TemplateError, text_of
from ..engine import Done, Progress, Token
from .core import BUILD, APIError, Core
from .grammar import structured
from .http import parse_json, sse
from .tools import ToolCalling

_UNSUPPORTED = {"best_of": "best_of is not supported"}


def check_n(body: dict[str, Any]) -> None:
    for k, msg in _UNSUPPORTED.items():
        if body.get(k) not in (None, 1):
            raise APIError(400, msg)
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 16):
        raise APIError(400, f"\"n\" must be an integer from 1 to 16, got {n!r}")
    if n not in (None, 1) and body.get("stream"):
        raise APIError(400, "streaming gives one choice (n = 1)")


def usage(d: Done) -> dict[str, Any]:
    return {"completion_tokens": d.n_predicted, "prompt_tokens": d.n_prompt, "total_tokens": d.n_predicted + d.n_prompt,
            "prompt_tokens_details": {"cached_tokens": d.n_cached}}


def progress(p: Progress) -> dict[str, Any]:
    return {"total": p.total, "cache": p.cache, "processed": p.processed, "time_ms": p.time_ms}


def finish(d: Done, tool_calls: bool = False) -> str:
    if d.stop_type in ("eos", "word"):
        return "tool_calls" if tool_calls else "stop"
    return "length"


def router(core: Core) -> APIRouter:
    r = APIRouter()

    def envelope(obj: str, cid: str) -> dict[str, Any]:
        return {"id": cid, "object": obj, "created": int(time.time()), "model": core.alias, "system_fingerprint": BUILD}

    @r.get("/v1/models")
    @r.get("/models")
    async def models() -> dict[str, Any]:
        m = core.meta  # known without the model: does not wake a sleeping server
        meta = {"n_ctx_train": m["n_ctx_train"], "n_vocab": m["n_vocab"], "n_embd": m["n_embd"], "size": m["size"]}
        m = {"id": core.alias, "object": "model", "created": int(core.started), "owned_by": "llamacpp", "meta": meta,
             "aliases": list(core.aliases), "tags": list(core.s.tags)}
        return {"object": "list", "data": [m],
                "models": [{"name": core.alias, "model": core.alias, "type": "model", "capabilities": ["completion"]}]}

    @r.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await parse_json(request)
        check_n(body)
        if "prompt" not in body:
            raise APIError(400, "\"prompt\" is required")
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        req = core.request(core.prompt_tokens(prompt), {**body, "grammar": structured(body)}, n_predict_key="max_tokens")
        if body.get("logprobs"):
            req.sampling.n_probs = max(1, int(body["logprobs"]) if not isinstance(body["logprobs"], bool) else 1)
        cid = f"cmpl-{uuid.uuid4().hex}"
        if body.get("stream"):
            return sse(_completion_chunks(core, core.start(req), request, cid, envelope, body))
        n = int(body.get("n") or 1)
        results = await asyncio.gather(*(core.complete(req, request) for _ in range(n)))  # on free slots at once
        choices = [{"text": d.text, "index": i, "finish_reason": finish(d),
                    "logprobs": {"content": core.token_probs(toks)} if req.sampling.n_probs else None}
                   for i, (d, toks) in enumerate(results)]
        d = results[0][0]
        return {**envelope("text_completion", cid), "choices": choices, "usage": usage(d), "timings": d.timings}

    @r.post("/v1/chat/completions")
    @r.post("/chat/completions")
    async def chat(request: Request) -> Any:
        body = await parse_json(request)
        check_n(body)
        tools = ToolCalling.from_body(body)
        prompt = render_chat(core, body, tools)
        grammar = tools.grammar() or structured(body)
        req = core.request(core.prompt_tokens(prompt), {**body, "grammar": grammar}, n_predict_key="max_completion_tokens")
        if body.get("logprobs"):
            req.sampling.n_probs = max(1, int(body.get("top_logprobs") or 1))
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.get("stream"):
            return sse(_chat_chunks(core, core.start(req), request, cid, envelope, body, tools, req))
        n = int(body.get("n") or 1)
        results = await asyncio.gather(*(core.complete(req, request) for _ in range(n)))  # on free slots at once
        choices = []
        for i, (d, toks) in enumerate(results):
            choices.append(_choice(core, d, toks, req, tools, i))
        d = results[0][0]
        out = {**envelope("chat.completion", cid), "choices": choices, "usage": usage(d), "timings": d.timings}
        if core.s.verbose or body.get("verbose"):
            out["__verbose"] = {"prompt": core.detokenize(req.prompt, special=True), "content": d.text}
        return out

    @r.post("/v1/chat/completions/input_tokens")
    @r.post("/chat/completions/input_tokens")
    async def chat_input_tokens(request: Request) -> dict[str, Any]:
        body = await parse_json(request)
        tools = ToolCalling.from_body(body)
        return {"input_tokens": len(core.prompt_tokens(render_chat(core, body, tools)))}

    return r


def _choice(core: Core, d: Done, toks: list[Token], req: Any, tools: ToolCalling, index: int) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": d.text}
    calls = tools.parse(d.text)
    if calls is not None:
        msg = {"role": "assistant", "content": calls[0] or None, "tool_calls": calls[1]} if calls[1] else (
            {"role": "assistant", "content": calls[0]})
    choice: dict[str, Any] = {"finish_reason": finish(d, bool(msg.get("tool_calls"))), "index": index, "message": msg}
    if req.sampling.n_probs:
        choice["logprobs"] = {"content": core.token_probs(toks)}
    return choice


def render_chat(core: Core, body: dict[str, Any], tools: ToolCalling) -> str:
    """The prompt of a chat request. A final assistant message is continued (prefill), as llama-server
    and vLLM's `continue_final_message` do; with `add_generation_prompt` that is an error."""
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise APIError(400, "\"messages\" must be a non-empty array")
    messages = tools.messages(body["messages"], native=core.chat.native_tools)
    kwargs = dict(body.get("chat_template_kwargs") or {})
    add_gen = body.get("add_generation_prompt", kwargs.pop("add_generation_prompt", None))
    cont = body.get("continue_final_message", kwargs.pop("continue_final_message", None))
    if cont and add_gen:
        raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true")
    prefill = None
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, "every message must be an object with a string role")
        if not (m.get("content") is None or isinstance(m.get("content"), (str, list))):
            raise APIError(400, "message content must be a string or an array of content parts")
    last = messages[-1]
    if len(messages) > 1 and last["role"] == "assistant" and messages[-2].get("role") == "assistant":
        raise APIError(400, "Cannot have 2 or more assistant messages at the end of the list.")
    if last.get("role") == "assistant" and not last.get("tool_calls") and (cont or add_gen is None):
        prefill, messages = last, messages[:-1]
    try:
        prompt = core.chat.render(messages, add_generation_prompt=True if prefill is not None else (
            add_gen if add_gen is not None else True), tools=tools.for_template(), **kwargs)
        if prefill is not None:
            prompt += text_of(prefill.get("content"), sep="\n\n")
    except TemplateError as e:
        raise APIError(400, str(e)) from None
    return prompt


async def _completion_chunks(core: Core, job: Any, request: Request, cid: str, envelope: Any,
                             body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    async for ev in core.stream(job, request):
        if isinstance(ev, Progress):
            yield {**envelope("text_completion", cid), "choices": [], "prompt_progress": progress(ev)}
            continue
        if isinstance(ev, Token):
            if not ev.text and ev.top is None:
                continue
            lp = {"content": core.token_probs([ev])} if ev.top is not None else None
            yield {**envelope("text_completion", cid),
                   "choices": [{"text": ev.text, "index": 0, "logprobs": lp, "finish_reason": None}]}
        else:
            last = {**envelope("text_completion", cid),
                    "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": finish(ev)}],
                    "timings": ev.timings}
            if (body.get("stream_options") or {}).get("include_usage"):
                yield last
                yield {**envelope("text_completion", cid), "choices": [], "usage": usage(ev), "timings": ev.timings}
            else:
                yield last | {"usage": usage(ev)}


async def _chat_chunks(core: Core, job: Any, request: Request, cid: str, envelope: Any, body: dict[str, Any],
                       tools: ToolCalling, req: Any) -> AsyncIterator[dict[str, Any]]:
    def chunk(delta: dict[str, Any], reason: str | None = None, **extra: Any) -> dict[str, Any]:
        return {**envelope("chat.completion.chunk", cid),
                "choices": [{"finish_reason": reason, "index": 0, "delta": delta, **extra}]}

    yield chunk({"role": "assistant", "content": None})
    held: list[str] = []
    async for ev in core.stream(job, request):
        if isinstance(ev, Progress):
            yield {**envelope("chat.completion.chunk", cid), "choices": [], "prompt_progress": progress(ev)}
            continue
        if isinstance(ev, Token):
            if tools.active:  # a tool call is parsed from the whole answer, as llama-server does
                held.append(ev.text)
                continue
            if ev.text or ev.top is not None:
                extra = {"logprobs": {"content": core.token_probs([ev])}} if ev.top is not None else {}
                yield chunk({"content": ev.text}, **extra)
            continue
        is_call = False
        if tools.active:
            calls = tools.parse("".join(held))
            content, tool_calls = calls if calls is not None else ("".join(held), [])
            if content:
                yield chunk({"content": content})
            for i, c in enumerate(tool_calls):
                yield chunk({"tool_calls": [{"index": i, **c}]})
            is_call = bool(tool_calls)
        last = chunk({}, finish(ev, is_call)) | {"timings": ev.timings}
        if (body.get("stream_options") or {}).get("include_usage"):
            yield last
            yield {**envelope("chat.completion.chunk", cid), "choices": [], "usage": usage(ev), "timings": ev.timings}
        else:
            yield last | {"usage": usage(ev)}
