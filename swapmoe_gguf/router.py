"""Router tap: llama.cpp's eval callback, observing each MoE layer's router input.

llama.cpp's router only sees the resident experts (S slots). The scheduler needs the scores of
ALL experts, so the callback asks for the `ffn_moe_logits-<il>` nodes, reads their input
(`src[1]`, the normalised hidden states [n_tokens, n_embd]) and multiplies it by the full router
in numpy. llama.cpp asks the callback about every graph node (`ask=true`); a small C filter
(`_evalfilter.c`, built at install) answers for the nodes we do not want, so Python runs only
for the router nodes. Without the filter the Python callback answers everything (slower).
Only the asked nodes split the graph.
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .ggml import GGMLTensor, ggml

log = logging.getLogger(__name__)
_NAME_OFF = GGMLTensor.name.offset
_PREFIX = b"ffn_moe_logits-"


class _Filter(ctypes.Structure):
    _fields_ = [("name_offset", ctypes.c_size_t), ("prefix", ctypes.c_char_p), ("prefix_len", ctypes.c_size_t),
                ("forward", ctypes.c_void_p), ("forward_ud", ctypes.c_void_p)]


def _filter_fn() -> int | None:
    """Address of the compiled C filter, or None when it was not built."""
    spec = importlib.util.find_spec("swapmoe_gguf._evalfilter")
    if spec is None or not spec.origin:
        log.warning("eval-callback filter not built; the router tap runs in Python for every graph node")
        return None
    return ctypes.cast(ctypes.CDLL(spec.origin).swapmoe_filter_eval, ctypes.c_void_p).value


@dataclass
class RouterBatch:
    """Router scores of all MoE layers for one decode call, rows stacked layer after layer."""

    layers: list[int]        # MoE layer of each block of rows, in graph order
    spans: list[slice]       # rows of each layer
    x_norm: np.ndarray       # [rows] ||x|| of the router input
    logits: np.ndarray       # [rows, n_expert] full router logits
    probs: np.ndarray        # [rows, n_expert] softmax over ALL experts

    def layer(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(x_norm [n_tok], probs [n_tok, n_expert]) of one layer."""
        sl = self.spans[self.layers.index(layer)]
        return self.x_norm[sl], self.probs[sl]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def hit_shares(probs: np.ndarray, resident_mask: np.ndarray, top_k: int) -> np.ndarray:
    """Per row: share of the full router's top-k probability mass on resident experts.
    `resident_mask` is [rows, n_expert] (or broadcastable) booleans."""
    top = np.argpartition(-probs, top_k - 1, axis=-1)[:, :top_k]      # [rows, k]
    mass = np.take_along_axis(probs, top, axis=-1)                     # [rows, k]
    hit = np.take_along_axis(np.broadcast_to(resident_mask, probs.shape), top, axis=-1)
    return (mass * hit).sum(-1) / np.maximum(mass.sum(-1), 1e-30)


class InGraphHook(Protocol):
    """Runs inside llama.cpp's graph, right after a layer's router node was computed and before
    its experts run (the `exact` policy). `kind` is "logits" or "probs"; `t` the node's tensor."""

    def __call__(self, kind: str, layer: int, t: int) -> None: ...


class RouterTap:
    def __init__(self, router: dict[int, np.ndarray], in_graph: InGraphHook | None = None, probs: bool = False):
        import llama_cpp

        self.router_t = {l: np.ascontiguousarray(w.T) for l, w in router.items()}  # [n_embd, n_expert]
        self.index = {l: i for i, l in enumerate(router)}
        self.wanted: dict[bytes, tuple[str, int]] = {f"ffn_moe_logits-{l}".encode(): ("logits", l) for l in router}
        if in_graph is not None or probs:
            self.wanted |= {f"ffn_moe_probs-{l}".encode(): ("probs", l) for l in router}
        self.in_graph = in_graph
        self.enabled = True  # off: nothing is asked for (the static/full policies need no scores)
        # Score layer i on decode steps where (step + i) % stride == 0; multi-token batches always.
        self.stride, self.step = 1, 0
        self.batch_tokens = 1  # tokens of the decode call in flight (set by the runtime)
        self._seen: list[tuple[int, np.ndarray]] = []   # (layer, x [n_tok, n_embd]) of the current decode
        self.error: BaseException | None = None
        prefix = b"ffn_moe_" if in_graph is not None or probs else _PREFIX
        # Keep every ctypes object alive as long as the context: llama.cpp holds raw pointers.
        self.py_callback = llama_cpp.ggml_backend_sched_eval_callback(self._cb)
        fn = _filter_fn()
        if fn is None:
            self.callback, self.user_data, self._filter = self.py_callback, None, None
        else:
            self._filter = _Filter(_NAME_OFF, prefix, len(prefix),
                                   ctypes.cast(self.py_callback, ctypes.c_void_p).value, None)
            self.callback = llama_cpp.ggml_backend_sched_eval_callback(fn)
            self.user_data = ctypes.addressof(self._filter)

    def _cb(self, t: int, ask: bool, _ud: int) -> bool:
        name = ctypes.string_at(t + _NAME_OFF)
        if ask:
            if not self.enabled or name not in self.wanted:
                return False
            if self.stride > 1 and self.in_graph is None:
                kind, layer = self.wanted[name]
                # by the batch, not the node: llama.cpp keeps only the output rows in the last layer
                if (self.step + self.index[layer]) % self.stride and self.batch_tokens == 1:
                    return False
            return True
        hit = self.wanted.get(name)
        if hit is None or self.error is not None:
            return True
        kind, layer = hit
        try:
            if kind == "logits":
                g = ggml()
                x = g.get_f32(g.tensor(t).src[1])  # [.., n_tokens, n_embd]
                self._seen.append((layer, x.reshape(-1, x.shape[-1])))
            if self.in_graph is not None:
                self.in_graph(kind, layer, t)
        except BaseException as e:  # never raise through C; the runtime re-raises after decode
            self.error = e
        return True

    def last_input(self) -> np.ndarray:
        """The router input [n_tok, n_embd] of the layer observed last (for in-graph hooks)."""
        return self._seen[-1][1]

    def take(self) -> RouterBatch | None:
        """Scores of everything observed since the last call (one numpy pass for all layers)."""
        self.step += 1
        if not self._seen:
            return None
        seen, self._seen = self._seen, []
        if all(x.shape[0] == 1 for _, x in seen):  # decode step: one token per scored layer
            layers = [l for l, _ in seen]
            xa = np.concatenate([x for _, x in seen])                                   # [L, n_embd]
            lg = np.concatenate([x @ self.router_t[l] for l, x in seen])                # [L, n_expert]
            return RouterBatch(layers, [slice(i, i + 1) for i in range(len(layers))],
                               np.sqrt(np.einsum("ij,ij->i", xa, xa)), lg, softmax(lg))
        # A prompt: layer by layer, never concatenating the inputs (a 512-token batch of a wide model
        # would copy tens of MB; the memory budget counts the inputs once, see budget.estimate).
        layers, spans, logits, norms, row = [], [], [], [], 0
        for layer, x in seen:
            layers.append(layer)
            spans.append(slice(row, row + x.shape[0]))
            row += x.shape[0]
            logits.append(x @ self.router_t[layer])   # [n_tok, n_expert]
            norms.append(np.sqrt(np.einsum("ij,ij->i", x, x)))
        del seen
        lg = np.concatenate(logits) if len(logits) > 1 else logits[0]
        return RouterBatch(layers, spans, np.concatenate(norms), lg, softmax(lg))
