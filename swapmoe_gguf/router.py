"""Router tap: llama.cpp's eval callback, observing each MoE layer's router input.

llama.cpp's router only sees the resident experts (S slots). The scheduler needs the scores of
ALL experts, so the callback asks for the `ffn_moe_logits-<il>` nodes, reads their input
(`src[1]`, the normalised hidden states [n_tokens, n_embd]) and multiplies it by the full router
in numpy. The callback is asked about every graph node (`ask=true`), so that check is a raw
byte comparison of the name; only the asked nodes split the graph.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .ggml import GGMLTensor, ggml

_NAME_OFF = GGMLTensor.name.offset


@dataclass
class RouterObservation:
    """One MoE layer of one decode call."""

    layer: int
    x_norm: np.ndarray   # [n_tokens] ||x|| of the router input
    logits: np.ndarray   # [n_tokens, n_expert] full router logits
    probs: np.ndarray    # [n_tokens, n_expert] softmax over ALL experts


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def hit_shares(probs: np.ndarray, resident: list[int], top_k: int) -> np.ndarray:
    """Per token: share of the full router's top-k probability mass on resident experts."""
    top = np.argpartition(-probs, top_k - 1, axis=-1)[:, :top_k]   # [n_tokens, k]
    mass = np.take_along_axis(probs, top, axis=-1)                  # [n_tokens, k]
    hit = np.isin(top, np.asarray(resident))
    return (mass * hit).sum(-1) / np.maximum(mass.sum(-1), 1e-30)


class RouterTap:
    def __init__(self, router: dict[int, np.ndarray], on_layer: Callable[[RouterObservation], None]):
        import llama_cpp

        self.router_t = {l: np.ascontiguousarray(w.T) for l, w in router.items()}  # [n_embd, n_expert]
        self.wanted = {f"ffn_moe_logits-{l}".encode(): l for l in router}
        self.prefix = b"ffn_moe_logits-"
        self.on_layer = on_layer
        self.error: BaseException | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._cb)  # keep alive with the context

    def _cb(self, t: int, ask: bool, _ud: int) -> bool:
        name = ctypes.string_at(t + _NAME_OFF)
        if ask:
            return name in self.wanted
        layer = self.wanted.get(name)
        if layer is None:
            return True
        try:
            g = ggml()
            x = g.get_f32(g.tensor(t).src[1])  # [n_tokens, n_embd]
            x = x.reshape(-1, x.shape[-1])
            logits = x @ self.router_t[layer]   # [n_tokens, n_expert]
            self.on_layer(RouterObservation(layer, np.linalg.norm(x, axis=-1), logits, softmax(logits)))
        except BaseException as e:  # never raise through C; the runtime re-raises after decode
            self.error = e
        return True
