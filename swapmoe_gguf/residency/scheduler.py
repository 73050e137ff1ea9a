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
        n_tok = selected.shape[0]
        gate = np.abs(weights) * x_norm[:, None]                                       # [n_tok, k]
        # Token t's contribution decays by decay^(n_tok-1-t) by the end of this batch.
        w = self.config.decay ** np.arange(n_tok - 1, -1, -1, dtype=np.float64)        # [n_tok]
        contrib = np.zeros(self.n_expert)
        np.add.at(contrib, selected.ravel(), (gate * w[:, None]).ravel())
        i = self.index[layer]
        self.scores[i] = self.scores[i] * self.config.decay ** n_tok + contrib * self.norms[i]

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
        out: list[Swap] = []
        for layer, slots in resident.items():
            s = self.effective(layer)
            res = set(slots)
            # weakest resident first, strongest outsider first
            free = sorted((i for i in range(len(slots)) if (layer, i) not in busy), key=lambda i: s[slots[i]])
            cand = sorted((e for e in range(self.n_expert) if e not in res), key=lambda e: -s[e])
            for slot, e in zip(free[:q], cand[:q]):
                old = slots[slot]
                if s[e] <= 0 or s[e] < self.config.margin * s[old]:
                    break
                out.append(Swap(layer, slot, e, old, float(s[e] / max(s[old], 1e-30))))
        self.stats.proposed += len(out)
        return out
