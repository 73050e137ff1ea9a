"""Router tap: llama.cpp's eval callback, observing each MoE layer's router input.

llama.cpp's router only sees the resident experts (S slots). The scheduler needs the scores of
ALL experts, so the callback asks for the `ffn_moe_logits-<il>` nodes, reads their input
(`src[1]`, the normalised hidden states [n_tokens, n_embd]) and routes it with the full router
in numpy (`FullRouter`: the model's own gating, see routing.py). Once per model the tap probes
llama.cpp's graph instead: it records every `ffn_moe_*` node (the gating spec) and every tensor the
graph reads (so that a tensor the file lacks is known to be unused). llama.cpp asks the callback
about every graph node (`ask=true`); a small C filter (`_evalfilter.c`, built at install)
answers for the nodes we do not want, so Python runs only for the router nodes. Without the
filter the Python callback answers everything (slower). Only the asked nodes split the graph.
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .ggml import GGMLTensor, ggml
from .routing import GatingSpec, GraphNode, Routed, route

log = logging.getLogger(__name__)
_NAME_OFF = GGMLTensor.name.offset
_PREFIX = b"ffn_moe_logits-"


class _Filter(ctypes.Structure):
    _fields_ = [("name_offset", ctypes.c_size_t), ("prefix", ctypes.c_char_p), ("prefix_len", ctypes.c_size_t),
                ("forward", ctypes.c_void_p), ("forward_ud", ctypes.c_void_p)]


def _filter_fn() -> int | None:
    """Address of the compiled C filter, or None when it was not built."""
    spec = importlib.util.find_spec("swapmoe_gguf.llamacpp._evalfilter")
    if spec is None or not spec.origin:
        log.warning("eval-callback filter not built; the router tap runs in Python for every graph node")
        return None
    return ctypes.cast(ctypes.CDLL(spec.origin).swapmoe_filter_eval, ctypes.c_void_p).value


@dataclass
class RouterBatch:
    """The full model's routing of every MoE layer scored in one decode call, in graph order."""

    layers: list[int]        # MoE layer of each entry
    x_norm: list[np.ndarray]  # per layer: [n_tok] ||x|| of the router input
    routed: list[Routed]     # per layer: selection and weights over ALL experts


class FullRouter:
    """Every MoE layer's full router (all experts) and gating spec: routes tokens as the full model."""

    def __init__(self, weights: dict[int, np.ndarray], top_k: int, bias: dict[int, np.ndarray] | None = None,
                 selection_bias: dict[int, np.ndarray] | None = None):
        # [n_embd, n_expert] views of the f32 routers (BLAS reads a transposed view as is: no second copy)
        self.w_t = {l: np.asarray(w, dtype=np.float32).T for l, w in weights.items()}
        self.bias = bias or {}                      # layer -> [n_expert] router bias (added to the logits)
        self.selection_bias = selection_bias or {}  # layer -> [n_expert] exp_probs_b (ranking only)
        self.top_k = top_k
        self.specs: dict[int, GatingSpec] = {l: GatingSpec() for l in weights}  # until probed

    def logits(self, layer: int, x: np.ndarray) -> np.ndarray:
        """[n_tok, n_expert] router logits of inputs x [n_tok, n_embd] (router bias included)."""
        lg = x @ self.w_t[layer]
        b = self.bias.get(layer)
        return lg + b if b is not None else lg

    def route(self, layer: int, x: np.ndarray) -> Routed:
        return route(self.logits(layer, x), self.specs[layer], self.top_k, self.selection_bias.get(layer))


class InGraphHook(Protocol):
    """Runs inside llama.cpp's graph, right after a layer's router node was computed and before
    its experts run (the `exact` policy). `kind` is "logits", "probs" or "logits_biased", or one
    the hook added with `RouterTap.want` ("weights", "out"); `t` the node's tensor."""

    def __call__(self, kind: str, layer: int, t: int) -> None: ...

    def wants(self, kind: str, layer: int) -> bool:
        """Whether this micro-batch needs an added node (asked as the graph reaches it)."""
        ...


class RouterTap:
    def __init__(self, router: FullRouter, in_graph: InGraphHook | None = None, probs: bool = False):
        import llama_cpp

        self.router = router
        self.index = {l: i for i, l in enumerate(router.w_t)}
        self.wanted: dict[bytes, tuple[str, int]] = {f"ffn_moe_logits-{l}".encode(): ("logits", l) for l in router.w_t}
        if in_graph is not None or probs:  # the nodes `exact` may rewrite
            for kind in ("probs", "logits_biased"):
                self.wanted |= {f"ffn_moe_{kind}-{l}".encode(): (kind, l) for l in router.w_t}
        self.in_graph = in_graph
        self.enabled = True  # off: nothing is asked for (the static/full policies need no scores)
        # Score layer i on decode steps where (step + i) % stride == 0; multi-token batches always.
        self.stride, self.step = 1, 0
        self.batch_tokens = 1  # tokens of the decode call in flight (set by the runtime)
        # (layer, x [n_tok, n_embd], its routing when an in-graph hook needed it already) of the current decode
        self._seen: list[tuple[int, np.ndarray, Routed | None]] = []
        self.error: BaseException | None = None
        self.probed: dict[int, dict[str, GraphNode]] | None = None  # set while probing the graph
        self.graph_inputs: set[str] = set()  # names of every tensor the probed graph reads
        self.nodes: dict[int, dict[str, GraphNode]] = {}  # per MoE layer: its probed ffn_moe_* nodes
        self._added: set[str] = set()  # kinds added by `want`: asked only when the hook wants them
        self._prefix = b"ffn_moe_" if in_graph is not None or probs else _PREFIX
        # Keep every ctypes object alive as long as the context: llama.cpp holds raw pointers.
        self.py_callback = llama_cpp.ggml_backend_sched_eval_callback(self._cb)
        fn = _filter_fn()
        if fn is None:
            self.callback, self.user_data, self._filter = self.py_callback, None, None
        else:
            self._filter = _Filter(_NAME_OFF, self._prefix, len(self._prefix),
                                   ctypes.cast(self.py_callback, ctypes.c_void_p).value, None)
            self.callback = llama_cpp.ggml_backend_sched_eval_callback(fn)
            self.user_data = ctypes.addressof(self._filter)

    # probing llama.cpp's routing graph ---------------------------------------------------------
    def start_probe(self) -> None:
        """Record the next graph (every node asked about, none split): the `ffn_moe_*` nodes, and the
        names of all tensors the graph reads (so that a weight the file lacks is known to be unused)."""
        self.probed, self.graph_inputs = {}, set()
        if self._filter is not None:
            self._filter.prefix, self._filter.prefix_len = b"", 0

    def finish_probe(self, n_group: int = 1, n_group_used: int = 1) -> None:
        """Set each layer's gating spec from the probed nodes; raises RoutingError if unknown."""
        probed, self.probed = self.probed or {}, None
        self.nodes = probed
        if self._filter is not None:
            self._filter.prefix, self._filter.prefix_len = self._prefix, len(self._prefix)
        for layer in self.router.w_t:
            self.router.specs[layer] = GatingSpec.from_nodes(probed.get(layer, {}), n_group=n_group,
                                                             n_group_used=n_group_used, where=f"layer {layer}: ")

    def want(self, kind: str, names: dict[int, str]) -> None:
        """Also hand the in-graph hook these nodes (layer -> node name without `-<il>`), when it `wants` them."""
        self._added.add(kind)
        self.wanted |= {f"{name}-{l}".encode(): (kind, l) for l, name in names.items()}

    def _record(self, t: int, name: bytes) -> None:
        """Probing: every input's name into `graph_inputs`; an `ffn_moe_*` node into `probed`."""
        g = ggml()
        src = [ctypes.string_at(p + _NAME_OFF).decode(errors="replace") for p in g.tensor(t).src if p]
        self.graph_inputs.update(src)
        base, _, il = name.decode(errors="replace").rpartition("-")
        if name.startswith(b"ffn_moe_") and il.isdigit():
            node = GraphNode(g.op_desc(t), tuple(s.rpartition("-")[0] for s in src), g.op_params_f32(t))
            self.probed.setdefault(int(il), {})[base] = node  # type: ignore[union-attr]

    def _cb(self, t: int, ask: bool, _ud: int) -> bool:
        name = ctypes.string_at(t + _NAME_OFF)
        if self.probed is not None:
            if ask:
                try:
                    self._record(t, name)
                except BaseException as e:  # never raise through C
                    self.error = e
            return not ask
        if ask:
            if not self.enabled or name not in self.wanted:
                return False
            if self._added:
                kind, layer = self.wanted[name]
                if kind in self._added:
                    return self.in_graph is not None and self.in_graph.wants(kind, layer)
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
                x = x.reshape(-1, x.shape[-1])
                # an in-graph hook routes now; take() reuses it instead of routing the layer again
                self._seen.append((layer, x, self.router.route(layer, x) if self.in_graph is not None else None))
            if self.in_graph is not None:
                self.in_graph(kind, layer, t)
        except BaseException as e:  # never raise through C; the runtime re-raises after decode
            self.error = e
        return True

    def last_input(self) -> np.ndarray:
        """The router input [n_tok, n_embd] of the layer observed last (for in-graph hooks)."""
        return self._seen[-1][1]

    def last_routed(self) -> Routed:
        """The full model's routing of that input (set while an in-graph hook is attached)."""
        routed = self._seen[-1][2]
        assert routed is not None, "last_routed() needs an in-graph hook"
        return routed

    def take(self) -> RouterBatch | None:
        """The full model's routing of everything observed since the last call, layer by layer
        (a prompt's inputs are never concatenated: a 512-token batch of a wide model would copy
        tens of MB; the memory budget counts the inputs once, see budget.estimate)."""
        self.step += 1
        if not self._seen:
            return None
        seen, self._seen = self._seen, []
        if len(seen) > 1 and all(x.shape[0] == 1 and r is None for _, x, r in seen) \
                and len({self.router.specs[l] for l, _, _ in seen}) == 1:
            return self._take_decode_step([(l, x) for l, x, _ in seen])
        layers, norms, routed = [], [], []
        for layer, x, r in seen:
            layers.append(layer)
            norms.append(np.sqrt(np.einsum("ij,ij->i", x, x)))   # [n_tok]
            routed.append(r if r is not None else self.router.route(layer, x))
        return RouterBatch(layers, norms, routed)

    def _take_decode_step(self, seen: list[tuple[int, np.ndarray]]) -> RouterBatch:
        """One token in several layers sharing a gating spec: route their rows together (one numpy pass
        instead of one per layer; the matmuls stay per layer, each with its router)."""
        r = self.router
        layers = [l for l, _ in seen]
        xa = np.concatenate([x for _, x in seen])                                       # [L, n_embd]
        lg = np.concatenate([r.logits(l, x) for l, x in seen])                          # [L, n_expert]
        bias = None
        if any(l in r.selection_bias for l in layers):
            bias = np.stack([r.selection_bias.get(l, np.zeros(lg.shape[1], np.float32)) for l in layers])
        both = route(lg, r.specs[layers[0]], r.top_k, bias)
        norms = np.sqrt(np.einsum("ij,ij->i", xa, xa))                                  # [L]
        return RouterBatch(layers, [norms[i:i + 1] for i in range(len(layers))],
                           [Routed(both.probs[i:i + 1], both.selected[i:i + 1], both.weights[i:i + 1])
                            for i in range(len(layers))])
