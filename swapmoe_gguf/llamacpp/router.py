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
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .capture import PREFIX as _PREFIX
from .capture import Capture, Filter, filter_lib
from .ggml import GGMLTensor, ggml
from .routing import GatingSpec, GraphNode, Routed, route
from .scoring import Hits, ScoreKernel, ScoreSink

log = logging.getLogger(__name__)
_NAME_OFF = GGMLTensor.name.offset


@dataclass
class RoutedGroup:
    """Layers routed in one numpy pass: G layers of n tokens each (one layer, on the general path)."""

    layers: tuple[int, ...]   # [G] MoE layers, in the router's order
    rows: np.ndarray          # [G] each layer's row in that order (FullRouter.index)
    x_norm: np.ndarray        # [G, n] ||x|| of the router input
    routed: Routed            # layer-major rows: probs [G*n, n_expert], selected and weights [G*n, k]

    @property
    def n_tokens(self) -> int:
        return int(self.x_norm.shape[1])


@dataclass
class RouterBatch:
    """The full model's routing of every MoE layer scored in one decode call (a prompt), or in the
    decode steps gathered since the last flush. `scored` > 0: those steps were already added to the
    scheduler's sums (and the hits counted into `hits`) by the C kernel; `groups` is then empty."""

    groups: list[RoutedGroup]
    prompt: bool = False   # from one multi-token decode call (a prompt's prefill)
    scored: int = 0        # tokens per layer the C kernel scored in place (see `RouterTap.flush`)
    hits: Hits | None = None

    @property
    def n_tokens(self) -> int:
        """Tokens of the widest layer (the last layer of a prompt keeps only its output rows)."""
        return max((g.n_tokens for g in self.groups), default=self.scored)

    @property
    def layers(self) -> list[int]:
        return [l for g in self.groups for l in g.layers]

    @property
    def x_norm(self) -> list[np.ndarray]:
        """Per layer: [n_tok]."""
        return [row for g in self.groups for row in g.x_norm]

    @property
    def routed(self) -> list[Routed]:
        """Per layer: its tokens' routing (views into the group's arrays)."""
        out = []
        for g in self.groups:
            n, r = g.n_tokens, g.routed
            out += [Routed(r.probs[i * n:(i + 1) * n], r.selected[i * n:(i + 1) * n], r.weights[i * n:(i + 1) * n])
                    for i in range(len(g.layers))]
        return out


def _stacked(arrays: list[np.ndarray]) -> np.ndarray:
    """[n, ...]: the arrays' common base when they are its consecutive rows (vmodel keeps the routers
    so: no second copy), else a stacked copy."""
    base = arrays[0].base
    if isinstance(base, np.ndarray) and base.ndim == arrays[0].ndim + 1 and len(base) == len(arrays) \
            and all(a.base is base and a.ctypes.data == base[i].ctypes.data for i, a in enumerate(arrays)):
        return base
    return np.stack(arrays)


class FullRouter:
    """Every MoE layer's full router (all experts) and gating spec: routes tokens as the full model."""

    def __init__(self, weights: dict[int, np.ndarray], top_k: int, bias: dict[int, np.ndarray] | None = None,
                 selection_bias: dict[int, np.ndarray] | None = None):
        self.layers = sorted(weights)
        self.index = {l: i for i, l in enumerate(self.layers)}
        ws = [np.asarray(weights[l], dtype=np.float32) for l in self.layers]
        # [n_layer, n_embd, n_expert]: transposed views of the f32 routers (BLAS reads a transposed view
        # as is: no second copy); one array when every layer's router has the same shape
        self.stack_t = _stacked(ws).transpose(0, 2, 1) if len({w.shape for w in ws}) == 1 else None
        self.w_t = {l: (self.stack_t[i] if self.stack_t is not None else ws[i].T) for i, l in enumerate(self.layers)}
        self.bias = bias or {}                      # layer -> [n_expert] router bias (added to the logits)
        self.selection_bias = selection_bias or {}  # layer -> [n_expert] exp_probs_b (ranking only)
        # the same, one row per layer (zeros where a layer has none) for route_group; None: no layer has one
        self.bias_rows = self._rows(self.bias, ws)             # [n_layer, n_expert]
        self.selection_rows = self._rows(self.selection_bias, ws)  # [n_layer, n_expert]
        self.top_k = top_k
        self.specs: dict[int, GatingSpec] = {l: GatingSpec() for l in weights}  # until probed

    def _rows(self, per_layer: dict[int, np.ndarray], ws: list[np.ndarray]) -> np.ndarray | None:
        if not per_layer:
            return None
        out = np.zeros((len(self.layers), ws[0].shape[0]), dtype=np.float32)
        for l, v in per_layer.items():
            out[self.index[l]] = v
        return out

    def logits(self, layer: int, x: np.ndarray) -> np.ndarray:
        """[n_tok, n_expert] router logits of inputs x [n_tok, n_embd] (router bias included)."""
        lg = x @ self.w_t[layer]
        b = self.bias.get(layer)
        return lg + b if b is not None else lg

    def route(self, layer: int, x: np.ndarray) -> Routed:
        return route(self.logits(layer, x), self.specs[layer], self.top_k, self.selection_bias.get(layer))

    def route_group(self, layers: tuple[int, ...], x: np.ndarray) -> RoutedGroup:
        """Route G layers sharing a gating spec at once. x [G, n, n_embd]: one batched matmul over the
        layers' routers (one per layer when the group is not every layer), then the gating once over
        all G*n rows (each row's routing is what `route` gives it alone)."""
        g, n, _ = x.shape
        rows = np.array([self.index[l] for l in layers])
        if self.stack_t is not None and g == len(self.layers):  # every layer, in order: one batched matmul
            # (each router is read once for all n tokens; a matrix-matrix product rounds the last bits
            # differently from one token's matrix-vector product, ~1e-7 relative)
            lg = np.matmul(x, self.stack_t)                                                # [G, n, n_expert]
        else:  # a gather of the routers would copy them: one matmul per layer
            lg = np.empty((g, n, self.w_t[layers[0]].shape[1]), dtype=np.float32)
            for i, l in enumerate(layers):
                np.matmul(x[i], self.w_t[l], out=lg[i])
        if self.bias_rows is not None:
            lg = lg + self.bias_rows[rows][:, None, :]
        sel = None
        if self.selection_rows is not None:
            sel = np.repeat(self.selection_rows[rows], n, axis=0)                          # [G*n, n_expert]
        routed = route(lg.reshape(g * n, -1), self.specs[layers[0]], self.top_k, sel)
        x_norm = np.sqrt(np.einsum("gij,gij->gi", x, x))                                   # [G, n]
        return RoutedGroup(tuple(layers), rows, x_norm, routed)


class InGraphHook(Protocol):
    """Runs inside llama.cpp's graph, right after a layer's router node was computed and before
    its experts run (the `exact` policy). `kind` is "logits", "probs" or "logits_biased", or one
    the hook added with `RouterTap.want` ("weights", "out"); `t` the node's tensor."""

    def __call__(self, kind: str, layer: int, t: int) -> None: ...

    def wants(self, kind: str, layer: int) -> bool:
        """Whether this micro-batch needs an added node (asked as the graph reaches it)."""
        ...


class RouterTap:
    def __init__(self, router: FullRouter, in_graph: InGraphHook | None = None, probs: bool = False,
                 capture_tokens: int = 0, capture_steps: int = 1, redirect: bool = True):
        """Decode calls of up to `capture_tokens` tokens (one per parallel sequence; 0: none) have their
        router inputs gathered in C, `capture_steps` of them between flushes; longer calls (prompts)
        are read in Python. `redirect`: the graph writes them into the capture area itself (else the
        filter copies each once computed, splitting the graph there; see _evalfilter.c)."""
        import llama_cpp

        self.router = router
        self.index = router.index
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
        self._lib = filter_lib()
        if self._lib is None:
            self.callback, self.user_data, self._filter = self.py_callback, None, None
        else:
            self._filter = Filter(_NAME_OFF, self._prefix, len(self._prefix),
                                   ctypes.cast(self.py_callback, ctypes.c_void_p).value, None)
            self.callback = llama_cpp.ggml_backend_sched_eval_callback(
                ctypes.cast(self._lib.swapmoe_filter_eval, ctypes.c_void_p).value)
            self.user_data = ctypes.addressof(self._filter)
        # short decode calls: router inputs gathered in C (see capture.Capture)
        self._cap: Capture | None = None
        self.capture_tokens = capture_tokens
        if self._filter is not None and router.layers and capture_tokens > 0:
            n_embd = router.w_t[router.layers[0]].shape[0]
            self._cap = Capture(self._filter, router.layers, n_embd, capture_tokens, max(1, capture_steps),
                                 redirect=redirect)
        self._capturing = False
        self._kernel = None if self._cap is None else ScoreKernel.load(
            router.w_t[router.layers[0]].shape[1], router.top_k, router.bias_rows, router.selection_rows)
        self.capture_seconds = 0.0  # spent copying router inputs in C, summed
        self.captured_steps = 0  # decode calls whose router inputs were copied in C, summed
        self.kernel_flushes = 0  # flushes the C kernel scored in place
        self._spec_key: tuple | None = None
        self._spec: GatingSpec | None = None

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

    def will_capture(self, n_tokens: int) -> bool:
        """Whether a decode call of `n_tokens` has its router inputs copied in C: a decode step (not a
        prompt), with no in-graph hook and no probe running, and room left in the buffer."""
        cap = self._cap
        return (cap is not None and n_tokens <= self.capture_tokens and self.enabled and self.in_graph is None
                and self.probed is None
                and not self._filter.error  # type: ignore[union-attr]
                and cap.steps < cap.n_slots)

    @property
    def pending_steps(self) -> int:
        """Decode calls captured in C and not yet scored (`flush`)."""
        return self._cap.steps if self._cap is not None else 0

    @property
    def pending_aligned(self) -> bool:
        """Whether the pending steps each scored every layer on one token: token t of every row is
        step t (the hit counter can then apply each step's resident set)."""
        return self._cap is not None and self._cap.single and self._cap.want_all

    def begin(self, n_tokens: int) -> None:
        """Before a decode call of `n_tokens`: which layers to score, and whether the C filter captures
        their router inputs (see `will_capture`; the caller flushes first when it would not) or Python
        reads them."""
        self.batch_tokens = n_tokens
        cap = self._cap
        if cap is None:
            return
        self._capturing = self.will_capture(n_tokens)
        self._filter.capture = int(self._capturing)  # type: ignore[union-attr]
        if self._capturing:
            self.captured_steps += 1
            self._filter.slot = cap.steps  # type: ignore[union-attr]
            cap.steps += 1
            cap.single &= n_tokens == 1
            if self.stride > 1 and n_tokens == 1:  # staggered: layer i on steps where (step + i) % stride == 0
                np.equal((self.step + cap.rows) % self.stride, 0, out=cap.want.view(bool))
                cap.want_all = False
            elif not cap.want_all:
                cap.want[:] = cap.want_all = True

    def _uniform_spec(self) -> GatingSpec | None:
        """The gating spec every layer shares (None: they differ), cached per router and probe."""
        key = (id(self.router), id(self.router.specs), tuple(map(id, self.router.specs.values())))
        if self._spec_key != key:
            specs = set(self.router.specs.values())
            self._spec_key, self._spec = key, (next(iter(specs)) if len(specs) == 1 else None)
        return self._spec

    def end(self) -> None:
        """Right after the decode call, also one that failed: the tensors the filter redirected point back
        where llama.cpp's allocator put them (it may reuse the graph)."""
        f = self._filter
        if f is not None and f.n_moved:
            self._lib.swapmoe_filter_restore(ctypes.addressof(f))  # type: ignore[union-attr]

    def close(self) -> None:
        """Free the device capture areas (after the context that may still point at them)."""
        if self._cap is not None:
            self._cap.close()

    @property
    def redirected_inputs(self) -> int:
        """Router inputs the graph wrote into the capture area itself, summed (see _evalfilter.c)."""
        return int(self._filter.redirected) if self._filter is not None else 0

    def take(self) -> RouterBatch | None:
        """After a decode call: the full model's routing of what it observed, when it is to be scored
        now. A prompt (read in Python) at once; captured decode steps wait for `flush` (the scheduler
        acts every F tokens: scoring them then is the same sums, one numpy pass instead of one per
        step; the caller flushes before a step that `will_capture` no more). A prompt's inputs are
        never concatenated: a 512-token batch of a wide model would copy tens of MB; the memory budget
        counts the inputs once, see budget.estimate."""
        self.step += 1
        if self._capturing:  # kept for `flush`
            self._capturing = self._filter.capture = False  # type: ignore[union-attr]
            return None
        if not self._seen:
            return None
        seen, self._seen = self._seen, []
        if len(seen) > 1 and all(x.shape[0] == 1 and r is None for _, x, r in seen) \
                and len({self.router.specs[l] for l, _, _ in seen}) == 1:
            # one token in several layers sharing a gating spec: routed together
            return RouterBatch([self.router.route_group(tuple(l for l, _, _ in seen),
                                                        np.stack([x for _, x, _ in seen]))],
                               prompt=self.batch_tokens > 1)
        groups = []
        for layer, x, r in seen:
            r = r if r is not None else self.router.route(layer, x)
            norms = np.sqrt(np.einsum("ij,ij->i", x, x))[None, :]                       # [1, n_tok]
            groups.append(RoutedGroup((layer,), np.array([self.index[layer]]), norms, r))
        return RouterBatch(groups, prompt=self.batch_tokens > 1)

    def flush(self, sink: ScoreSink | None = None,
              masks: tuple[np.ndarray, np.ndarray] | None = None) -> RouterBatch | None:
        """Score the decode steps captured in C so far, by (gating spec, tokens): one group of every
        scored layer, unless layers were scored on different steps (`stride`) or a short prompt's last
        layer kept only its output rows. With a `sink` (the scheduler's arrays) and every layer in one
        group, the C kernel adds them to the sink in place instead (`RouterBatch.scored`), and counts
        the hits against `masks` ([n_masks, n_layer, N] resident sets, [n] the one each step ran with;
        None: not counted)."""
        cap, f = self._cap, self._filter
        if cap is None or cap.steps == 0:
            return None
        t0 = time.perf_counter()
        steps = cap.steps
        cap.read_devices(steps)
        self.capture_seconds += f.copy_ns * 1e-9 + time.perf_counter() - t0  # type: ignore[union-attr]
        f.copy_ns = 0  # type: ignore[union-attr]
        if f.missing_type:  # type: ignore[union-attr]  # a device met for the first time: its own area from now on
            cap.add_device(f.missing_type)  # type: ignore[union-attr]
            f.missing_type = None  # type: ignore[union-attr]
        if f.error == 1:  # type: ignore[union-attr]
            log.warning("router inputs of an unexpected type or shape: reading them in Python from now on")
            f.error = 2  # (said once; still non-zero: will_capture stays off)  # type: ignore[union-attr]
        aligned, cap.steps, cap.single = cap.single and cap.want_all, 0, True
        n_tok = cap.n_tok[:steps]                                                            # [steps, n_rows]
        layers, specs = self.router.layers, self.router.specs
        try:
            spec = self._uniform_spec()
            if aligned and spec is not None and n_tok.all():  # one token per step in every layer, one gating
                x = cap.buf[:steps, :, 0].transpose(1, 0, 2)                               # [L, steps, n_embd]
                if sink is not None and self._kernel is not None and self.router.stack_t is not None \
                        and sink.layers == layers:
                    lg = np.matmul(x, self.router.stack_t)                                   # [L, steps, N]
                    x_norm = np.sqrt(np.einsum("gij,gij->gi", x, x))                         # [L, steps]
                    hits = self._kernel.score(lg, x_norm, cap.rows, spec, sink, *(masks or (None, None)))
                    self.kernel_flushes += 1
                    return RouterBatch([], scored=steps, hits=hits)
                return RouterBatch([self.router.route_group(tuple(layers), np.ascontiguousarray(x))])
            if cap.single and spec is not None and masks is not None and len(masks[0]) == 1 and sink is not None \
                    and self._kernel is not None and self.router.stack_t is not None and sink.layers == layers:
                return self._score_staggered(n_tok.astype(bool), spec, sink, masks[0])
            per_row = n_tok.sum(0)                                                           # [n_rows]
            rows = np.flatnonzero(per_row)
            if rows.size == 0:
                return None
            key = [(specs[layers[r]], int(per_row[r])) for r in rows]
            groups = []
            for k in dict.fromkeys(key):
                sel = [r for r, kk in zip(rows, key) if kk == k]
                x = np.stack([np.concatenate([cap.buf[s, r, :n_tok[s, r]] for s in range(steps) if n_tok[s, r]])
                              for r in sel])                                                 # [G, n, n_embd]
                groups.append(self.router.route_group(tuple(layers[r] for r in sel), x))
            return RouterBatch(groups)
        finally:
            n_tok[:] = 0

    def _score_staggered(self, want: np.ndarray, spec: GatingSpec, sink: ScoreSink, mask: np.ndarray) -> RouterBatch:
        """Single-token steps scored layer by layer on different steps (a scoring stride): the layers
        with as many scored steps as each other in one kernel call, each on its own steps (the sums the
        numpy path makes per group). `want` [steps, n_rows]: which layer scored which step; `mask`
        [1, n_layer, N]: the resident set every step ran with (a commit flushes first when strided)."""
        cap, stack_t = self._cap, self.router.stack_t
        per_row = want.sum(0)                                                               # [n_rows]
        mass, count = 0.0, 0
        for n in np.unique(per_row[per_row > 0]).tolist():
            sel = np.flatnonzero(per_row == n)                                              # [G] capture rows
            steps = np.nonzero(want[:, sel].T)[1].reshape(len(sel), n)                      # [G, n] ascending
            x = cap.buf[steps, sel[:, None], 0]                                             # [G, n, n_embd]
            lg = np.empty((len(sel), n, stack_t.shape[2]), dtype=np.float32)               # [G, n, N]
            for i, r in enumerate(sel):  # (a gather of the routers would copy them)
                np.matmul(x[i], stack_t[r], out=lg[i])
            x_norm = np.sqrt(np.einsum("gij,gij->gi", x, x))                                # [G, n]
            hits = self._kernel.score(lg, x_norm, cap.rows[sel], spec, sink, mask,  # type: ignore[union-attr]
                                      np.zeros(n, dtype=np.int32))
            mass, count = mass + hits.mass, count + hits.count  # type: ignore[union-attr]
        self.kernel_flushes += 1
        return RouterBatch([], scored=int(per_row.max(initial=0)), hits=Hits(mass, count))
