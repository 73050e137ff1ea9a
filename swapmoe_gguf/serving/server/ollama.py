"""Ollama's REST API, so Ollama clients (Open WebUI, editor plugins, the `ollama` client libraries)
work unchanged: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version, /api/pull.

One model: /api/tags lists it as "<alias>:latest", and every request is served by it whatever model
name it gives (clients send back the name they listed, or one typed by hand); the name is echoed.
As in Ollama, streaming is the default (NDJSON lines, then a last `done: true` line with the
durations in nanoseconds); `"stream": false` gives one object. `options` carries the sampling
settings (num_predict, temperature, top_k, top_p, min_p, typical_p, seed, stop, repeat_penalty,
repeat_last_n, presence/frequency_penalty); load-time options (num_ctx, num_gpu, ...), `keep_alive`
and generate's `template` are accepted and ignored: the model is loaded once, with the server's
settings. `format` ("json" or a JSON schema) becomes a grammar. Tools use the generic JSON tool-call
format (tools.py), answered as Ollama's `tool_calls` (arguments an object); Ollama has no
`tool_choice`, so the model chooses between a call and an answer (`tool_choice` is accepted as an
extension). Errors are Ollama's `{"error": "..."}` with the HTTP status; one after a stream has begun
is a last `{"error": ...}` line. Not served: embeddings, images, thinking, create/copy/delete/push.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable

import llama_cpp
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..chat_template import TemplateError
from ..engine import Done, Token
from .core import APIError, Core
from .grammar import schema_grammar
from .http import ndjson, parse_json
from .tools import ToolCalling

VERSION = "0.12.0"  # the Ollama version reported: clients gate features (tools, formats) on it
_NUMBERS = {"num_predict": int, "seed": int, "top_k": int, "repeat_last_n": int, "temperature": float, "top_p": float,
            "min_p": float, "typical_p": float, "repeat_penalty": float, "presence_penalty": float,
            "frequency_penalty": float}
_FTYPES = {getattr(llama_cpp, n): n.split("_", 3)[-1] for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_")}
_FTYPES.update({0: "F32", 1: "F16"})
_UNSUPPORTED = {"/api/create": "creating models", "/api/copy": "copying models", "/api/delete": "deleting models",
                "/api/push": "pushing models", "/api/embed": "embeddings", "/api/embeddings": "embeddings"}


def _iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if ts is None else ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Errors in Ollama's shape (the app's handler answers llama-server's)."""
    @functools.wraps(fn)
    async def route(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except (APIError, TemplateError) as e:
            e = e if isinstance(e, APIError) else APIError(400, str(e))
            return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)
    return route


async def _streamed(chunks: AsyncIterator[dict[str, Any]]) -> Any:
    """NDJSON; the first line is awaited here, so that an error before it is a plain error response."""
    try:
        first = [await chunks.__anext__()]
    except StopAsyncIteration:  # the client went away before the first token
        first = []

    async def lines() -> AsyncIterator[dict[str, Any]]:
        try:
            for c in first:
                yield c
            async for c in chunks:
                yield c
        finally:
            await chunks.aclose()  # a client gone mid-stream cancels the generation now
    return ndjson(lines())


def _sampling(opts: Any) -> dict[str, Any]:
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise APIError(400, "\"options\" must be an object")
    out: dict[str, Any] = {}
    for k, v in opts.items():
        if v is None:
            continue
        if k == "stop":
            v = [v] if isinstance(v, str) else v
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                raise APIError(400, "option \"stop\" must be an array of strings")
            out[k] = v
        elif k in _NUMBERS:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise APIError(400, f"option \"{k}\" must be a number")
            out[k] = _NUMBERS[k](v)
    if out.get("num_predict", 0) <= 0:  # Ollama: -1 (and 0) no limit, -2 fill the context
        out.pop("num_predict", None)
    return out


def _format(fmt: Any) -> str | None:
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return schema_grammar({"type": "object"})
    if isinstance(fmt, dict):
        return schema_grammar(fmt)
    raise APIError(400, f"invalid format: {json.dumps(fmt)}; expected \"json\" or a valid JSON Schema")


def _checked(body: dict[str, Any]) -> str:
    """The request's model name (echoed back), after the checks every generation shares."""
    model = body.get("model") or body.get("name") or ""
    if not isinstance(model, str):
        raise APIError(400, "\"model\" must be a string")
    if body.get("think") not in (None, False, "", "false"):
        raise APIError(400, f"\"{model}\" does not support thinking")
    if body.get("images"):
        raise APIError(400, f"\"{model}\" does not support image input (this model reads text)")
    top = body.get("top_logprobs") or 0
    if not isinstance(top, int) or not 0 <= top <= 20:
        raise APIError(400, "top_logprobs must be between 0 and 20")
    return model


def _loaded(body: dict[str, Any]) -> str:
    return "unload" if body.get("keep_alive") in (0, "0", "0s", "0m") else "load"


def _messages(msgs: Any) -> list[dict[str, Any]]:
    if not isinstance(msgs, list):
        raise APIError(400, "\"messages\" must be an array")
    out = []
    for m in msgs:
        if not isinstance(m, dict):
            raise APIError(400, "each message must be an object")
        if m.get("images"):
            raise APIError(400, "this model does not support image input (it reads text)")
        calls = m.get("tool_calls")
        if calls and not (isinstance(calls, list) and all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                          and c["function"].get("name") for c in calls)):
            raise APIError(400, "tool_calls must be [{\"function\": {\"name\": ..., \"arguments\": {...}}}, ...]")
        named = {"name": m["tool_name"]} if m.get("tool_name") else {}  # a tool result: which tool
        out.append({k: v for k, v in m.items() if k not in ("images", "thinking", "tool_name")} | named)
    return out


def _message(tools: ToolCalling, text: str) -> dict[str, Any]:
    parsed = tools.parse(text)
    if parsed is None:
        return {"role": "assistant", "content": text}
    content, calls = parsed
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        args = [json.loads(c["function"]["arguments"]) for c in calls]
        msg["tool_calls"] = [{"id": c["id"], "function": {"index": i, "name": c["function"]["name"],
                                                          "arguments": a if isinstance(a, dict) else {}}}
                             for i, (c, a) in enumerate(zip(calls, args))]
    return msg


def _metrics(d: Done, t0: int) -> dict[str, Any]:
    ns = lambda ms: max(1, int(ms * 1e6))  # noqa: E731 - clients divide by these
    return {"done": True, "done_reason": "length" if d.stop_type == "limit" else "stop",
            "total_duration": time.perf_counter_ns() - t0, "load_duration": 0, "prompt_eval_count": d.n_prompt,
            "prompt_eval_duration": ns(d.timings["prompt_ms"]), "eval_count": d.n_predicted,
            "eval_duration": ns(d.timings["predicted_ms"])}


def router(core: Core) -> APIRouter:
    r = APIRouter()
    info = core.llm.vmodel.info  # the file's metadata: stays valid while the model sleeps
    name = core.alias if ":" in core.alias else f"{core.alias}:latest"
    mtime = info.path.stat().st_mtime
    size = sum(info.file_sizes)
    digest = hashlib.sha256(f"{info.path.resolve()}:{size}:{mtime}".encode()).hexdigest()  # not the file's hash
    n_params = sum(math.prod(t.shape) for t in info.tensors)
    by_type: Counter[str] = Counter()
    for t in info.tensors:
        by_type[t.qtype.name] += t.nbytes
    quant = _FTYPES.get(info.get("general.file_type")) or next(iter(by_type.most_common(1)), ("unknown",))[0]
    details = {"parent_model": "", "format": "gguf", "family": info.arch, "families": [info.arch],
               "parameter_size": _human(n_params), "quantization_level": quant}
    s = core.sampling
    params = {"temperature": s.temp, "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p,
              "repeat_penalty": s.repeat_penalty, "num_ctx": core.meta["n_ctx_slot"]}

    def logprobs(toks: list[Token], top: int) -> list[dict[str, Any]]:
        def one(t: int, lp: float) -> dict[str, Any]:
            b = core.engine.piece(t)
            return {"token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b)}
        return [one(t.id, t.logprob) | ({"top_logprobs": [one(i, lp) for i, lp in t.top[:top]]} if top else {})
                for t in toks if t.top is not None and t.id >= 0]

    def request(tokens: list[int], body: dict[str, Any], grammar: str | None) -> Any:
        req = core.request(tokens, {**_sampling(body.get("options")), "grammar": grammar}, n_predict_key="num_predict")
        if body.get("logprobs"):
            req.sampling.n_probs = max(1, body.get("top_logprobs") or 0)
        return req

    async def events(req: Any, http: Request, head: dict[str, Any], key: str, tools: ToolCalling | None, t0: int,
                     body: dict[str, Any], last: Callable[[Done], dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        def piece(text: str) -> Any:
            return {"role": "assistant", "content": text} if key == "message" else text
        top = body.get("top_logprobs") or 0
        async for ev in core.stream(req, http):
            if isinstance(ev, Token):
                if tools is not None and tools.active:  # a tool call is parsed from the whole answer
                    continue
                lp = {"logprobs": logprobs([ev], top)} if ev.top is not None and ev.id >= 0 else {}
                if ev.text or lp:
                    yield {**head, "created_at": _iso(), key: piece(ev.text), "done": False, **lp}
                continue
            if tools is not None and tools.active:
                yield {**head, "created_at": _iso(), key: _message(tools, ev.text), "done": False}
            yield {**head, "created_at": _iso(), key: piece(""), **_metrics(ev, t0), **last(ev)}

    async def run(req: Any, http: Request, head: dict[str, Any], key: str, tools: ToolCalling | None, t0: int,
                  body: dict[str, Any], last: Callable[[Done], dict[str, Any]] = lambda d: {}) -> Any:
        if body.get("stream") is not False:
            return await _streamed(events(req, http, head, key, tools, t0, body, last))
        d, toks = await core.complete(req, http)
        out = {**head, "created_at": _iso(), key: _message(tools, d.text) if tools else d.text,
               **_metrics(d, t0), **last(d)}
        if req.sampling.n_probs:
            out["logprobs"] = logprobs(toks, body.get("top_logprobs") or 0)
        return out

    @r.post("/api/chat")
    @_errors
    async def chat(http: Request) -> Any:
        t0 = time.perf_counter_ns()
        body = await parse_json(http)
        model = _checked(body)
        msgs = _messages(body.get("messages") or [])
        if not msgs:
            return {"model": model, "created_at": _iso(), "message": {"role": "assistant", "content": ""},
                    "done": True, "done_reason": _loaded(body)}
        tools = ToolCalling.from_body({"tools": body.get("tools") or [],
                                       "tool_choice": body.get("tool_choice", "auto")})  # (an extension)
        prompt = core.chat.render(tools.messages(msgs, native=core.chat.native_tools), tools=tools.for_template())
        req = request(core.prompt_tokens(prompt), body, tools.grammar() or _format(body.get("format")))
        return await run(req, http, {"model": model}, "message", tools, t0, body)

    @r.post("/api/generate")
    @_errors
    async def generate(http: Request) -> Any:
        t0 = time.perf_counter_ns()
        body = await parse_json(http)
        model = _checked(body)
        prompt, system, context = body.get("prompt") or "", body.get("system") or "", body.get("context") or []
        if not isinstance(prompt, str) or not isinstance(system, str):
            raise APIError(400, "\"prompt\" and \"system\" must be strings")
        if body.get("suffix"):
            raise APIError(400, f"\"{model}\" does not support insert")
        if not isinstance(context, list) or not all(isinstance(t, int) and 0 <= t < core.meta["n_vocab"] for t in context):
            raise APIError(400, "\"context\" must be an array of token ids, as a previous response gave")
        raw = bool(body.get("raw"))
        if raw and (system or context or body.get("template")):
            raise APIError(400, "raw mode does not support template, system, or context")
        if not prompt:
            return {"model": model, "created_at": _iso(), "response": "", "done": True, "done_reason": _loaded(body)}
        if raw:
            tokens = core.prompt_tokens(prompt)
        else:
            text = core.chat.render(([{"role": "system", "content": system}] if system else [])
                                    + [{"role": "user", "content": prompt}])
            tokens = list(context) + core.tokenize(text, add_special=not context)
        req = request(tokens, body, _format(body.get("format")))
        # `context`: the conversation so far (prompt and answer), for the next request to continue
        return await run(req, http, {"model": model}, "response", None, t0, body,
                         lambda d: {} if raw else {"context": tokens + d.tokens})

    @r.api_route("/api/tags", methods=["GET", "HEAD"])
    async def tags() -> dict[str, Any]:
        return {"models": [{"name": name, "model": name, "modified_at": _iso(mtime), "size": size, "digest": digest,
                            "details": details}]}

    @r.post("/api/show")
    @_errors
    async def show(http: Request) -> Any:
        body = await parse_json(http)
        if not (body.get("model") or body.get("name")):
            raise APIError(400, "model is required")
        model_info: dict[str, Any] = {}
        for key, f in info.reader.fields.items():
            if key.startswith("GGUF.") or key in ("general.name", "tokenizer.chat_template"):
                continue
            try:
                v = f.contents()
            except (ValueError, IndexError, UnicodeDecodeError):
                continue
            model_info[key] = [] if isinstance(v, list) and len(v) > 5 and not body.get("verbose") else v
        model_info.setdefault("general.parameter_count", n_params)
        lines = [f"{k:<30} {v}" for k, v in params.items()]
        modelfile = "\n".join([f"# Modelfile generated by swapmoe-gguf\nFROM {info.path}\n",
                               f'TEMPLATE """{core.chat.source}"""\n', *("PARAMETER " + x for x in lines)])
        return {"modelfile": modelfile, "parameters": "\n".join(lines), "template": core.chat.source,
                "details": details, "model_info": model_info, "capabilities": ["completion", "tools"],
                "modified_at": _iso(mtime), "license": str(info.get("general.license", ""))}

    @r.get("/api/ps")
    async def ps() -> dict[str, Any]:
        if core.sleeping:  # freed: nothing is loaded (asking does not wake it)
            return {"models": []}
        resident = info.weight_bytes_with(core.telemetry().slots) if info.n_expert else size
        return {"models": [{"name": name, "model": name, "size": resident, "digest": digest, "details": details,
                            "expires_at": "2999-12-31T23:59:59Z", "size_vram": 0,
                            "context_length": core.meta["n_ctx_slot"]}]}

    @r.api_route("/api/version", methods=["GET", "HEAD"])
    async def version() -> dict[str, str]:
        return {"version": VERSION}

    @r.post("/api/pull")
    @_errors
    async def pull(http: Request) -> Any:  # the one model is always here: nothing to fetch
        body = await parse_json(http)
        return {"status": "success"} if body.get("stream") is False else ndjson(_one({"status": "success"}))

    for path, what in _UNSUPPORTED.items():
        r.add_api_route(path, _refuse(what), methods=["DELETE"] if path == "/api/delete" else ["POST"])
    return r


async def _one(obj: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    yield obj


def _refuse(what: str) -> Callable[[], Any]:
    async def unsupported() -> JSONResponse:
        return JSONResponse({"error": f"{what} is not supported: this server serves one fixed model"}, 501)
    return unsupported


def _human(n: int) -> str:
    """Ollama's parameter size: 8B, 7.2B, 567.21M, 260K."""
    for div, unit in ((1e9, "B"), (1e6, "M")):
        if n >= div:
            x = n / div
            return f"{x:.0f}{unit}" if x == int(x) else (f"{x:.1f}{unit}" if unit == "B" else f"{x:.2f}{unit}")
    return f"{n / 1e3:.0f}K" if n >= 1e3 else str(n)
