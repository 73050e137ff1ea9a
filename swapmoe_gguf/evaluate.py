"""`swapmoe eval`: perplexity, and KL divergence / top-1 agreement against the `full` model.

Evaluated as served: each chunk of `ctx` tokens is one request; its first half is the prompt
(one prefill, which also triggers the scheduler's update), its second half is decoded one token
at a time with the true tokens fed back (so the scheduler acts between steps), and only the
second half is scored. KL follows llama-perplexity --kl-divergence: KL(P_full || P_policy) of the
next-token distributions, averaged over scored positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import llama_cpp
import numpy as np


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

    @property
    def label(self) -> str:
        return self.policy if self.max_dropped_mass >= 1.0 else f"{self.policy} (floor {self.max_dropped_mass:g})"


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def chunk_tokens(llm: Any, text: str, ctx: int, chunks: int | None) -> list[list[int]]:
    toks = llm.tokenize(text.encode(), add_bos=False)
    bos = llm.token_bos()
    out = [[bos] + toks[i:i + ctx - 1] for i in range(0, len(toks) - ctx, ctx - 1)]
    if not out:
        from .errors import SwapMoEError

        raise SwapMoEError(f"evaluation text has {len(toks)} tokens; need more than one chunk of {ctx}")
    if chunks:
        step = max(1, len(out) // chunks)
        out = out[::step][:chunks]
    return out


def score(llm: Any, chunks: list[list[int]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Log-probabilities of the second half of every chunk: (NLL per scored token, [n_scored, vocab] per chunk)."""
    n_vocab = llm.n_vocab()
    nll: list[float] = []
    logps: list[np.ndarray] = []
    for toks in chunks:
        half = len(toks) // 2
        llm.reset()
        llm.eval(toks[:half])
        rows = []
        for i in range(half, len(toks)):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
            lp = _log_softmax(logits.astype(np.float64))
            rows.append(lp.astype(np.float32))
            nll.append(-float(lp[toks[i]]))
            if i + 1 < len(toks):
                llm.eval([toks[i]])
        logps.append(np.stack(rows))
    return np.asarray(nll), logps


def evaluate(llm: Any, chunks: list[list[int]],
             reference: list[np.ndarray] | None = None) -> tuple[EvalResult, list[np.ndarray]]:
    """Score `chunks` with `llm`; against `reference` log-probabilities when given. Returns the
    result and this model's log-probabilities (the reference for others)."""
    before = llm.telemetry()
    nll, logps = score(llm, chunks)
    after = llm.telemetry()
    kl = agree = None
    if reference is not None:
        kls, agrees = [], []
        for ref, got in zip(reference, logps):
            p = np.exp(ref.astype(np.float64))
            kls.append((p * (ref.astype(np.float64) - got.astype(np.float64))).sum(-1))
            agrees.append(ref.argmax(-1) == got.argmax(-1))
        kl = float(np.mean(np.concatenate(kls)))
        agree = float(np.mean(np.concatenate(agrees)))
    dec = after.decode_seconds - before.decode_seconds
    return EvalResult(llm.policy_name, llm.vmodel.slots, llm.vmodel.n_expert, len(chunks), int(nll.size),
                      float(math.exp(nll.mean())), kl, agree,
                      (after.decode_tokens - before.decode_tokens) / dec if dec > 0 else 0.0,
                      after.hit_rate, after.swaps - before.swaps, after.peak_rss_bytes,
                      getattr(llm, "max_dropped_mass", 1.0)), logps


def run_eval(path: str, text: str, *, policies: list[str], experts_per_layer: int | None, memory_budget: str | None,
             ctx: int = 256, chunks: int | None = 16, threads: int = 2,
             floors: tuple[float, ...] = ()) -> list[EvalResult]:
    """`full` first (the reference), then each policy (swapmoe also with each quality floor), one model
    at a time."""
    cells: list[tuple] = []
    for p in policies:
        if p != "full":
            cells.append((p, experts_per_layer, memory_budget))
        if p == "swapmoe":
            cells += [(p, experts_per_layer, memory_budget, tau) for tau in floors if tau < 1.0]
    return run_eval_cells(path, text, cells, ctx=ctx, chunks=chunks, threads=threads)


def run_eval_cells(path: str, text: str, cells: list[tuple], *,
                   ctx: int = 256, chunks: int | None = 16, threads: int = 2) -> list[EvalResult]:
    """`full` (the reference), then each (policy, S, memory budget[, max dropped mass]) cell on the
    same tokens."""
    from .runtime import SwapMoELlama

    kw = dict(n_ctx=ctx + 8, n_batch=ctx, n_threads=threads, n_threads_batch=threads, verbose=False, seed=1)
    full = SwapMoELlama(path, policy="full", **kw)
    try:
        toks = chunk_tokens(full, text, ctx, chunks)
        ref_result, reference = evaluate(full, toks)
    finally:
        full.close()
        del full  # before the next model measures the process's baseline
    results = [replace(ref_result, kl=0.0, top1_agreement=1.0)]
    for policy, slots, budget, *floor in cells:
        llm = SwapMoELlama(path, policy=policy, experts_per_layer=slots, memory_budget=budget,
                           max_dropped_mass=floor[0] if floor else 1.0, **kw)
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
    return "\n".join(lines)
