"""llama.cpp's native routes: /completion(s), /tokenize, /detokenize, /apply-template, /health,
/props, /slots, /metrics, and 501 for what this server does not offer (embeddings, reranking, infill)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from ..chat_template import TemplateError
from ..engine import Done, EngineError, Progress, Token
from .core import APIError, Core
from .grammar import structured
from .http import parse_json, sse
from .openai import progress


def split_prompts(prompt: Any) -> list[Any]:
    """llama-server's forms: one prompt (a string, token ids, or ids and strings mixed) or several."""
    if isinstance(prompt, dict):
        return [prompt]
    if isinstance(prompt, list) and any(isinstance(p, (list, dict)) for p in prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    return [prompt]


def nested(fields: list[str], res: dict[str, Any]) -> dict[str, Any]:
    """llama-server's `response_fields`: "a/b" picks res["a"]["b"] under the key "a/b"."""
    out = {}
    for f in fields:
        cur: Any = res
        for part in f.split("/"):
            if not isinstance(cur, dict) or part not in cur:
                cur = None
                break
            cur = cur[part]
        if cur is not None:
            out[f] = cur
    return out


def router(core: Core) -> APIRouter:
    r = APIRouter()

    def tokens_of(p: Any) -> list[int]:
        if isinstance(p, dict):
            if p.get("multimodal_data"):
                raise APIError(400, "multimodal data needs a model with a multimodal projector; this one reads text")
            p = p.get("prompt_string", "")
        return core.prompt_tokens(p)

    def final(d: Done, req: Any, body: dict[str, Any], toks: list[Token], stream: bool) -> dict[str, Any]:
        res = {"index": 0, "content": "" if stream else d.text,
               "tokens": d.tokens if body.get("return_tokens") else [], "id_slot": d.slot, "stop": True,
               "model": core.alias, "tokens_predicted": d.n_predicted, "tokens_evaluated": d.n_prompt,
               "generation_settings": core.generation_settings(req) | {"stream": stream},
               "prompt": core.detokenize(req.prompt, special=True), "has_new_line": "\n" in d.text, "truncated": d.truncated,
               "stop_type": d.stop_type, "stopping_word": d.stopping_word,
               "tokens_cached": len(req.prompt) + len(d.tokens), "timings": d.timings}
        if not stream and req.sampling.n_probs:
            res["completion_probabilities"] = core.token_probs(toks, bool(body.get("post_sampling_probs")))
        return nested(body["response_fields"], res) if body.get("response_fields") else res

    @r.post("/completion")
    @r.post("/completions")
    async def completion(request: Request) -> Any:
        body = await parse_json(request)
        if "prompt" not in body:
            raise APIError(400, "\"prompt\" is required")
        grammar = structured(body)
        prompts = split_prompts(body["prompt"])
        reqs = [core.request(tokens_of(p), {**body, "grammar": grammar}) for p in prompts]
        if body.get("stream"):
            if len(reqs) > 1:
                raise APIError(400, "streaming accepts one prompt")
            return sse(_stream(core, core.start(reqs[0]), reqs[0], request, body, final), done=None)
        done = await asyncio.gather(*(core.complete(req, request) for req in reqs))  # on free slots at once
        outs = [final(d, req, body, toks, False) for req, (d, toks) in zip(reqs, done)]
        return outs[0] if len(outs) == 1 else outs

    @r.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await parse_json(request)
        content = body.get("content", "")
        if not isinstance(content, str):
            raise APIError(400, "\"content\" must be a string")
        toks = core.tokenize(content, bool(body.get("add_special", False)), bool(body.get("parse_special", True)))
        if body.get("with_pieces"):
            out = []
            for t in toks:
                b = core.engine.piece(t, special=True)
                try:
                    piece: Any = b.decode("utf-8")
                except UnicodeDecodeError:
                    piece = list(b)
                out.append({"id": t, "piece": piece})
            return {"tokens": out}
        return {"tokens": toks}

    @r.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await parse_json(request)
        toks = body.get("tokens", [])
        n_vocab = core.llm.n_vocab()
        if not isinstance(toks, list) or any(not isinstance(t, int) or t < 0 or t >= n_vocab for t in toks):
            raise APIError(400, f"\"tokens\" must be token ids in [0, {n_vocab})")
        return {"content": core.detokenize(toks)}

    @r.post("/apply-template")
    async def apply_template(request: Request) -> dict[str, Any]:
        body = await parse_json(request)
        try:
            return {"prompt": core.chat.render(body.get("messages") or [], tools=body.get("tools"),
                                               add_generation_prompt=body.get("add_generation_prompt", True) is not False,
                                               **(body.get("chat_template_kwargs") or {}))}
        except TemplateError as e:
            raise APIError(400, str(e)) from None

    @r.get("/health")
    @r.get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @r.get("/props")
    async def props() -> dict[str, Any]:
        """Answered from what is known without the model: does not wake a sleeping server."""
        t, m = core.telemetry(), core.meta
        return {"default_generation_settings": {
                    "n_ctx": m["n_ctx_slot"], "id": 0, "is_processing": False,
                    "params": core.generation_settings(core.request([0], {}))},
                "total_slots": core.s.parallel, "model_alias": core.alias, "model_path": m["path"],
                "chat_template": m["template"], "bos_token": m["bos"], "eos_token": m["eos"],
                "build_info": "swapmoe-gguf", "modalities": {"vision": False, "audio": False},
                "is_sleeping": core.sleeping,
                "swapmoe": {"policy": core.policy_name, "experts_per_layer": t.slots, "n_expert": m["n_expert"],
                            "budget_bytes": t.budget_bytes, "rss_bytes": t.rss_bytes,
                            "default_temperature": core.sampling.temp}}

    @r.post("/props")
    async def set_props() -> None:
        raise APIError(501, "this server does not change its properties at run time", "not_supported_error")

    @r.get("/slots")
    async def slots() -> list[dict[str, Any]]:
        if not core.s.slots:
            raise APIError(501, "This server does not support slots endpoint. Start it with `--slots`",
                           "not_supported_error")
        return [{"id": s.id, "id_task": -1, "n_ctx": core.engine.n_ctx_slot, "is_processing": s.busy,
                 "n_past": len(s.cache), "next_token": [{"has_next_token": s.busy, "n_remain": -1,
                                                         "n_decoded": 0}]}
                for s in core.engine.slots]

    @r.post("/slots/{id_slot}")
    async def slot_action(id_slot: int, request: Request, action: str = "") -> dict[str, Any]:
        """save / restore a slot's KV cache to a file in --slot-save-path, or erase it."""
        body = await parse_json(request)
        run = lambda fn, *a: asyncio.get_running_loop().run_in_executor(None, fn, *a)  # noqa: E731
        try:
            if action == "erase":
                return {"id_slot": id_slot, "n_erased": await run(core.engine.erase_slot, id_slot)}
            if action not in ("save", "restore"):
                raise APIError(400, f"action must be save, restore or erase, got {action!r}")
            if not core.s.slot_save_path:
                raise APIError(501, "This server does not support slot save and restore. Start it with "
                               "`--slot-save-path`", "not_supported_error")
            name = body.get("filename")
            if not isinstance(name, str) or not _safe_filename(name):
                raise APIError(400, "\"filename\" must be a plain file name (no directories)")
            path = str(Path(core.s.slot_save_path) / name)
            t0 = time.perf_counter()
            if action == "save":
                n, size = await run(core.engine.save_slot, id_slot, path)
                return {"id_slot": id_slot, "filename": name, "n_saved": n, "n_written": size,
                        "timings": {"save_ms": 1e3 * (time.perf_counter() - t0)}}
            if not Path(path).is_file():
                raise APIError(400, f"no saved slot named {name!r}")
            n, size = await run(core.engine.restore_slot, id_slot, path)
            return {"id_slot": id_slot, "filename": name, "n_restored": n, "n_read": size,
                    "timings": {"restore_ms": 1e3 * (time.perf_counter() - t0)}}
        except EngineError as e:
            raise APIError(e.status, str(e), e.kind) from None

    @r.get("/cors-proxy")
    @r.post("/cors-proxy")
    async def cors_proxy() -> None:  # llama-server without --ui-mcp-proxy
        raise APIError(403, "the CORS proxy is not enabled on this server", "permission_error")

    for path in ("/embedding", "/embeddings", "/v1/embeddings", "/rerank", "/reranking", "/v1/rerank",
                 "/v1/reranking", "/infill", "/lora-adapters"):
        r.add_api_route(path, _not_supported(path), methods=["POST"])

    @r.get("/metrics")
    async def metrics() -> PlainTextResponse:
        if not core.s.metrics:
            raise APIError(501, "This server does not support metrics endpoint. Start it with `--metrics`",
                           "not_supported_error")
        res = PlainTextResponse(render_metrics(core), media_type="text/plain; version=0.0.4")
        # as llama-server writes it (clients that read headers into a plain dict match the case)
        res.raw_headers.append((b"Process-Start-Time-Unix", str(int(core.started)).encode()))
        return res

    return r


def _safe_filename(name: str) -> bool:
    """llama-server's rule: a plain name, no separators, no '..', printable, not too long."""
    return (0 < len(name) <= 255 and name not in (".", "..") and not any(c in name for c in "/\\:")
            and name.isprintable() and not name.startswith("."))


def _not_supported(path: str) -> Any:
    async def handler() -> None:
        raise APIError(501, f"{path} is not supported: this server generates text (no embeddings, reranking, "
                            "infill or LoRA adapters)", "not_supported_error")
    return handler


async def _stream(core: Core, job: Any, req: Any, request: Request, body: dict[str, Any],
                  final: Any) -> AsyncIterator[Any]:
    toks: list[Token] = []
    async for ev in core.stream(job, request):
        if isinstance(ev, Progress):
            yield {"index": 0, "content": "", "tokens": [], "stop": False, "id_slot": -1,
                   "prompt_progress": progress(ev),
                   "timings": {"prompt_n": ev.processed - ev.cache, "prompt_ms": ev.time_ms,
                               "predicted_n": 0, "predicted_ms": 0.0}}
            continue
        if isinstance(ev, Token):
            chunk: dict[str, Any] = {"index": 0, "content": ev.text, "tokens": [ev.id] if ev.id >= 0 else [],
                                     "stop": False, "id_slot": -1}
            if ev.top is not None:
                chunk["completion_probabilities"] = core.token_probs([ev], bool(body.get("post_sampling_probs")))
            toks.append(ev)
            yield chunk
        else:
            yield final(ev, req, body, toks, True)


def render_metrics(core: Core) -> str:
    """llama-server's `llamacpp:` series, then SwapMoE's own."""
    c, t, st = core.counters, core.telemetry(), core.engine_stats()
    busy, waiting = (0, 0) if core.sleeping else (core.engine.n_busy, core.engine.n_waiting)
    prompt_rate, gen_rate = core.throughput_window()
    rows = [
        ("llamacpp:prompt_tokens_total", "counter", "Number of prompt tokens processed.", c["prompt_tokens"]),
        ("llamacpp:prompt_tokens_cached_total", "counter", "Number of prompt tokens reused from the cache.",
         c.get("cached_tokens", 0)),
        ("llamacpp:prompt_seconds_total", "counter", "Prompt process time", c["prompt_seconds"]),
        ("llamacpp:tokens_predicted_total", "counter", "Number of generation tokens processed.",
         c["predicted_tokens"]),
        ("llamacpp:tokens_predicted_seconds_total", "counter", "Predict process time", c["predicted_seconds"]),
        ("llamacpp:n_decode_total", "counter", "Total number of llama_decode() calls", st["decode_calls"]),
        ("llamacpp:n_tokens_max", "counter", "Largest observed n_tokens.", st["n_past_max"]),
        ("llamacpp:spec_decode_num_draft_tokens_total", "counter", "Draft tokens (no speculative decoding here)", 0),
        ("llamacpp:spec_decode_num_accepted_tokens_total", "counter", "Accepted draft tokens", 0),
        ("llamacpp:spec_decode_num_drafts_total", "counter", "Drafts", 0),
        ("llamacpp:prompt_tokens_seconds", "gauge", "Prompt throughput in tokens/s since the last scrape.",
         prompt_rate),
        ("llamacpp:predicted_tokens_seconds", "gauge", "Generation throughput in tokens/s since the last scrape.",
         gen_rate),
        ("llamacpp:requests_processing", "gauge", "Number of requests processing.", busy),
        ("llamacpp:requests_deferred", "gauge", "Number of requests deferred.", waiting),
        ("llamacpp:n_busy_slots_per_decode", "gauge", "Average number of busy slots per llama_decode() call",
         st["busy_slots_sum"] / st["decode_calls"] if st["decode_calls"] else 0.0),
        ("swapmoe_requests_total", "counter", "requests accepted", c["requests"]),
        ("swapmoe_requests_refused_total", "counter", "requests refused with 503", c["refused"]),
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
    return "".join(f"# HELP {n} {h}\n# TYPE {n} {ty}\n{n} {v}\n" for n, ty, h, v in rows)
