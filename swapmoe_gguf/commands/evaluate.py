"""`swapmoe eval`: perplexity, and KL divergence / top-1 agreement against the `full` model.

Evaluated as served: each chunk of `ctx` tokens is one request; its first half is the prompt
(one prefill, which also triggers the scheduler's update), its second half is decoded one token
at a time with the true tokens fed back (so the scheduler acts between steps), and only the
second half is scored. KL follows llama-perplexity --kl-divergence: KL(P_full || P_policy) of the
next-token distributions, averaged over scored positions.

Several texts make a mixed request stream: each text is a domain, its chunks are interleaved
`switch_every` at a time (A A A B B B C C C ... A A A), and the scheduler keeps its state from one
request to the next, so it must follow the topic changes as a server's would; every figure is also
reported per domain.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import llama_cpp
import numpy as np

from ..serving.settings import SWITCH_EVERY


@dataclass(frozen=True)
class Chunk:
    domain: str
    tokens: list[int]   # BOS + ctx - 1 tokens of the domain's text


@dataclass(frozen=True)
class DomainScore:
    domain: str
    chunks: int
    ppl: float
    kl: float | None
    top1_agreement: float | None


@dataclass(frozen=True)
class EvalResult:
    policy: str
    experts_per_layer: int
    n_expert: int
    chunks: int
    scored_tokens: int
    ppl: float
    kl: float | None              # mean KL(full || this), nats
    top1_agreement: float | None  # share of positions whose argmax equals full's
    tok_s: float                  # decode speed during evaluation
    hit_rate: float | None
    swaps: int
    peak_rss_bytes: int
    max_dropped_mass: float = 1.0  # swapmoe's quality floor (1: none)
    domains: tuple[DomainScore, ...] = field(default=())  # per domain of a mixed stream (one: empty)
    decode_tokens: int = 0        # tokens decoded one at a time (the scored halves)
    decode_swaps: int = 0         # swaps committed in those steps (the floor's loads among them)

    @property
    def label(self) -> str:
        return self.policy if self.max_dropped_mass >= 1.0 else f"{self.policy} (floor {self.max_dropped_mass:g})"


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def chunk_tokens(llm: Any, text: str, ctx: int, chunks: int | None, name: str = "evaluation text") -> list[list[int]]:
    toks = llm.tokenize(text.encode(), add_bos=False)
    bos = llm.token_bos()
    out = [[bos] + toks[i:i + ctx - 1] for i in range(0, len(toks) - ctx, ctx - 1)]
    if not out:
        from ..base.errors import SwapMoEError

        raise SwapMoEError(f"{name} has {len(toks)} tokens; need more than one chunk of {ctx}")
    if chunks:
        step = max(1, len(out) // chunks)
        out = out[::step][:chunks]
    return out


def read_texts(paths: list[str]) -> dict[str, str]:
    """Evaluation texts by domain name (the file's stem; its path where two stems are equal)."""
    from pathlib import Path

    from ..base.errors import SwapMoEError

    stems = [Path(p).stem for p in paths]
    out = {}
    for p, stem in zip(paths, stems):
        try:
            out[stem if stems.count(stem) == 1 else str(p)] = Path(p).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise SwapMoEError(f"{p}: cannot read: {e.strerror or e}") from None
    return out


def stream_chunks(llm: Any, texts: Mapping[str, str], ctx: int, chunks: int | None,
                  switch_every: int = SWITCH_EVERY) -> list[Chunk]:
    """The request stream: `chunks` in all (split evenly between the domains), each domain's taken
    evenly through its text, interleaved `switch_every` at a time."""
    if switch_every < 1:
        raise ValueError(f"switch_every must be >= 1, got {switch_every}")
    per = None if not chunks else max(1, chunks // len(texts))
    queues = {name: chunk_tokens(llm, text, ctx, per, name if len(texts) > 1 else "evaluation text")
              for name, text in texts.items()}
    out: list[Chunk] = []
    while any(queues.values()):
        for name, q in queues.items():
            out += [Chunk(name, t) for t in q[:switch_every]]
            del q[:switch_every]
    return out


def last_logits(llm: Any) -> np.ndarray:
    """The logits of the last evaluated position, read in place. [n_vocab]"""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))


def greedy_decode_seconds(llm: Any, prompts: Iterable[str], n: int) -> float:
    """Seconds spent decoding `n` greedy tokens, one step at a time, after each prompt (each from an
    empty context; the prompts' evaluation not counted): the decode-speed loop of `demo` and bench/."""
    import time

    secs = 0.0
    for text in prompts:
        llm.reset()
        llm.eval(llm.tokenize(text.encode(), add_bos=True))
        t0 = time.perf_counter()
        for _ in range(n):
            llm.eval([int(np.argmax(last_logits(llm)))])
        secs += time.perf_counter() - t0
    return secs


def score(llm: Any, chunks: list[Chunk]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Log-probabilities of the second half of every chunk: per chunk, (NLL per scored token
    [n_scored], [n_scored, vocab])."""
    nlls: list[np.ndarray] = []
    logps: list[np.ndarray] = []
    for chunk in chunks:
        toks = chunk.tokens
        half = len(toks) // 2
        nll: list[float] = []
        llm.reset()
        llm.eval(toks[:half])
        rows = []
        for i in range(half, len(toks)):
            lp = _log_softmax(last_logits(llm).astype(np.float64))
            rows.append(lp.astype(np.float32))
            nll.append(-float(lp[toks[i]]))
            if i + 1 < len(toks):
                llm.eval([toks[i]])
        logps.append(np.stack(rows))
        nlls.append(np.asarray(nll))
    return nlls, logps


def _compare(reference: list[np.ndarray], logps: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per chunk: KL(full || this) [n_scored] and top-1 agreement [n_scored]."""
    kls, agrees = [], []
    for ref, got in zip(reference, logps):
        r = ref.astype(np.float64)
        kls.append((np.exp(r) * (r - got.astype(np.float64))).sum(-1))
        agrees.append(ref.argmax(-1) == got.argmax(-1))
    return kls, agrees


def evaluate(llm: Any, chunks: list[Chunk],
             reference: list[np.ndarray] | None = None) -> tuple[EvalResult, list[np.ndarray]]:
    """Score `chunks` with `llm`; against `reference` log-probabilities when given. Returns the
    result and this model's log-probabilities (the reference for others)."""
    pending = getattr(llm, "score_pending", lambda: None)  # (plain llama-cpp-python: nothing to score)
    pending()
    before = llm.telemetry()
    nlls, logps = score(llm, chunks)
    pending()
    after = llm.telemetry()
    kls, agrees = _compare(reference, logps) if reference is not None else (None, None)

    def mean(parts: list[np.ndarray] | None, idx: list[int]) -> float | None:
        return None if parts is None else float(np.mean(np.concatenate([parts[i] for i in idx])))

    every = list(range(len(chunks)))
    by_domain: dict[str, list[int]] = {}
    for i, c in enumerate(chunks):
        by_domain.setdefault(c.domain, []).append(i)
    per = tuple(DomainScore(d, len(idx), float(math.exp(mean(nlls, idx))), mean(kls, idx), mean(agrees, idx))
                for d, idx in by_domain.items()) if len(by_domain) > 1 else ()
    dec = after.decode_seconds - before.decode_seconds
    return EvalResult(llm.policy_name, llm.vmodel.slots, llm.vmodel.n_expert, len(chunks),
                      int(sum(n.size for n in nlls)), float(math.exp(mean(nlls, every))), mean(kls, every),
                      mean(agrees, every),
                      (after.decode_tokens - before.decode_tokens) / dec if dec > 0 else 0.0,
                      after.hit_rate, after.swaps - before.swaps, after.peak_rss_bytes,
                      getattr(llm, "max_dropped_mass", 1.0), per, after.decode_tokens - before.decode_tokens,
                      after.decode_swaps - before.decode_swaps), logps


def run_eval(path: str, text: str | Mapping[str, str], *, policies: list[str], experts_per_layer: int | None,
             memory_budget: str | None, ctx: int = 256, chunks: int | None = 16, threads: int = 2,
             floors: tuple[float, ...] = (), switch_every: int = SWITCH_EVERY,
             device: Mapping[str, Any] | None = None) -> list[EvalResult]:
    """`full` first (the reference), then each policy (swapmoe also with each quality floor), one model
    at a time. `device`: SwapMoELlama's placement arguments (n_gpu_layers, rpc_servers, ...), the
    same for every model, the reference included."""
    cells: list[tuple] = []
    for p in policies:
        if p != "full":
            cells.append((p, experts_per_layer, memory_budget))
        if p == "swapmoe":
            cells += [(p, experts_per_layer, memory_budget, tau) for tau in floors if tau < 1.0]
    return run_eval_cells(path, text, cells, ctx=ctx, chunks=chunks, threads=threads, switch_every=switch_every,
                          device=device)


def run_reference(path: str, text: str | Mapping[str, str], *, ctx: int, chunks: int | None, threads: int,
                  switch_every: int = SWITCH_EVERY, device: Mapping[str, Any] | None = None,
                  ) -> tuple[dict[str, Any], list[Chunk], EvalResult, list[np.ndarray]]:
    """`full` on the stream (one text, or a mixed stream of several: name -> text): the runtime arguments
    every cell is built with, the chunks, `full`'s result and its log-probabilities (the reference)."""
    from ..runtime import SwapMoELlama

    kw = dict(n_ctx=ctx + 8, n_batch=ctx, n_threads=threads, n_threads_batch=threads, verbose=False, seed=1,
              **(device or {}))
    full = SwapMoELlama(path, policy="full", **kw)
    try:
        texts = {"text": text} if isinstance(text, str) else dict(text)
        toks = stream_chunks(full, texts, ctx, chunks, switch_every)
        ref_result, reference = evaluate(full, toks)
    finally:
        full.close()
        del full  # before the next model measures the process's baseline
    return kw, toks, ref_result, reference


def run_eval_cells(path: str, text: str | Mapping[str, str], cells: list[tuple], *,
                   ctx: int = 256, chunks: int | None = 16, threads: int = 2,
                   switch_every: int = SWITCH_EVERY, device: Mapping[str, Any] | None = None) -> list[EvalResult]:
    """`full` (the reference), then each (policy, S, memory budget[, max dropped mass]) cell on the
    same tokens: one text, or a mixed stream of several (name -> text)."""
    from ..runtime import SwapMoELlama

    kw, toks, ref_result, reference = run_reference(path, text, ctx=ctx, chunks=chunks, threads=threads,
                                                    switch_every=switch_every, device=device)
    results = [replace(ref_result, kl=0.0, top1_agreement=1.0,
                       domains=tuple(replace(d, kl=0.0, top1_agreement=1.0) for d in ref_result.domains))]
    for policy, slots, budget, *floor in cells:
        llm = SwapMoELlama(path, policy=policy, experts_per_layer=slots, memory_budget=budget,
                           max_dropped_mass=floor[0] if floor else 1.0, scheduler="auto", **kw)
        try:
            results.append(evaluate(llm, toks, reference)[0])
        finally:
            llm.close()
            del llm
    return results


def render(results: list[EvalResult]) -> str:
    lines = ["| policy | experts/layer | perplexity | KL vs full | top-1 agreement | decode tok/s | hit rate | swaps |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.label} | {r.experts_per_layer}/{r.n_expert} | {r.ppl:.3f} | {r.kl:.4f} | "
                     f"{r.top1_agreement:.3f} | {r.tok_s:.0f} | "
                     + (f"{r.hit_rate:.3f}" if r.hit_rate is not None else "-") + f" | {r.swaps} |")
    if results and results[0].domains:
        names = [d.domain for d in results[0].domains]
        lines += ["", "per domain: perplexity / KL vs full", "",
                  "| policy | experts/layer | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for r in results:
            cells = [f"{d.ppl:.2f} / {d.kl:.4f}" for d in r.domains]
            lines.append(f"| {r.label} | {r.experts_per_layer}/{r.n_expert} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
