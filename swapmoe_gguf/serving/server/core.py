"""The generation core every API family shares: settings, errors, prompts, sampling, results.

Routes (one module per API family) turn their request shapes into an engine `Request` with
`Core.request(...)`, then either `await core.complete(req)` (the final `Done` and the tokens) or
iterate `core.stream(req, http_request)` (`Token` events, then `Done`); `core.start(req)` submits
first, so a refusal gets its HTTP status before a stream's headers. Errors are `APIError` with
llama-server's type names and codes.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from typing import Any, AsyncIterator, Callable

from fastapi import Request as HTTPRequest

from ...residency.telemetry import RssProbe
from ..chat_template import ChatFormatter
from ..engine import Done, Engine, EngineError, Progress, QueueFull, Request, SamplingParams, Token
from ..settings import SamplingSettings, ServerSettings

log = logging.getLogger(__name__)
BUILD = "b0-swapmoe"   # system_fingerprint (llama-server: its build info, "b<number>-<commit>")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.headers, self.extra = headers or {}, extra


def error_body(e: APIError) -> dict[str, Any]:
    """llama-server's error object (`code` is the HTTP status) plus OpenAI's `param`."""
    return {"error": {"code": e.status, "message": e.message, "type": e.type, "param": None, **e.extra}}


class Core:
    """The model, its engine and chat formatter, and what every route needs from them.

    With `--sleep-idle-seconds N` (and a `loader` to build the model again), the model is freed after
    N idle seconds: /health, /props, /models and /metrics answer from what was known before; anything
    that needs the model (generation, tokenizing) loads it again first, as llama-server does."""

    def __init__(self, llm: Any, settings: ServerSettings, sampling: SamplingSettings | None = None,
                 loader: Callable[[], Any] | None = None):
        self.s = settings
        self.sampling = sampling or SamplingSettings()
        self.loader = loader
        # `--alias a,b,c`: every name is accepted; the id is the first in sorted order (llama-server's set)
        self.aliases = sorted({a.strip() for a in (settings.alias or "").split(",") if a.strip()}) or [
            llm.vmodel.info.path.stem]
        self.alias = self.aliases[0]
        self.started = time.time()
        self.counters = {"prompt_tokens": 0, "prompt_seconds": 0.0, "predicted_tokens": 0,
                         "predicted_seconds": 0.0, "requests": 0, "disconnects": 0, "refused": 0, "cached_tokens": 0}
        self.sleeping, self.last_active, self._owned = False, time.monotonic(), False
        self._lock = threading.Lock()
        self._attach(llm)
        # facts that stay true while the model sleeps
        info = llm.vmodel.info
        seed = getattr(llm, "_seed", None)
        self.meta = {"path": str(info.path), "size": info.path.stat().st_size, "n_vocab": llm.n_vocab(),
                     "n_embd": llm.n_embd(), "n_ctx_train": llm._model.n_ctx_train(), "n_expert": llm.vmodel.n_expert,
                     "n_ctx_slot": self._engine.n_ctx_slot, "policy": llm.policy_name,
                     "seed": 0xFFFFFFFF if seed is None or seed < 0 else int(seed), "template": self._chat.source,
                     "bos": self._chat.bos, "eos": self._chat.eos}
        self._scraped = (0, 0.0, 0, 0.0)  # counters at the last /metrics scrape (throughput windows)
        self._snapshot = llm.telemetry()

    def _attach(self, llm: Any) -> None:
        self._llm = llm
        self._engine = Engine(llm, self.s.parallel, max_queue=self.s.max_queue, context_shift=self.s.context_shift)
        self._chat = ChatFormatter.for_model(llm, self.s)

    # the model, loaded again on first use after a sleep
    @property
    def llm(self) -> Any:
        self.wake()
        return self._llm

    @property
    def engine(self) -> Engine:
        self.wake()
        return self._engine

    @property
    def chat(self) -> ChatFormatter:
        self.wake()
        return self._chat

    def telemetry(self) -> Any:
        """The runtime's numbers; while asleep, the last ones before sleeping with the memory the
        process holds now (does not wake)."""
        if not self.sleeping:
            return self._llm.telemetry()
        probe = RssProbe()
        try:
            return dataclasses.replace(self._snapshot, rss_bytes=probe())
        finally:
            probe.close()

    @property
    def in_transition(self) -> bool:
        """The model is being freed (going to sleep) or loaded again (waking): not to be read now."""
        return self._lock.locked()

    @property
    def policy_name(self) -> str:
        """The residency policy now (a budget change may switch it); does not wake."""
        return self.meta["policy"] if self.sleeping else self._llm.policy_name

    def wake(self) -> None:
        self.last_active = time.monotonic()
        if not self.sleeping:
            return
        with self._lock:
            if self.sleeping:
                log.warning("waking up: loading the model")
                self._attach(self.loader())
                self._owned = True  # loaded here: closed here (the caller closes the model it gave)
                self._engine.stats.update(self._stats)  # counters go on across sleeps
                self.sleeping = False

    def maybe_sleep(self) -> bool:
        """Free the model if it has been idle for --sleep-idle-seconds (and can be loaded again)."""
        n = self.s.sleep_idle_seconds
        if n < 0 or self.sleeping or self.loader is None or time.monotonic() - self.last_active < n:
            return False
        with self._lock:
            e = self._engine
            if self.sleeping or e.n_busy or e.n_waiting:
                return False
            self._snapshot = self._llm.telemetry()
            self.meta["policy"] = self._llm.policy_name
            self._stats = dict(e.stats)
            e.close()
            self._llm.close()
            self._llm = self._engine = self._chat = None
            self.sleeping = True
        import gc

        from ...runtime.process import release_memory

        gc.collect()
        release_memory()  # hand the freed heap back to the system (glibc keeps it otherwise)
        log.warning("sleeping: the model is freed after %g idle seconds", n)
        return True

    def close(self) -> None:
        if not self.sleeping:
            self._engine.close()
            if self._owned:
                self._llm.close()

    # prompts ----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=add_special, special=parse_special)

    def prompt_tokens(self, prompt: Any) -> list[int]:
        """llama-server's prompt forms: a string, a list of token ids, or a mix of both."""
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if isinstance(prompt, list):
            out: list[int] = []
            for i, part in enumerate(prompt):
                if isinstance(part, int):
                    out.append(part)
                elif isinstance(part, str):
                    out += self.tokenize(part, add_special=i == 0)
                else:
                    raise APIError(400, "prompt parts must be strings or token ids")
            return out
        raise APIError(400, "\"prompt\" must be a string, a list of token ids, or a list of both")

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        return b"".join(self.engine.piece(t, special) for t in tokens).decode("utf-8", "replace")

    # requests -----------------------------------------------------------------------------------
    def request(self, tokens: list[int], body: dict[str, Any], *, n_predict_key: str = "n_predict") -> Request:
        """An engine request from a body's sampling fields; unset ones take the server's defaults."""
        d = self.sampling

        def g(key: str, default: Any, kind: type = float) -> Any:
            v = body.get(key)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
                raise APIError(400, f"\"{key}\" must be {'an integer' if kind is int else 'a number'}, got {v!r}")
            return kind(v)

        n_predict = g(n_predict_key, g("n_predict", g("max_tokens", g("max_completion_tokens", self.s.n_predict, int),
                                                      int), int), int)
        seed = g("seed", -1, int)
        n_probs = g("n_probs", 0, int)
        if n_probs < 0:
            raise APIError(400, f"\"n_probs\" must be >= 0, got {n_probs}")
        sp = SamplingParams(
            temperature=g("temperature", d.temp), top_k=g("top_k", d.top_k, int), top_p=g("top_p", d.top_p),
            min_p=g("min_p", d.min_p), typical_p=g("typical_p", 1.0), repeat_penalty=g("repeat_penalty", d.repeat_penalty),
            repeat_last_n=g("repeat_last_n", 64, int), presence_penalty=g("presence_penalty", 0.0),
            frequency_penalty=g("frequency_penalty", 0.0), seed=self.seed if seed < 0 else seed,
            logit_bias=self.logit_bias(body.get("logit_bias")), grammar=body.get("grammar") or None, n_probs=n_probs)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
            raise APIError(400, "\"stop\" must be a string or an array of strings")
        return Request(tokens, n_predict=n_predict, sampling=sp, stop=list(stop),
                       return_progress=bool(body.get("return_progress")),
                       ignore_eos=bool(body.get("ignore_eos", d.ignore_eos)),
                       cache_prompt=bool(body.get("cache_prompt", True)), id_slot=g("id_slot", -1, int))

    @property
    def seed(self) -> int:
        return self.meta["seed"]

    def engine_stats(self) -> dict[str, Any]:
        return self._stats if self.sleeping else self._engine.stats

    def throughput_window(self) -> tuple[float, float]:
        """Prompt and generation tokens/s since the last scrape (llama-server's buckets: a scrape
        reports the work done since the one before, 0 when nothing ran)."""
        c = self.counters
        now = (c["prompt_tokens"], c["prompt_seconds"], c["predicted_tokens"], c["predicted_seconds"])
        pt, ps, dt, ds = (a - b for a, b in zip(now, self._scraped))
        self._scraped = now
        return (pt / ps if ps > 0 else 0.0), (dt / ds if ds > 0 else 0.0)

    def logit_bias(self, bias: Any) -> dict[int, float]:
        """OpenAI's {"token id": bias} or llama-server's [[token or text, bias or false], ...]."""
        out: dict[int, float] = {}
        if not bias:
            return out
        items = bias.items() if isinstance(bias, dict) else bias
        for item in items:
            try:
                key, val = item
            except (TypeError, ValueError):
                raise APIError(400, "logit_bias entries must be [token, bias] pairs") from None
            val = float("-inf") if val is False else float(val)
            if isinstance(key, str) and not key.lstrip("-").isdigit():
                ids = self.tokenize(key, add_special=False)
            else:
                ids = [int(key)]
            for t in ids:
                if not 0 <= t < self.llm.n_vocab():
                    raise APIError(400, f"logit_bias token {t} is not in the vocabulary (0..{self.llm.n_vocab() - 1})")
                out[t] = val
        return out

    # running ------------------------------------------------------------------------------------
    def _submit(self, req: Request, notify: Any = None) -> Any:
        try:
            job = self.engine.submit(req, notify)  # wakes a sleeping model
        except QueueFull as e:
            self.counters["refused"] += 1
            raise APIError(503, str(e), "unavailable_error", headers={"Retry-After": str(self.s.retry_after_s)}) from None
        except EngineError as e:
            raise APIError(e.status, str(e), e.kind, **e.extra) from None
        self.counters["requests"] += 1
        return job

    async def complete(self, req: Request, http: HTTPRequest | None = None) -> tuple[Done, list[Token]]:
        tokens: list[Token] = []
        done = None
        async for ev in self.stream(req, http):
            if isinstance(ev, Done):
                done = ev
            elif isinstance(ev, Token):
                tokens.append(ev)
        assert done is not None
        return done, tokens

    def start(self, req: Request) -> Any:
        """Submit now: a refusal (queue full, prompt too long) is raised before any response is sent."""
        return self._submit(req)

    async def stream(self, req: Request | Any, http: HTTPRequest | None = None) -> AsyncIterator[Token | Progress | Done]:
        """Events of one request (or of a job from `start`); a client that goes away cancels it (its
        slot frees at the next step)."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        notify = lambda: loop.call_soon_threadsafe(wake.set)  # noqa: E731
        if isinstance(req, Request):
            job = self._submit(req, notify)
        else:
            job = req
            job.notify = notify
            wake.set()
        finished = False
        try:
            while True:
                await wake.wait()
                wake.clear()
                while not job.q.empty():
                    ev = job.q.get()
                    if isinstance(ev, EngineError):
                        finished = True
                        raise APIError(ev.status, str(ev), ev.kind, **ev.extra)
                    if isinstance(ev, Done):
                        finished = True
                        self._count(ev)
                    yield ev
                    if finished:
                        return
                if http is not None and await http.is_disconnected():
                    return
        finally:
            self.last_active = time.monotonic()
            if not finished:  # the engine, busy with this job, frees its slot at its next step
                job.cancel()
                self.counters["disconnects"] += 1

    def _count(self, d: Done) -> None:
        c = self.counters
        c["prompt_tokens"] += d.timings["prompt_n"]
        c["cached_tokens"] += d.n_cached
        c["prompt_seconds"] += d.timings["prompt_ms"] / 1e3
        c["predicted_tokens"] += d.n_predicted
        c["predicted_seconds"] += d.timings["predicted_ms"] / 1e3

    def generation_settings(self, req: Request) -> dict[str, Any]:
        p = req.sampling
        return {"n_predict": req.n_predict, "seed": p.seed, "temperature": p.temperature, "top_k": p.top_k,
                "top_p": p.top_p, "min_p": p.min_p, "typical_p": p.typical_p, "repeat_penalty": p.repeat_penalty,
                "repeat_last_n": p.repeat_last_n, "presence_penalty": p.presence_penalty,
                "frequency_penalty": p.frequency_penalty, "n_probs": p.n_probs, "stop": req.stop,
                "ignore_eos": req.ignore_eos, "grammar": p.grammar or "", "n_ctx": self.meta["n_ctx_slot"],
                "adaptive_target": -1.0, "adaptive_decay": 0.9, "dry_multiplier": 0.0, "xtc_probability": 0.0,
                "mirostat": 0, "samplers": ["penalties", "top_k", "typ_p", "top_p", "min_p", "temperature"],
                "stream": False, "cache_prompt": req.cache_prompt, "post_sampling_probs": False,
                # llama-server's shape: -inf is written as null
                "logit_bias": [{"token": t, "bias": None if b == float("-inf") else b} for t, b in (
                    list(p.logit_bias.items()) + ([(t, float("-inf")) for t in self.engine.eog] if req.ignore_eos
                                                  else []))]}

    def token_probs(self, tokens: list[Token], post_sampling: bool = False) -> list[dict[str, Any]]:
        """llama-server's completion_probabilities / OpenAI's logprobs.content entries; with
        `post_sampling_probs`, probabilities ("prob", "top_probs") instead of log-probabilities."""
        key, top = ("prob", "top_probs") if post_sampling else ("logprob", "top_logprobs")
        val = (lambda lp: math.exp(lp)) if post_sampling else (lambda lp: lp)  # noqa: E731

        def one(t: int, lp: float) -> dict[str, Any]:
            b = self.engine.piece(t)
            return {"id": t, "token": b.decode("utf-8", "replace"), "bytes": list(b), key: val(lp)}
        return [one(t.id, t.logprob) | {top: [one(i, lp) for i, lp in t.top]}
                for t in tokens if t.top is not None and t.id >= 0]
