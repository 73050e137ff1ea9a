"""Sampling for the engine: llama.cpp's sampler chain in llama-server's order, log-probabilities,
and stop words held back while they may still be completing."""
from __future__ import annotations

from typing import Any

import llama_cpp
import numpy as np

from .engine_records import EngineError, Request


def sampler_chain(req: Request, vocab: Any, n_vocab: int, eog: Any) -> Any:
    """A new llama.cpp sampler chain for `req` (the caller frees it): grammar first, then logit bias,
    penalties, top-k, typical, top-p, min-p, temperature, dist, as llama-server orders them."""
    p = req.sampling
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = lambda smpl: llama_cpp.llama_sampler_chain_add(chain, smpl)  # noqa: E731
    if p.grammar:
        g = llama_cpp.llama_sampler_init_grammar(vocab, p.grammar.encode(), b"root")
        if not g:
            llama_cpp.llama_sampler_free(chain)
            raise EngineError("failed to parse grammar")
        add(g)
    bias = dict(p.logit_bias)
    if req.ignore_eos:
        bias.update({t: float("-inf") for t in eog})
    if bias:
        arr = (llama_cpp.llama_logit_bias * len(bias))(*[llama_cpp.llama_logit_bias(t, b) for t, b in bias.items()])
        add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(bias), arr))
    if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
        add(llama_cpp.llama_sampler_init_penalties(n_vocab, p.repeat_last_n, p.repeat_penalty, p.frequency_penalty,
                                                   p.presence_penalty))
    if p.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(p.top_k))
    if p.typical_p < 1.0:
        add(llama_cpp.llama_sampler_init_typical(p.typical_p, p.min_keep))
    if p.top_p < 1.0:
        add(llama_cpp.llama_sampler_init_top_p(p.top_p, p.min_keep))
    if p.min_p > 0.0:
        add(llama_cpp.llama_sampler_init_min_p(p.min_p, p.min_keep))
    add(llama_cpp.llama_sampler_init_temp_ext(p.temperature, 0.0, 1.0))
    add(llama_cpp.llama_sampler_init_dist(p.seed & 0xFFFFFFFF))
    return chain


def top_logprobs(logits: np.ndarray, tok: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """(log-probability of `tok`, the `n` most likely tokens with theirs, best first). logits: [n_vocab]"""
    logp = logits - logits.max()
    logp = logp - np.log(np.exp(logp).sum())
    k = min(n, len(logp))
    idx = np.argpartition(-logp, k - 1)[:k]
    idx = idx[np.argsort(-logp[idx])]
    return float(logp[tok]), [(int(i), float(logp[i])) for i in idx]


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` to hold back: the longest end that begins a stop word."""
    return max((_partial(text, w) for w in stops), default=0)


def _partial(text: str, word: str) -> int:
    for n in range(min(len(word) - 1, len(text)), 0, -1):
        if text.endswith(word[:n]):
            return n
    return 0
