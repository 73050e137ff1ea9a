"""Expert routing as llama.cpp's `build_moe_ffn` computes it, over ALL experts of a layer, in numpy.

The Virtual Experts model only holds S experts per layer, so llama.cpp's graph routes among those.
The scheduler (importance, Eq. 1), the hit rate and the lossless `exact` policy need what the FULL
model would do: which experts it selects for a token and with which weights. Models differ in how
(softmax or sigmoid gates, a selection bias `exp_probs_b` that picks but does not weigh, a router
bias, softmax over the selected experts, weight normalisation and scaling, expert groups), and
llama.cpp hard-codes several of these per architecture in its graph builders. So the spec is read
off llama.cpp's own graph: the names, ops and parameters of a layer's `ffn_moe_*` nodes
(`GatingSpec.from_nodes`), probed once per model; only the group counts come from GGUF metadata
(llama.cpp applies groups whenever `expert_group_count > 1`).

Selection mirrors the graph step by step (f32 throughout): gate -> (+ selection bias) -> (group
mask: per group the sum of its top-2 scores, keep the best `n_group_used` groups) -> top-k ->
weights = gate values of the selected -> (softmax over them) -> (normalise) -> (scale).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..base.errors import SwapMoEError

GATING_FUNCS = ("softmax", "sigmoid", "softmax_weight", "sqrt_softplus")
# llama.cpp's clamp of the weight sum before normalising (the smallest normal f16)
_NORM_EPS = 6.103515625e-5


class RoutingError(SwapMoEError):
    """llama.cpp's graph routes a layer in a way this module does not reproduce."""


@dataclass(frozen=True)
class GraphNode:
    """One node of llama.cpp's graph as the eval callback sees it (names without the `-<il>` suffix)."""

    op: str                           # ggml_op_desc: "SOFT_MAX", "SIGMOID", "ADD", "MUL_MAT", ...
    src: tuple[str, ...] = ()         # names of the node's inputs
    params: tuple[float, ...] = ()    # op_params read as f32 (ggml_scale: the factor first)


@dataclass(frozen=True)
class GatingSpec:
    """How one MoE layer turns router logits into selected experts and weights."""

    func: str = "softmax"            # the gate: one of GATING_FUNCS
    select: str = "probs"            # what top-k ranks: "probs" (gate values), "logits" (Llama 4),
                                     # "sigmoid_logits" (GroveMoE)
    selection_bias: bool = False     # exp_probs_b added to the ranking score only (DeepSeek-V3 style)
    norm_w: bool = False             # weights divided by their sum
    scale: float = 1.0               # weights multiplied by this
    n_group: int = 1                 # expert groups (DeepSeek-V3): keep the best n_group_used
    n_group_used: int = 1

    def __post_init__(self) -> None:
        if self.func not in GATING_FUNCS:
            raise RoutingError(f"unknown gating function {self.func!r}; expected one of {', '.join(GATING_FUNCS)}")
        if self.select not in ("probs", "logits", "sigmoid_logits"):
            raise RoutingError(f"unknown selection source {self.select!r}")
        if self.n_group > 1 and not 0 < self.n_group_used <= self.n_group:
            raise RoutingError(f"{self.n_group} expert groups with {self.n_group_used} used")

    @classmethod
    def from_nodes(cls, nodes: dict[str, GraphNode], *, n_group: int = 1, n_group_used: int = 1,
                   where: str = "") -> "GatingSpec":
        """The spec of one layer from its `ffn_moe_*` nodes (see module docstring)."""
        probs = nodes.get("ffn_moe_probs")
        argsort = nodes.get("ffn_moe_argsort")
        if probs is None or argsort is None:
            raise RoutingError(f"{where}llama.cpp's graph has no ffn_moe_probs/ffn_moe_argsort node "
                               f"(found: {', '.join(sorted(nodes)) or 'none'})")
        if "ffn_moe_weights_softmax" in nodes:
            func = "softmax_weight"
        else:
            func = {"SOFT_MAX": "softmax", "SIGMOID": "sigmoid", "SQRT": "sqrt_softplus"}.get(probs.op, "")
            if not func:
                raise RoutingError(f"{where}unknown gating: llama.cpp's ffn_moe_probs node is {probs.op}")
        # what the expert ranking reads (a group mask sits between, when groups are on)
        src = argsort.src[0] if argsort.src else ""
        biased = nodes.get("ffn_moe_probs_biased")
        if src == "ffn_moe_probs_masked":
            src = "ffn_moe_probs_biased" if biased is not None else "ffn_moe_probs"
        select, selection_bias = "probs", False
        if src.startswith("ffn_moe_logits"):
            select = "logits"
        elif src == "ffn_moe_probs_biased" and biased is not None:
            if biased.op == "ADD":
                selection_bias = True
            elif biased.op == "SIGMOID":
                select = "sigmoid_logits"
            else:
                raise RoutingError(f"{where}unknown selection: ffn_moe_probs_biased is {biased.op}")
        elif src != "ffn_moe_probs":
            raise RoutingError(f"{where}unknown selection: llama.cpp ranks experts by {src or 'an unnamed node'}")
        scaled = nodes.get("ffn_moe_weights_scaled")
        scale = float(scaled.params[0]) if scaled is not None and scaled.params else 1.0
        groups = "ffn_moe_group_topk" in nodes
        return cls(func=func, select=select, selection_bias=selection_bias, norm_w="ffn_moe_weights_norm" in nodes,
                   scale=scale, n_group=n_group if groups or n_group > 1 else 1,
                   n_group_used=n_group_used if groups or n_group > 1 else 1)


@dataclass
class Routed:
    """The full model's routing of n_tok tokens in one layer."""

    probs: np.ndarray       # [n_tok, n_expert] gate values (llama.cpp's ffn_moe_probs over all experts)
    selected: np.ndarray    # [n_tok, k] expert ids, best first
    weights: np.ndarray     # [n_tok, k] weight each selected expert's output gets


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def gate(logits: np.ndarray, func: str) -> np.ndarray:
    """llama.cpp's ffn_moe_probs from ffn_moe_logits (router bias already added)."""
    if func == "softmax":
        return _softmax(logits)
    if func == "sigmoid":
        return _sigmoid(logits)
    if func == "sqrt_softplus":
        return np.sqrt(np.logaddexp(np.float32(0), logits))
    return logits  # softmax_weight: the softmax comes after selection


def route(logits: np.ndarray, spec: GatingSpec, k: int, selection_bias: np.ndarray | None = None) -> Routed:
    """Select and weigh experts for every row of `logits` [n_tok, n_expert] as the full model does."""
    logits = np.asarray(logits, dtype=np.float32)
    n_tok, n_expert = logits.shape
    probs = gate(logits, spec.func)                                                 # [n_tok, n_expert]
    sel = {"probs": probs, "logits": logits}.get(spec.select)
    if sel is None:
        sel = _sigmoid(logits)
    if spec.selection_bias and selection_bias is not None:  # [n_expert], or [n_tok, n_expert] row by row
        sel = sel + np.asarray(selection_bias, dtype=np.float32).reshape(-1, n_expert)
    if spec.n_group > 1:
        per = n_expert // spec.n_group
        g = sel.reshape(n_tok, spec.n_group, per)                                   # [n_tok, n_group, per]
        group_score = np.sort(g, axis=-1)[..., -min(2, per):].sum(-1)               # [n_tok, n_group]
        keep = np.argsort(-group_score, axis=-1, kind="stable")[:, : spec.n_group_used]
        mask = np.zeros((n_tok, spec.n_group), dtype=bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        sel = np.where(mask[..., None], g, -np.inf).reshape(n_tok, n_expert)
    selected = np.argsort(-sel, axis=-1, kind="stable")[:, :k]                      # [n_tok, k]
    w = np.take_along_axis(probs, selected, axis=-1)                                # [n_tok, k]
    if spec.func == "softmax_weight":
        w = _softmax(w)
    if spec.norm_w:
        w = w / np.maximum(w.sum(-1, keepdims=True), np.float32(_NORM_EPS))
    if spec.scale not in (0.0, 1.0):
        w = w * np.float32(spec.scale)
    return Routed(probs, selected, w)


def hit_shares(routed: Routed, resident_mask: np.ndarray) -> np.ndarray:
    """Per row: share of the full model's expert weight that falls on resident experts.
    `resident_mask` is [n_tok, n_expert] or [n_expert] booleans."""
    m = np.broadcast_to(resident_mask, routed.probs.shape)
    hit = np.take_along_axis(m, routed.selected, axis=-1)                           # [n_tok, k]
    w = np.abs(routed.weights)
    return (w * hit).sum(-1) / np.maximum(w.sum(-1), 1e-30)


def slot_mask_values(routed: Routed, slot_experts: list[int], values: np.ndarray) -> np.ndarray:
    """`values` [n_tok, S] of a node the graph ranks experts by, with every slot whose expert the full
    model does not select for that token set to -inf (so the slot model selects exactly the full
    model's experts, groups and biases included). A token some of whose experts are not resident
    (more experts needed in a micro-batch than slots, a failed read) keeps every slot: it routes among
    the residents rather than selecting a -inf slot."""
    chosen = np.zeros((routed.selected.shape[0], routed.probs.shape[1]), dtype=bool)
    np.put_along_axis(chosen, routed.selected, True, axis=-1)
    keep = chosen[:, slot_experts]                                                  # [n_tok, S]
    complete = keep.sum(-1) == routed.selected.shape[1]                             # [n_tok]
    return np.where(keep | ~complete[:, None], values, -np.inf).astype(np.float32)
