"""`swapmoe serve`: a llama-server-compatible HTTP API on the Virtual Experts runtime.

OpenAI endpoints (`/v1/chat/completions`, `/v1/completions`, `/v1/models`) reuse llama-cpp-python's
request models and `Llama.create_*` methods; llama.cpp's native ones (`/completion`, `/tokenize`,
`/detokenize`, `/health`, `/props`, `/metrics`) follow llama-server's shapes; `/swapmoe/budget`
changes the memory budget live.

One generation runs at a time (a single model); up to `queue` requests wait, more get 503 with
Retry-After. A streaming client that disconnects stops its generation. With an API key every
endpoint but /health needs `Authorization: Bearer KEY` (constant-time comparison). Request bodies
are capped; CORS is off unless origins are given; no endpoint reads or writes a client-given path.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from pydantic import BaseModel, Field, ValidationError

from .budget import fmt
from .errors import SwapMoEError
from .settings import SamplingSettings

log = logging.getLogger(__name__)
PUBLIC_PATHS = frozenset({"/health", "/v1/health"})  # no API key needed (llama-server's list)

# llama-cpp-python request fields that `Llama.create_*` does not take
_EXCLUDE = {"n", "best_of", "logit_bias_type", "user", "min_tokens", "model", "functions", "function_call",
            "tools", "tool_choice"}


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    alias: str | None = None
    queue: int = 8                      # requests allowed to wait for the model (-np/--parallel)
    max_body_bytes: int = 8 << 20
    cors_origins: tuple[str, ...] = ()
    retry_after_s: int = 2


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers or {}


def _error(status: int, message: str, type_: str, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}},
                        status_code=status, headers=headers)


class Gate:
    """One generation at a time; a bounded number of waiters; the rest are refused."""

    def __init__(self, queue: int):
        self.lock = asyncio.Lock()
        self.waiting = 0
        self.queue = queue
        self.served = self.refused = 0

    def check(self, retry_after: int) -> None:
        """Refuse now if the queue is full. Streams check before their 200 headers go out (their
        generator enters the gate only once the response is streaming)."""
        if self.lock.locked() and self.waiting >= self.queue:
            self.refused += 1
            raise APIError(503, "server busy: too many requests waiting for the model", "server_error",
                           "queue_full", {"Retry-After": str(retry_after)})

    async def enter(self, retry_after: int, admitted: bool = False) -> None:
        """Wait for the model. `admitted`: the request already passed `check` and answered 200 (a
        stream), so it waits even if the queue filled up meanwhile."""
        if not admitted:
            self.check(retry_after)
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1

    def leave(self) -> None:
        self.served += 1
        self.lock.release()


class TokenizeRequest(BaseModel):
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    tokens: list[int]


class NativeCompletionRequest(BaseModel):
    prompt: str | list[int]
    n_predict: int = Field(default=-1, ge=-1)
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    stream: bool = False


class BudgetRequest(BaseModel):
    memory_budget: str | None = None
    experts_per_layer: int | None = Field(default=None, ge=1)


class Server:
    def __init__(self, llm: Any, settings: ServerSettings, sampling: SamplingSettings | None = None):
        self.llm, self.s = llm, settings
        self.sampling = sampling or SamplingSettings()
        self.alias = settings.alias or llm.vmodel.info.path.stem
        self.gate = Gate(settings.queue)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swapmoe-gen")
        self.counters = {"prompt_tokens": 0, "predicted_tokens": 0, "requests": 0, "disconnects": 0}
        self.started = int(time.time())

    # plumbing ------------------------------------------------------------------------------
    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run a blocking model call under the gate."""
        await self.gate.enter(self.s.retry_after_s)
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn)
        finally:
            self.gate.leave()

    async def stream(self, request: Request, make: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
        """Items of a blocking generator, produced on the model thread under the gate. A client that
        goes away stops the generator between two tokens."""
        await self.gate.enter(self.s.retry_after_s, admitted=True)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        done = object()

        def produce() -> None:
            it = None
            try:
                it = make()
                for item in it:
                    loop.call_soon_threadsafe(q.put_nowait, item)
                    if stop.is_set():
                        break
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                loop.call_soon_threadsafe(q.put_nowait, e)
            finally:
                if it is not None and hasattr(it, "close"):
                    it.close()
                loop.call_soon_threadsafe(q.put_nowait, done)

        fut = loop.run_in_executor(self.pool, produce)
        finished = False
        try:
            while True:
                item = await q.get()
                if item is done:
                    finished = True
                    break
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if await request.is_disconnected():
                    break
        finally:
            # Reached early when the client hangs up (the response task is cancelled): stop the
            # producer at its next token and free the model, shielded from that cancellation.
            stop.set()
            if not finished:
                self.counters["disconnects"] += 1
            with anyio.CancelScope(shield=True):
                await fut
            self.gate.leave()

    def _count(self, out: dict[str, Any]) -> None:
        u = out.get("usage") or {}
        self.counters["prompt_tokens"] += u.get("prompt_tokens", 0)
        self.counters["predicted_tokens"] += u.get("completion_tokens", 0)

    def openai_kwargs(self, body: BaseModel) -> dict[str, Any]:
        """`Llama.create_*` keyword arguments from an OpenAI request, with llama-server's defaults."""
        kwargs = self._sampling_defaults(body, body.model_dump(exclude=_EXCLUDE | {"grammar", "logit_bias"}))
        bias = getattr(body, "logit_bias", None)
        if bias:
            kwargs["logit_bias"] = {int(k): v for k, v in bias.items()}
        self.counters["requests"] += 1
        return kwargs

    async def respond(self, request: Request, stream: bool, make: Callable[..., Any], kwargs: dict[str, Any],
                      sse: Callable[..., Any]) -> Any:
        if stream:
            self.gate.check(self.s.retry_after_s)
            return sse(self.stream(request, lambda: make(**kwargs, stream=True)))
        out = await self.run(lambda: make(**kwargs))
        self._count(out)
        return out | {"model": self.alias}

    def _check_prompt(self, n_tokens: int) -> None:
        if n_tokens >= self.llm.n_ctx():
            raise APIError(400, f"the prompt has {n_tokens} tokens; the context holds {self.llm.n_ctx()}",
                           "invalid_request_error", "context_length_exceeded")

    def _sampling_defaults(self, body: BaseModel, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Fields the client did not set take llama-server's defaults (repeat penalty 1.0, not 1.1)."""
        d = self.sampling
        for field, value in (("temperature", d.temp), ("top_p", d.top_p), ("top_k", d.top_k), ("min_p", d.min_p),
                             ("repeat_penalty", d.repeat_penalty)):
            if field not in body.model_fields_set:
                kwargs[field] = value
        return kwargs


def create_app(llm: Any, settings: ServerSettings | None = None, sampling: SamplingSettings | None = None) -> FastAPI:
    srv = Server(llm, settings or ServerSettings(), sampling)
    s = srv.s
    app = FastAPI(title="swapmoe-gguf", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    if s.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(s.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])

    @app.middleware("http")
    async def guard(request: Request, call_next):  # type: ignore[no-untyped-def]
        # as llama-server: health is public, a browser's CORS preflight carries no key, and the key
        # may come as `Authorization: Bearer KEY` or Anthropic's `X-Api-Key: KEY`
        if s.api_key and request.url.path not in PUBLIC_PATHS and request.method != "OPTIONS":
            given = request.headers.get("authorization", "") or request.headers.get("x-api-key", "")
            given = given[7:] if given.lower().startswith("bearer ") else given
            if not hmac.compare_digest(given.encode(), s.api_key.encode()):
                return _error(401, "invalid or missing API key", "authentication_error", "invalid_api_key")
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > s.max_body_bytes):
            return _error(413, f"request body over {s.max_body_bytes} bytes", "invalid_request_error",
                          "request_too_large")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return _error(e.status, e.message, e.type, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        msg = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'body'}: {err.get('msg')}"
                        for err in errs[:3]) or "malformed request"
        return _error(400, msg, "invalid_request_error", "invalid_request")

    @app.exception_handler(SwapMoEError)
    async def swapmoe_error(_: Request, e: SwapMoEError) -> JSONResponse:
        return _error(400, str(e), "invalid_request_error", "invalid_value")

    async def parse(request: Request, model: type[BaseModel]) -> Any:
        body = await request.body()
        if len(body) > s.max_body_bytes:
            raise APIError(413, f"request body over {s.max_body_bytes} bytes", code="request_too_large")
        try:
            data = json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "malformed JSON in the request body", code="invalid_json") from None
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None

    def sse(chunks: AsyncIterator[Any], final: str | None = "[DONE]") -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            try:
                async for c in chunks:
                    if "model" in c and "choices" in c:
                        c["model"] = srv.alias
                    yield f"data: {json.dumps(c)}\n\n".encode()
            except APIError as e:
                yield f"data: {json.dumps({'error': {'message': e.message, 'code': e.code}})}\n\n".encode()
            if final:
                yield f"data: {final}\n\n".encode()
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    @app.get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    @app.get("/models")  # llama-server serves the OpenAI paths with and without /v1
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": srv.alias, "object": "model", "created": srv.started,
                                            "owned_by": "swapmoe-gguf"}]}

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(request: Request) -> Any:
        body: CreateCompletionRequest = await parse(request, CreateCompletionRequest)
        kwargs = srv.openai_kwargs(body)
        kwargs.pop("stream")
        prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
        srv._check_prompt(len(llm.tokenize(prompt.encode(), add_bos=True, special=True)))
        kwargs["prompt"] = prompt
        return await srv.respond(request, body.stream, llm.create_completion, kwargs, sse)

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body: CreateChatCompletionRequest = await parse(request, CreateChatCompletionRequest)
        if not body.messages:
            raise APIError(400, "messages must not be empty", code="invalid_value")
        kwargs = srv.openai_kwargs(body)
        kwargs.pop("stream")
        srv._check_prompt(sum(len(llm.tokenize(str(m.get("content") or "").encode(), add_bos=False))
                              for m in kwargs["messages"]))
        return await srv.respond(request, body.stream, llm.create_chat_completion, kwargs, sse)

    @app.post("/completion")
    async def native_completion(request: Request) -> Any:
        body: NativeCompletionRequest = await parse(request, NativeCompletionRequest)
        prompt = body.prompt
        n_prompt = len(prompt) if isinstance(prompt, list) else len(llm.tokenize(prompt.encode(), add_bos=True))
        srv._check_prompt(n_prompt)
        kw = dict(prompt=prompt, max_tokens=None if body.n_predict < 0 else body.n_predict,
                  temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
                  repeat_penalty=body.repeat_penalty, stop=body.stop, seed=body.seed)
        srv.counters["requests"] += 1

        def gen() -> Iterator[dict[str, Any]]:
            t = llm.telemetry()
            t0 = time.perf_counter()
            first = None
            parts: list[str] = []
            finish = None
            for c in llm.create_completion(**kw, stream=True):
                ch = c["choices"][0]
                finish = ch.get("finish_reason") or finish
                if ch["text"]:
                    first = first or time.perf_counter()
                    parts.append(ch["text"])
                    if body.stream:
                        yield {"content": ch["text"], "stop": False}
            now, t2 = time.perf_counter(), llm.telemetry()
            n_pred = t2.decode_tokens - t.decode_tokens + (1 if t2.prefill_tokens > t.prefill_tokens else 0)
            n_eval = t2.prefill_tokens - t.prefill_tokens
            timings = {"prompt_n": n_eval, "prompt_ms": 1e3 * (t2.prefill_seconds - t.prefill_seconds),
                       "predicted_n": n_pred, "predicted_ms": 1e3 * (t2.decode_seconds - t.decode_seconds),
                       "predicted_per_second": ((t2.decode_tokens - t.decode_tokens) /
                                                max(t2.decode_seconds - t.decode_seconds, 1e-9)),
                       "total_ms": 1e3 * (now - t0)}
            srv.counters["prompt_tokens"] += n_eval
            srv.counters["predicted_tokens"] += n_pred
            yield {"content": "" if body.stream else "".join(parts), "stop": True, "model": srv.alias,
                   "tokens_predicted": n_pred, "tokens_evaluated": n_eval, "stop_type": finish,
                   "timings": timings, "generation_settings": kw | {"prompt": None}}

        if body.stream:
            srv.gate.check(s.retry_after_s)
            return sse(srv.stream(request, gen), final=None)
        return await srv.run(lambda: list(gen())[-1])

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body: TokenizeRequest = await parse(request, TokenizeRequest)
        toks = llm.tokenize(body.content.encode(), add_bos=body.add_special, special=True)
        if body.with_pieces:
            return {"tokens": [{"id": t, "piece": llm.detokenize([t]).decode("utf-8", "replace")} for t in toks]}
        return {"tokens": toks}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body: DetokenizeRequest = await parse(request, DetokenizeRequest)
        n_vocab = llm.n_vocab()
        if any(t < 0 or t >= n_vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {n_vocab})", code="invalid_value")
        return {"content": llm.detokenize(body.tokens).decode("utf-8", "replace")}

    @app.get("/props")
    async def props() -> dict[str, Any]:
        t = llm.telemetry()
        d = srv.sampling
        return {"default_generation_settings": {"n_ctx": llm.n_ctx(), "temperature": d.temp, "top_k": d.top_k,
                                                "top_p": d.top_p, "min_p": d.min_p, "repeat_penalty": d.repeat_penalty,
                                                "n_predict": d.n_predict},
                "total_slots": 1, "model_alias": srv.alias, "model_path": llm.vmodel.info.path.name,
                "chat_template": llm.metadata.get("tokenizer.chat_template", ""),
                "swapmoe": {"policy": llm.policy_name, "experts_per_layer": t.slots, "n_expert": llm.vmodel.n_expert,
                            "budget_bytes": t.budget_bytes, "rss_bytes": t.rss_bytes}}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        t = llm.telemetry()
        c = srv.counters
        rows = [
            ("llamacpp:prompt_tokens_total", "counter", "prompt tokens processed", c["prompt_tokens"]),
            ("llamacpp:tokens_predicted_total", "counter", "tokens generated", c["predicted_tokens"]),
            ("llamacpp:requests_processing", "gauge", "requests being processed", int(srv.gate.lock.locked())),
            ("llamacpp:requests_deferred", "gauge", "requests waiting", srv.gate.waiting),
            ("swapmoe_requests_total", "counter", "requests accepted", c["requests"]),
            ("swapmoe_requests_refused_total", "counter", "requests refused with 503", srv.gate.refused),
            ("swapmoe_client_disconnects_total", "counter", "streams stopped by the client", c["disconnects"]),
            ("swapmoe_resident_bytes", "gauge", "process resident memory", t.rss_bytes),
            ("swapmoe_peak_resident_bytes", "gauge", "peak process resident memory", t.peak_rss_bytes),
            ("swapmoe_budget_bytes", "gauge", "memory budget (0: none)", t.budget_bytes or 0),
            ("swapmoe_experts_per_layer", "gauge", "resident experts per MoE layer", t.slots),
            ("swapmoe_swaps_total", "counter", "experts swapped in", t.swaps),
            ("swapmoe_swap_failures_total", "counter", "expert reads that failed", t.swap_failures),
            ("swapmoe_bytes_read_total", "counter", "expert bytes read from disk", t.bytes_read),
            ("swapmoe_io_blocked_seconds_total", "counter", "time decoding waited for I/O", t.io_blocked_seconds),
            ("swapmoe_hit_rate", "gauge", "share of the full router's top-k mass on resident experts",
             t.hit_rate if t.hit_rate is not None else float("nan")),
        ]
        text = "".join(f"# HELP {n} {h}\n# TYPE {n} {ty}\n{n} {v}\n" for n, ty, h, v in rows)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/swapmoe/budget")
    async def set_budget(request: Request) -> dict[str, Any]:
        body: BudgetRequest = await parse(request, BudgetRequest)
        if body.memory_budget is None and body.experts_per_layer is None:
            raise APIError(400, "give memory_budget and/or experts_per_layer", code="invalid_value")
        from .budget import Budget

        # only experts_per_layer given: the current budget still holds
        budget = body.memory_budget if body.memory_budget is not None else (
            Budget(nbytes=llm.budget_bytes) if llm.budget_bytes else None)
        slots = await srv.run(lambda: llm.set_budget(budget, body.experts_per_layer))
        t = llm.telemetry()
        return {"experts_per_layer": slots, "n_expert": llm.vmodel.n_expert, "policy": llm.policy_name,
                "budget_bytes": t.budget_bytes, "budget": fmt(t.budget_bytes) if t.budget_bytes else None}

    return app


def serve(llm: Any, settings: ServerSettings, sampling: SamplingSettings) -> None:
    import uvicorn

    app = create_app(llm, settings, sampling)
    log.warning("serving %s on http://%s:%d (%d of %d experts per layer, %s)", settings.alias or
                llm.vmodel.info.path.name, settings.host, settings.port, llm.vmodel.slots, llm.vmodel.n_expert,
                llm.policy_name)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
