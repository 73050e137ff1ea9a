"""Experts computed outside llama.cpp's graph, with ggml's own CPU kernels (ctypes).

Why: llama.cpp runs a micro-batch's experts as one `mul_mat_id` over the S slots, so a lossless
prompt had to be cut into micro-batches of S // k tokens (their experts always fit) and every such
piece read its missing experts again: a 64-token prompt of a 128-expert model at half the experts
read each expert of a layer about three times. Here `exact` (and the quality floor) run a whole
micro-batch in one graph instead: the graph computes the resident experts, and each missing expert
is read ONCE per micro-batch and layer, computed here on just the tokens that chose it, and added
into the layer's `ffn_moe_out` (runtime hooks: policies.ExactPolicy).

The FFN must be one this module reproduces: gate/up/down expert matrices (or llama.cpp's merged
gate_up) with a gated activation (SwiGLU, GeGLU, ReGLU), no expert biases or scales, weights
applied after the down projection. `ffn_spec` reads that off llama.cpp's probed graph and says why not otherwise (the
runtime then falls back to S // k micro-batches). The kernels are ggml's `mul_mat` on the expert's
bytes as stored (no dequantisation): the activations are quantised to the weights' dot type as in
the graph, so results match llama.cpp's to float rounding.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import numpy as np

from ..fileformat.info import TensorEntry
from ..store.expert_store import StagedExpert
from .ggml import GGMLTensor, ggml, shared_lib
from .routing import GraphNode

# the gated activations llama.cpp's build_moe_ffn names, and ggml's op for each
ACTIVATIONS = {"ffn_moe_swiglu": "ggml_swiglu_split", "ffn_moe_geglu": "ggml_geglu_split",
               "ffn_moe_reglu": "ggml_reglu_split"}
# nodes that mean the FFN does something this module does not (biases, scales, clamps, expert groups)
_UNSUPPORTED = ("ffn_moe_gate_up_biased", "ffn_moe_up_biased", "ffn_moe_gate_biased", "ffn_moe_down_biased",
                "ffn_moe_up_scaled", "ffn_moe_gate_scaled", "ffn_moe_down_scaled", "ffn_moe_swiglu_limited",
                "ffn_moe_up_clamped", "ffn_moe_group_topk")
# the node holding a layer's final expert weights: the last of these the graph has
WEIGHT_NODES = ("ffn_moe_weights_scaled", "ffn_moe_weights_norm", "ffn_moe_weights_softmax", "ffn_moe_weights")
_GGML_TYPE_F32 = 0


@dataclass(frozen=True)
class ExpertFFN:
    """How one layer's experts compute: their tensors and the activation."""

    gate: TensorEntry   # [n_expert, n_ff, n_embd], or gate_up [n_expert, 2 n_ff, n_embd] (merged: gate rows first)
    up: TensorEntry | None  # [n_expert, n_ff, n_embd]; None when merged into `gate`
    down: TensorEntry   # [n_expert, n_embd, n_ff]
    act: str            # key of ACTIVATIONS

    @property
    def n_embd(self) -> int:
        return self.gate.shape[-1]

    @property
    def n_ff(self) -> int:
        return self.down.shape[-1]


def ffn_spec(nodes: dict[str, GraphNode], tensors: list[TensorEntry]) -> ExpertFFN | str:
    """The layer's expert FFN from its probed `ffn_moe_*` nodes (input names without their `-<il>`,
    see router.RouterTap) and its expert tensors, or the reason it cannot be computed here."""
    odd = [n for n in _UNSUPPORTED if n in nodes]
    if odd:
        return f"the graph has {', '.join(odd)}"
    acts = [a for a in ACTIVATIONS if a in nodes]
    if len(acts) != 1:
        return "no gated SwiGLU/GeGLU/ReGLU activation node" if not acts else f"several activations {acts}"
    merged = "ffn_moe_gate_up" in nodes
    ins = [nodes.get(n) for n in (("ffn_moe_gate_up",) if merged else ("ffn_moe_gate", "ffn_moe_up"))]
    down, logits, weighted = nodes.get("ffn_moe_down"), nodes.get("ffn_moe_logits"), nodes.get("ffn_moe_weighted")
    if not (all(ins) and down and logits and weighted) or len(logits.src) < 2:
        return "the expert nodes are not the gate/up/down matrices of build_moe_ffn"
    if any(len(n.src) < 2 or not n.src[1] or n.src[1] != logits.src[1] for n in ins):  # type: ignore[union-attr]
        return "the experts read another input than the router (weights applied before the FFN?)"
    if not weighted.src or weighted.src[0] != "ffn_moe_down":
        return "the expert weights are not applied to the down projection's output"
    kinds = {t.name.split(".")[-2]: t for t in tensors if t.name.endswith(".weight")}
    # llama.cpp may merge a file's separate gate and up into one gate_up matrix (gate rows first): same math
    layouts = ({"ffn_gate_up_exps", "ffn_down_exps"}, {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"})
    if len(tensors) != len(kinds) or set(kinds) not in layouts:
        return f"expert tensors {sorted(t.name for t in tensors)} are not gate/up/down weights"
    d = kinds["ffn_down_exps"]
    merged = "ffn_gate_up_exps" in kinds
    g, u = (kinds["ffn_gate_up_exps"], None) if merged else (kinds["ffn_gate_exps"], kinds["ffn_up_exps"])
    rows = 2 * d.shape[-1] if merged else d.shape[-1]
    if g.shape[-2:] != (rows, d.shape[-2]) or (u is not None and u.shape != g.shape):
        return f"expert shapes {[t.shape for t in tensors]} do not chain"
    return ExpertFFN(g, u, d, acts[0])


class _Lib:
    """The ggml graph functions this module calls (bound once per process)."""

    def __init__(self) -> None:
        g = ggml()
        base = g.lib
        cpu = shared_lib(g.libdir, "libggml-cpu")
        p, sz, i64, i32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_int
        sig = {
            (base, "ggml_new_tensor_2d"): (p, [p, i32, i64, i64]),
            (base, "ggml_mul_mat"): (p, [p, p, p]),
            (base, "ggml_new_graph"): (p, [p]),
            (base, "ggml_build_forward_expand"): (None, [p, p]),
            (base, "ggml_tensor_overhead"): (sz, []),
            (base, "ggml_graph_overhead"): (sz, []),
            (cpu, "ggml_graph_compute_with_ctx"): (i32, [p, p, i32]),
            **{(base, f): (p, [p, p, p]) for f in ACTIVATIONS.values()},
        }
        for (lib, name), (res, args) in sig.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
            setattr(self, name, fn)
        self.ggml = g


@functools.lru_cache(maxsize=1)
def _lib() -> _Lib:
    return _Lib()


def run_expert(ffn: ExpertFFN, staged: StagedExpert, x: np.ndarray, n_threads: int = 1) -> np.ndarray:
    """One expert's output for inputs x [n, n_embd] (f32): down(act(gate x, up x)). [n, n_embd]"""
    lib = _lib()
    g = lib.ggml
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_embd, n_ff = ffn.n_embd, ffn.n_ff
    if x.ndim != 2 or x.shape[1] != n_embd:
        raise ValueError(f"expert input is {x.shape}, expected [n, {n_embd}]")
    n = x.shape[0]
    # the weights: headers only, their data the staged bytes (no copy)
    wctx = g.lib.ggml_init(g.init_params(4 * lib.ggml_tensor_overhead(), no_alloc=True))
    # the rest: x, gate/up/act [n, n_ff], out [n, n_embd], the graph and the work buffer (activations
    # converted to the weights' dot type: about 1.1 bytes per value at most), with slack
    mem = (16 * lib.ggml_tensor_overhead() + lib.ggml_graph_overhead()
           + 4 * n * (2 * n_embd + 3 * n_ff) + 2 * n * max(n_embd, n_ff) + (1 << 20))
    ctx = g.lib.ggml_init(g.init_params(mem, no_alloc=False))
    try:
        if not wctx or not ctx:
            raise MemoryError(f"ggml_init of {mem} bytes failed")
        mats = []  # (entry, its bytes, rows): gate, up, down
        for t in (ffn.gate, ffn.up, ffn.down):
            if t is None:
                continue
            part = staged.parts[t.name]
            if part.nbytes != t.expert_nbytes:
                raise ValueError(f"{t.name}: staged {part.nbytes} bytes, expected {t.expert_nbytes}")
            if t is ffn.gate and ffn.up is None:  # merged gate_up: its first n_ff rows are the gate
                half = part.nbytes // 2
                mats += [(t, part[:half], n_ff), (t, part[half:], n_ff)]
            else:
                mats.append((t, part, t.shape[-2]))
        w = []
        for t, part, rows in mats:
            h = lib.ggml_new_tensor_2d(wctx, int(t.qtype), t.shape[-1], rows)
            GGMLTensor.from_address(h).data = part.ctypes.data
            w.append(h)
        xt = lib.ggml_new_tensor_2d(ctx, _GGML_TYPE_F32, n_embd, n)                    # [n, n_embd]
        ctypes.memmove(GGMLTensor.from_address(xt).data, x.ctypes.data, x.nbytes)
        gate = lib.ggml_mul_mat(ctx, w[0], xt)                                          # [n, n_ff]
        up = lib.ggml_mul_mat(ctx, w[1], xt)                                            # [n, n_ff]
        act = getattr(lib, ACTIVATIONS[ffn.act])(ctx, gate, up)                         # [n, n_ff]
        out = lib.ggml_mul_mat(ctx, w[2], act)                                          # [n, n_embd]
        graph = lib.ggml_new_graph(ctx)
        lib.ggml_build_forward_expand(graph, out)
        status = lib.ggml_graph_compute_with_ctx(ctx, graph, max(1, n_threads))
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute failed (status {status})")
        res = np.empty((n, n_embd), dtype=np.float32)
        ctypes.memmove(res.ctypes.data, GGMLTensor.from_address(out).data, res.nbytes)
        return res
    finally:
        if ctx:
            g.lib.ggml_free(ctx)
        if wctx:
            g.lib.ggml_free(wctx)
