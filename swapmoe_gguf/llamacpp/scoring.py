"""Captured decode steps scored in one C call: full-model routing, Eq. 1 and hits (`_score.c`).

The router tap gathers each MoE layer's router input over F decode steps (`_evalfilter.c`). Scoring
them in numpy is about twenty array operations per flush (route, gate, top-k, Eq. 1's scatter-add,
the hit shares), each costing microseconds of dispatch on arrays of a few hundred numbers; on a
small model that was a tenth of every step. Here numpy's BLAS computes the routers' logits (one
batched matmul, exactly as `FullRouter.route_group` does) and one C call does the rest: the same
gating spec, the Eq. 1 sums into the scheduler's own score array (with the scheduler's own decay
powers), and the hit shares against the resident set each token ran with.

What it writes is what the numpy path computes: the same selections; Eq. 1's f64 sums in the same
order; softmax's f32 sum and exp round their last bit differently (scores agree to ~1e-7 relative;
tests/test_scoring.py). Decisions (which experts to swap) stay in Python (`ImportanceScheduler`).
"""
from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .routing import GATING_FUNCS, GatingSpec

_SELECT = ("probs", "logits", "sigmoid_logits")
_MAX_K = 64  # _score.c's stack arrays (per token: selected experts and weights)


class _Args(ctypes.Structure):
    """`struct swapmoe_score_args` of _score.c."""

    _fields_ = [("n_group_layers", ctypes.c_int32), ("n_tok", ctypes.c_int32), ("n_expert", ctypes.c_int32),
                ("k", ctypes.c_int32), ("logits", ctypes.c_void_p), ("x_norm", ctypes.c_void_p),
                ("rows", ctypes.c_void_p), ("n_rows", ctypes.c_int64), ("bias", ctypes.c_void_p),
                ("sel_bias", ctypes.c_void_p), ("func", ctypes.c_int32), ("select", ctypes.c_int32),
                ("use_sel_bias", ctypes.c_int32), ("norm_w", ctypes.c_int32), ("scale", ctypes.c_float),
                ("n_group", ctypes.c_int32), ("n_group_used", ctypes.c_int32), ("scores", ctypes.c_void_p),
                ("norms", ctypes.c_void_p), ("decay_tok", ctypes.c_void_p), ("decay_all", ctypes.c_double),
                ("masks", ctypes.c_void_p), ("mask_of_token", ctypes.c_void_p), ("hit_mass", ctypes.c_double),
                ("hit_count", ctypes.c_int64), ("error", ctypes.c_int32)]


@dataclass
class ScoreSink:
    """Where the kernel adds Eq. 1: the scheduler's arrays, one row per MoE layer in `layers` order."""

    layers: list[int]
    scores: np.ndarray                       # [n_layer, n_expert] f64, updated in place
    norms: np.ndarray                        # [n_layer, n_expert] f64 ||E_i||
    decay_weights: Callable[[int], tuple[np.ndarray, float]]  # n -> (decay^(n-1-t) [n], decay^n)


@dataclass
class Hits:
    """The full model's weight on resident experts, summed over scored (layer, token) pairs."""

    mass: float
    count: int


def _kernel() -> Callable | None:
    spec = importlib.util.find_spec("swapmoe_gguf.llamacpp._evalfilter")  # (one library, both C files)
    if spec is None or not spec.origin:
        return None
    fn = getattr(ctypes.CDLL(spec.origin), "swapmoe_score", None)
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.POINTER(_Args)], None
    return fn


class ScoreKernel:
    """The C scorer for one model's routers (bias and selection-bias rows as `FullRouter` keeps them)."""

    def __init__(self, fn: Callable, n_expert: int, top_k: int, bias_rows: np.ndarray | None,
                 selection_rows: np.ndarray | None):
        self._fn = fn
        self._a = _Args(n_expert=n_expert, k=top_k)
        # keep every array the C code reads alive as long as the kernel
        self._bias = None if bias_rows is None else np.ascontiguousarray(bias_rows, dtype=np.float32)
        self._sel = None if selection_rows is None else np.ascontiguousarray(selection_rows, dtype=np.float32)
        self._a.bias = None if self._bias is None else self._bias.ctypes.data
        self._a.sel_bias = None if self._sel is None else self._sel.ctypes.data
        self._no_masks = np.zeros(0, dtype=np.int32)
        self._spec: GatingSpec | None = None

    @classmethod
    def load(cls, n_expert: int, top_k: int, bias_rows: np.ndarray | None,
             selection_rows: np.ndarray | None) -> "ScoreKernel | None":
        """The kernel, or None where the C library was not built or the shape exceeds its limits."""
        fn = _kernel()
        if fn is None or not 0 < top_k <= min(n_expert, _MAX_K):
            return None
        return cls(fn, n_expert, top_k, bias_rows, selection_rows)

    def _set_spec(self, spec: GatingSpec) -> None:
        a = self._a
        a.func, a.select = GATING_FUNCS.index(spec.func), _SELECT.index(spec.select)
        a.use_sel_bias, a.norm_w, a.scale = int(spec.selection_bias), int(spec.norm_w), spec.scale
        a.n_group, a.n_group_used = spec.n_group, spec.n_group_used
        self._spec = spec

    def score(self, logits: np.ndarray, x_norm: np.ndarray, rows: np.ndarray, spec: GatingSpec, sink: ScoreSink,
              masks: np.ndarray | None = None, mask_of_token: np.ndarray | None = None) -> Hits | None:
        """logits [G, n, N] (router bias not added), x_norm [G, n], rows [G] int64 (each layer's row in the
        sink and in `masks`); masks [n_masks, n_layer, N] bool and mask_of_token [n] int32: the resident
        set token t ran with (None: hits not counted). Adds Eq. 1 into `sink.scores`."""
        g, n, _ = logits.shape
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        x_norm = np.ascontiguousarray(x_norm, dtype=np.float32)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        decay_tok, decay_all = sink.decay_weights(n)
        if spec != self._spec:
            self._set_spec(spec)
        a = self._a
        a.n_group_layers, a.n_tok, a.n_rows = g, n, sink.scores.shape[0]
        a.logits, a.x_norm, a.rows = logits.ctypes.data, x_norm.ctypes.data, rows.ctypes.data
        a.scores, a.norms = sink.scores.ctypes.data, sink.norms.ctypes.data
        a.decay_tok, a.decay_all = decay_tok.ctypes.data, decay_all
        if masks is not None:
            masks = np.ascontiguousarray(masks, dtype=np.bool_)
            mask_of_token = np.ascontiguousarray(mask_of_token, dtype=np.int32)
            a.masks, a.mask_of_token = masks.ctypes.data, mask_of_token.ctypes.data
        else:
            a.masks = a.mask_of_token = None
        a.hit_mass, a.hit_count = 0.0, 0
        self._fn(ctypes.byref(a))
        if a.error:
            raise ValueError(f"score kernel refused G={g} n={n} N={a.n_expert} k={a.k} groups={a.n_group}")
        return Hits(a.hit_mass, a.hit_count) if masks is not None else None


def token_masks(entries: list[tuple[int, np.ndarray]], current: np.ndarray,
                n: int) -> tuple[np.ndarray, np.ndarray]:
    """The resident set each of n gathered decode steps ran with: `entries` (step, mask) say the steps
    before `step` (since the previous entry) ran with `mask`, the rest with `current` ([n_layer, N]).
    Returns masks [n_masks, n_layer, N] and mask_of_token [n] int32."""
    if not entries:
        return current[None], np.zeros(n, dtype=np.int32)
    ends = np.array([e for e, _ in entries])
    return (np.stack([m for _, m in entries] + [current]),
            np.searchsorted(ends, np.arange(n), side="right").astype(np.int32))
