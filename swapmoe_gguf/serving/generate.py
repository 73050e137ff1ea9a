"""One streaming generator of small result records, used by chat, the server and the benchmarks.

    for rec in stream(llm, messages=[{"role": "user", "content": "Hi"}], sampling=SamplingSettings()):
        print(rec.text, end="")

Each record carries the new text, and the running numbers: tokens, timings, memory, hit rate.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Iterator

from .settings import SamplingSettings


@dataclass(frozen=True)
class GenerationRecord:
    text: str                   # new text (may be empty on the final record)
    n_prompt: int
    n_generated: int
    finish_reason: str | None   # set on the final record: "stop" or "length"
    prompt_seconds: float       # time to first token
    elapsed: float
    tok_s: float                # decode tokens per second (time inside llama_decode, one token at a time)
    rss_bytes: int
    peak_rss_bytes: int
    budget_bytes: int | None
    hit_rate: float | None
    swaps: int


def stream(llm: Any, *, messages: list[dict[str, str]] | None = None, prompt: str | list[int] | None = None,
           sampling: SamplingSettings | None = None, formatter: Any = None,
           **extra: Any) -> Iterator[GenerationRecord]:
    """Chat (`messages`, the GGUF's chat template, formatted as `swapmoe serve` formats them: pass
    a `chat_template.ChatFormatter` to reuse one) or raw completion (`prompt`), streamed."""
    sampling = sampling or SamplingSettings()
    kw = {**sampling.kwargs(), **extra, "stream": True}
    if sampling.ignore_eos:
        kw["logit_bias"] = {**kw.get("logit_bias", {}), llm.token_eos(): -1e9}
    if messages is not None:
        if formatter is None:
            from .chat_template import ChatFormatter

            formatter = ChatFormatter.for_model(llm)
        prompt = formatter.render(messages)
    cap = _TokenCap(kw["max_tokens"]) if kw.get("max_tokens") else None
    if cap is not None:
        from llama_cpp import StoppingCriteriaList

        kw["stopping_criteria"] = StoppingCriteriaList([cap, *(kw.get("stopping_criteria") or [])])
    chunks = llm.create_completion(prompt=prompt, **kw)
    start = llm.telemetry()
    t0 = time.perf_counter()
    first: float | None = None
    finish: str | None = None
    for chunk in chunks:
        choice = chunk["choices"][0]
        text = choice.get("text")
        finish = choice.get("finish_reason") or finish
        if text:
            first = first or time.perf_counter()
            yield _record(llm, start, text, None, t0, first)
    if hasattr(llm, "score_pending"):  # the final figures count every decode step
        llm.score_pending()
    last = _record(llm, start, "", finish or "stop", t0, first or time.perf_counter())
    if cap is not None and cap.hit:  # the cap stops after the n-th token was decoded: n generated, not n + 1
        last = replace(last, finish_reason="length", n_generated=cap.n)
    yield last


class _TokenCap:
    """Stop at `n` generated tokens exactly, as llama-cli's -n and llama-server's n_predict do:
    llama-cpp-python skips its max_tokens test while the text ends inside a UTF-8 character, so
    byte-level tokens could run past it. Called with the tokens so far (prompt + generated, not
    yet the one just sampled)."""

    def __init__(self, n: int):
        self.n, self.start, self.hit = n, None, False

    def __call__(self, ids: Any, logits: Any) -> bool:
        if self.start is None:
            self.start = len(ids)  # first call: the prompt
        self.hit = self.hit or len(ids) - self.start >= self.n
        return self.hit


def _record(llm: Any, start: Any, text: str, finish: str | None, t0: float, first: float) -> GenerationRecord:
    t = llm.telemetry()
    n = t.decode_tokens - start.decode_tokens + (1 if t.prefill_tokens > start.prefill_tokens else 0)
    secs = t.decode_seconds - start.decode_seconds
    rate = (t.decode_tokens - start.decode_tokens) / secs if secs > 0 else 0.0
    return GenerationRecord(text, t.prefill_tokens - start.prefill_tokens, n, finish, first - t0,
                            time.perf_counter() - t0, rate, t.rss_bytes, t.peak_rss_bytes, t.budget_bytes,
                            t.hit_rate, t.swaps)
