"""Importance-aware scheduling of the Virtual Experts: pure Python + numpy, no model needed.

Importance of expert i in one MoE layer (SwapMoE, Kong et al. 2024, Eq. 1), over a window of
tokens X:   I_i = sum_{x in X routed to i} ||x|| * g_i(x) * ||E_i||
with g the weight the FULL model gives expert i for x (its own gate: softmax or sigmoid, biases,
groups, normalisation and scaling, see routing.py) and "routed to i" meaning the full model selects
i for x. The window is exponential: each scored token multiplies earlier
contributions by `decay`, so the score's memory is about 1 / (1 - decay) tokens.

Every `interval` tokens (and at each request's prefill) the scheduler proposes up to `quota`
swaps per layer: the non-resident experts whose score most exceeds the weakest resident ones,
by at least the factor `margin` (hysteresis: a stationary workload stops swapping).

A calibrated prior (`prior_weight` > 0) adds to every score the expert's importance per token over
a mixed calibration text, weighted as `prior_weight` windows of average traffic: experts that
every domain needs form a core that a short burst of other traffic does not evict, and the rest
follows the requests. With the prior, the scheduler starts from `static`'s set and only swaps what
the recent tokens clearly favour; without it, from whatever is resident.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..llamacpp.scoring import ScoreSink


@dataclass(frozen=True)
class Swap:
    layer: int
    slot: int
    expert: int     # the expert to load
    evicted: int    # the expert it replaces
    gain: float     # score(expert) / score(evicted)


@dataclass(frozen=True)
class SchedulerConfig:
    decay: float = 0.98       # per token: memory of ~50 tokens (see README for the measurement)
    interval: int = 8         # tokens between updates (F)
    quota: int = 2            # max swaps per layer per update (Q)
    margin: float = 1.25      # a newcomer must beat the weakest resident by this factor
    observe_every: int = 1    # score each layer on every n-th decode step (staggered); prefill always
    # finished swaps committed per decode step, on average (spreads the cost: flat p99); below 1, one
    # commit every 1/rate steps: the planner sets it so a prefill's burst of swaps is paced like the rest
    commit_rate: float = 1.0
    # weight of the calibrated prior, in windows (1 / (1 - decay) tokens) of average traffic; 0: none
    prior_weight: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}")
        if self.interval < 1 or self.quota < 0 or self.margin < 1.0 or self.observe_every < 1 \
                or not self.commit_rate > 0 or self.prior_weight < 0:
            raise ValueError(f"need interval >= 1, quota >= 0, margin >= 1; got {self}")


@dataclass
class SchedulerStats:
    updates: int = 0
    proposed: int = 0
    tokens: int = 0


@dataclass
class ImportanceScheduler:
    """Decayed importance per (MoE layer, expert) and swap proposals."""

    layers: list[int]
    n_expert: int
    top_k: int
    norms: np.ndarray                  # [n_layer, n_expert] ||E_i||
    config: SchedulerConfig = field(default_factory=SchedulerConfig)
    stats: SchedulerStats = field(default_factory=SchedulerStats)

    def __post_init__(self) -> None:
        self.index = {l: i for i, l in enumerate(self.layers)}
        self.scores = np.zeros((len(self.layers), self.n_expert), dtype=np.float64)  # [n_layer, n_expert]
        self.prior = np.zeros_like(self.scores)                                          # [n_layer, n_expert]
        self._since_update = 0
        self._rows: dict[tuple[int, ...], np.ndarray] = {}  # layers -> their rows (a step's layers repeat)
        self._decay: dict[int, tuple[np.ndarray, float]] = {}  # n_tok -> decay_weights(n_tok)

    def decay_weights(self, n_tok: int) -> tuple[np.ndarray, float]:
        """(decay^(n_tok-1-t) for each token t [n_tok], decay^n_tok): what is left of token t's
        contribution, and of the earlier scores, once n_tok tokens are added."""
        w = self._decay.get(n_tok)
        if w is None:
            d = self.config.decay
            w = self._decay[n_tok] = (d ** np.arange(n_tok - 1, -1, -1, dtype=np.float64), d ** n_tok)
        return w

    def sink(self) -> ScoreSink:
        """The score arrays, for the C kernel that adds captured decode steps in place (the same sums
        as `observe_layers`; see llamacpp/scoring.py)."""
        return ScoreSink(self.layers, self.scores, np.ascontiguousarray(self.norms, dtype=np.float64),
                         self.decay_weights)

    def set_prior(self, rate: np.ndarray) -> None:
        """rate [n_layer, n_expert]: calibrated importance per token (Eq. 1 summed over a calibration
        text, divided by its tokens); scaled to `prior_weight` windows of the decayed score."""
        if rate.shape != self.scores.shape:
            raise ValueError(f"prior of shape {rate.shape}, expected {self.scores.shape}")
        self.prior = self.config.prior_weight * rate / (1.0 - self.config.decay)

    def effective(self, layer: int) -> np.ndarray:
        """What the scheduler ranks a layer's experts by: recent importance plus the prior. [n_expert]"""
        i = self.index[layer]
        return self.scores[i] + self.prior[i]

    def observe(self, layer: int, x_norm: np.ndarray, probs: np.ndarray) -> None:
        """Add one layer's tokens routed by plain top-k of `probs` [n_tok, n_expert] (softmax routers)."""
        top = np.argpartition(-probs, self.top_k - 1, axis=-1)[:, : self.top_k]        # [n_tok, k]
        self.observe_routed(layer, x_norm, top, np.take_along_axis(probs, top, axis=-1))

    def observe_routed(self, layer: int, x_norm: np.ndarray, selected: np.ndarray, weights: np.ndarray) -> None:
        """Add one layer's tokens: x_norm [n_tok], the full model's selected experts [n_tok, k] and the
        weights it gives them [n_tok, k] (its own gate: softmax, sigmoid, normalised, scaled...)."""
        self.observe_layers((layer,), x_norm[None], selected[None], weights[None])

    def observe_layers(self, layers: tuple[int, ...], x_norm: np.ndarray, selected: np.ndarray,
                       weights: np.ndarray) -> None:
        """Add G layers' tokens at once (one numpy pass, the same sums as layer by layer): x_norm
        [G, n_tok], selected [G, n_tok, k], weights [G, n_tok, k]."""
        rows = self._rows.get(layers)
        if rows is None:
            rows = self._rows[layers] = np.array([self.index[l] for l in layers])
        g, n_tok = x_norm.shape
        gate = np.abs(weights) * x_norm[..., None]                                     # [G, n_tok, k]
        # Token t's contribution decays by decay^(n_tok-1-t) by the end of this batch.
        w, left = self.decay_weights(n_tok)                                             # [n_tok]
        contrib = np.zeros((g, self.n_expert))                                         # [G, n_expert]
        flat = (np.arange(g)[:, None, None] * self.n_expert + selected).ravel()
        np.add.at(contrib.reshape(-1), flat, (gate * w[:, None]).ravel())
        self.scores[rows] = self.scores[rows] * left + contrib * self.norms[rows]

    def due(self, n_tokens: int) -> bool:
        """Whether `tick(n_tokens)` would make an update due."""
        return self._since_update + n_tokens >= self.config.interval

    def tick(self, n_tokens: int) -> bool:
        """Count decoded tokens; True when an update is due."""
        self.stats.tokens += n_tokens
        self._since_update += n_tokens
        return self._since_update >= self.config.interval

    def target(self, layer: int, slots: int) -> list[int]:
        """The ideal resident set of a layer: its top-`slots` experts by score."""
        return sorted(np.argsort(-self.effective(layer), kind="stable")[:slots].tolist())

    def propose(self, resident: dict[int, list[int]], busy: set[tuple[int, int]] = frozenset(),
                quota: int | None = None) -> list[Swap]:
        """Swaps for every layer: at most `quota` each, best gain first; `busy` slots are skipped."""
        self._since_update = 0
        self.stats.updates += 1
        q = self.config.quota if quota is None else quota
        layers = list(resident)
        slots = np.array([resident[l] for l in layers])                                # [L, S]
        n_slot = slots.shape[1] if slots.ndim == 2 else 0
        j = min(q, n_slot, self.n_expert - n_slot)
        if not layers or j <= 0:
            return []
        rows = self._rows.get(tuple(layers))
        if rows is None:
            rows = self._rows[tuple(layers)] = np.array([self.index[l] for l in layers])
        at = np.arange(len(layers))[:, None]                                            # [L, 1]
        s = self.scores[rows] + self.prior[rows]                                        # [L, n_expert]
        res_s = s[at, slots]                                                            # [L, S]
        for layer, slot in busy:
            if layer in resident:
                res_s[layers.index(layer), slot] = np.inf  # never evicted: sorts last, beats no one
        # weakest resident first, strongest outsider first (stable: ties by slot, by expert id)
        free = np.argsort(res_s, axis=1, kind="stable")[:, :j]                          # [L, j] slots
        key = -s
        key[at, slots] = np.inf                                                         # residents last
        cand = np.argsort(key, axis=1, kind="stable")[:, :j]                            # [L, j] experts
        new_s, old_s = s[at, cand], res_s[at, free]
        # a layer stops at its first pair that fails (zero score, or not `margin` better)
        ok = np.logical_and.accumulate((new_s > 0) & (new_s >= self.config.margin * old_s), axis=1)
        out = [Swap(layers[i], int(free[i, k]), int(cand[i, k]), int(slots[i, free[i, k]]),
                    float(new_s[i, k] / max(old_s[i, k], 1e-30))) for i, k in zip(*np.nonzero(ok))]
        self.stats.proposed += len(out)
        return out
