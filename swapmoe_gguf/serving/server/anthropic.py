"""Anthropic's Messages API as llama-server serves it: POST /v1/messages (plain and streamed) and
POST /v1/messages/count_tokens.

A request is converted to an OpenAI chat request the way llama-server's
`server_chat_convert_anthropic_to_oai` does it (system prompt, text / tool_use / tool_result /
thinking blocks, tools, tool_choice, stop_sequences, max_tokens defaulting to 4096), then formatted
with the chat template and generated like /v1/chat/completions; tool calls use the generic format
of tools.py. Answers have Anthropic's shape: content blocks, stop_reason, usage with
cache_read_input_tokens, and for streams the named events message_start, content_block_start,
content_block_delta (text_delta, input_json_delta), content_block_stop, message_delta, message_stop.
"""
from __future__ import annotations

import json
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request

from ..chat_template import TemplateError
from ..engine import Done, Token
from .core import APIError, Core, error_body
from .grammar import structured
from .http import parse_json, sse
from .tools import ToolCalling

DEFAULT_MAX_TOKENS = 4096   # llama-server's value when a request leaves max_tokens out
# llama-server turns image blocks into image_url parts and then refuses them with this error and 500
# (its tests check both); a text-only model cannot do better.
IMAGE_ERROR = (500, "image input is not supported - hint: this model reads text only", "server_error")
_PASSED = ("temperature", "top_p", "top_k", "stream", "chat_template_kwargs")


def _image() -> APIError:
    return APIError(*IMAGE_ERROR)


def _tool_result(block: dict[str, Any]) -> dict[str, Any]:
    content = block.get("content")
    if isinstance(content, list):
        if any(isinstance(c, dict) and c.get("type") == "image" for c in content):
            raise _image()
        content = "".join(str(c.get("text", "")) for c in content if isinstance(c, dict) and c.get("type") == "text")
    elif not isinstance(content, str):
        content = ""
    return {"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")), "content": content}


def _message(msg: Any) -> list[dict[str, Any]]:
    """One Anthropic message as OpenAI messages: its text and tool calls, then one per tool result."""
    if not isinstance(msg, dict):
        raise APIError(400, "each message must be an object")
    role, content = msg.get("role"), msg.get("content")
    if "content" not in msg:
        return [] if role == "assistant" else [msg]
    if not isinstance(content, list):
        return [msg]
    text: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    reasoning = ""
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            text.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "thinking":
            reasoning += str(block.get("thinking", ""))
        elif kind == "image":
            raise _image()
        elif kind == "tool_use":
            calls.append({"id": str(block.get("id", "")), "type": "function",
                          "function": {"name": str(block.get("name", "")),
                                       "arguments": json.dumps(block.get("input") or {})}})
        elif kind == "tool_result":
            results.append(_tool_result(block))
        # other blocks (redacted_thinking, document, ...) are dropped, as llama-server does
    out: list[dict[str, Any]] = []
    if text or calls or reasoning:
        m: dict[str, Any] = {"role": role, "content": text or ""}
        if calls:
            m["tool_calls"] = calls
        if reasoning:
            m["reasoning_content"] = reasoning
        out.append(m)
    return out + results


def to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages request as an OpenAI chat request (llama-server's conversion)."""
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if isinstance(system, str):
        messages.append({"role": "system", "content": system})
    elif isinstance(system, list):
        messages.append({"role": "system", "content": "".join(
            str(b.get("text", "")) for b in system if isinstance(b, dict) and b.get("type") == "text")})
    elif system is not None:
        raise APIError(400, "\"system\" must be a string or an array of text blocks")
    if "messages" not in body:
        raise APIError(400, "'messages' is required")
    if not isinstance(body["messages"], list):
        raise APIError(400, "\"messages\" must be an array")
    for msg in body["messages"]:
        messages += _message(msg)
    out: dict[str, Any] = {"messages": messages}
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise APIError(400, "\"tools\" must be an array of objects")
        out["tools"] = [{"type": "function", "function": {
            "name": t.get("name", ""), "description": t.get("description", ""),
            "parameters": t.get("input_schema") or {"type": "object"}}} for t in tools]
    tc = body.get("tool_choice")
    if isinstance(tc, dict):
        kind = tc.get("type")
        if kind in ("auto", "none"):
            out["tool_choice"] = kind
        elif kind == "any":
            out["tool_choice"] = "required"
        elif kind == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": tc.get("name")}}
        else:
            raise APIError(400, f"tool_choice type must be auto, any, tool or none, got {kind!r}")
        out["parallel_tool_calls"] = False
    if body.get("stop_sequences") is not None:
        out["stop"] = body["stop_sequences"]
    mt = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(mt, bool) or not isinstance(mt, int):
        raise APIError(400, "\"max_tokens\" must be an integer")
    out["max_tokens"] = mt
    out.update({k: body[k] for k in _PASSED if k in body})
    # structured outputs: output_config.format (or the beta's output_format) {"type": "json_schema", "schema"}
    fmt = (body.get("output_config") or {}).get("format") if isinstance(body.get("output_config"), dict) else None
    fmt = fmt or body.get("output_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        out["json_schema"] = fmt.get("schema") or {"type": "object"}
    return out


def stop_reason(d: Done, tool_use: bool) -> str:
    if d.stop_type == "limit":
        return "max_tokens"
    if tool_use:
        return "tool_use"
    return "stop_sequence" if d.stop_type == "word" and d.stopping_word else "end_turn"


def _usage(d: Done) -> dict[str, int]:
    return {"cache_read_input_tokens": d.n_cached, "input_tokens": d.n_prompt - d.n_cached,
            "output_tokens": d.n_predicted}


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    try:
        args = json.loads(call["function"]["arguments"])
    except ValueError:
        args = {}
    return {"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
            "input": args if isinstance(args, dict) else {}}


def _blocks(tools: ToolCalling, text: str) -> list[dict[str, Any]]:
    """The answer's content blocks: its text (when there is any), then one per tool call."""
    parsed = tools.parse(text)
    content, calls = parsed if parsed is not None else (text, [])
    return ([{"type": "text", "text": content}] if content else []) + [_tool_use(c) for c in calls]


def router(core: Core) -> APIRouter:
    r = APIRouter()

    def prepare(body: dict[str, Any]) -> tuple[dict[str, Any], ToolCalling, list[int]]:
        oai = to_openai(body)
        tools = ToolCalling.from_body(oai)
        try:
            prompt = core.chat.render(tools.messages(oai["messages"], native=core.chat.native_tools), tools=tools.for_template(),
                                      **(oai.get("chat_template_kwargs") or {}))
        except TemplateError as e:
            raise APIError(400, str(e)) from None
        return oai, tools, core.prompt_tokens(prompt)

    @r.post("/v1/messages")
    async def messages(request: Request) -> Any:
        oai, tools, tokens = prepare(await parse_json(request))
        req = core.request(tokens, {**oai, "grammar": tools.grammar() or structured(oai)}, n_predict_key="max_tokens")
        mid = f"msg_{uuid.uuid4().hex}"
        if oai.get("stream"):
            events = core.stream(req, request)
            try:  # as llama-server: wait for the first result, so a refused request gets its HTTP status
                first = await events.__anext__()
            except StopAsyncIteration:
                first = None
            return sse(_events(core, mid, len(tokens), first, events, tools), done=None, event=True)
        d, _ = await core.complete(req, request)
        blocks = _blocks(tools, d.text)
        reason = stop_reason(d, any(b["type"] == "tool_use" for b in blocks))
        return {"id": mid, "type": "message", "role": "assistant", "content": blocks, "model": core.alias,
                "stop_reason": reason, "stop_sequence": d.stopping_word if reason == "stop_sequence" else None,
                "usage": _usage(d)}

    @r.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> dict[str, int]:
        _, _, tokens = prepare(await parse_json(request))
        return {"input_tokens": len(tokens)}

    return r


async def _events(core: Core, mid: str, n_prompt: int, first: Token | Done | None,
                  events: AsyncIterator[Token | Done], tools: ToolCalling) -> AsyncIterator[tuple[str, Any]]:
    """Anthropic's event sequence; with tools offered the answer is held and parsed at the end."""
    def ev(name: str, **data: Any) -> tuple[str, dict[str, Any]]:
        return name, {"type": name, **data}

    def block(index: int, b: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if b["type"] == "text":
            return [ev("content_block_start", index=index, content_block={"type": "text", "text": ""}),
                    ev("content_block_delta", index=index, delta={"type": "text_delta", "text": b["text"]}),
                    ev("content_block_stop", index=index)]
        return [ev("content_block_start", index=index, content_block={**b, "input": {}}),
                ev("content_block_delta", index=index,
                   delta={"type": "input_json_delta", "partial_json": json.dumps(b["input"])}),
                ev("content_block_stop", index=index)]

    yield ev("message_start", message={
        "id": mid, "type": "message", "role": "assistant", "content": [], "model": core.alias, "stop_reason": None,
        "stop_sequence": None, "usage": {"cache_read_input_tokens": 0, "input_tokens": n_prompt, "output_tokens": 0}})
    held: list[str] = []
    text_open = False
    e = first
    try:
        while e is not None:
            if isinstance(e, Done):
                blocks = _blocks(tools, "".join(held)) if tools.active else []
                if text_open:
                    yield ev("content_block_stop", index=0)
                for i, b in enumerate(blocks, start=int(text_open)):
                    for x in block(i, b):
                        yield x
                reason = stop_reason(e, any(b["type"] == "tool_use" for b in blocks))
                yield ev("message_delta", delta={"stop_reason": reason, "stop_sequence":
                                                 e.stopping_word if reason == "stop_sequence" else None},
                         usage={"output_tokens": e.n_predicted, "input_tokens": e.n_prompt - e.n_cached,
                                "cache_read_input_tokens": e.n_cached})
                yield ev("message_stop")
                return
            if tools.active:
                held.append(e.text)
            elif e.text:
                if not text_open:
                    yield ev("content_block_start", index=0, content_block={"type": "text", "text": ""})
                    text_open = True
                yield ev("content_block_delta", index=0, delta={"type": "text_delta", "text": e.text})
            e = await events.__anext__()
    except StopAsyncIteration:  # the client went away
        return
    except APIError as err:  # the status line has gone out: Anthropic's error event
        yield ev("error", error=error_body(err)["error"])
