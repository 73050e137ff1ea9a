"""The Virtual Experts as they are now, for the web page's live panel (GET /swapmoe/state).

Read-only: public attributes of the runtime (its telemetry, the slot map, the swaps in flight, the
scheduler's scores), read from the server's thread while the engine decodes. Each value is read
once and copied; a reading taken mid-step may mix two steps, which a display tolerates. While a
budget change rebuilds the model (or the model goes to sleep or wakes) the runtime is not read at
all: the last state is answered (marked `changing` during a budget change).

An expert of a layer is, in the heatmap's terms:
- resident: in one of the layer's S slots;
- hot: not resident but wanted: its read is in flight (a swap about to be committed), or the
  scheduler ranks it among the layer's top S (it will come in once it beats a resident by the
  scheduler's margin);
- missing: neither.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from .core import Core


def floor_of(llm: Any) -> Any:
    """The quality floor's policy object (None: no floor, τ = 1, or the full model)."""
    return getattr(llm.policy, "floor", None)


class LiveState:
    """What /swapmoe/state answers, and the quality floor τ set through /swapmoe/budget."""

    def __init__(self, core: Core):
        self.core = core
        self.changing = False         # a budget change is rebuilding the model
        self.last: dict[str, Any] | None = None
        self.tau: float | None = None  # τ set live (None: the runtime's own)
        # a floor to tune: started with --max-dropped-mass below 1 (swapmoe builds one whenever S < n_expert)
        self.tau_live = core.llm.max_dropped_mass < 1.0

    def tau_now(self) -> float:
        llm = self.core._llm if not self.core.sleeping else None
        floor = floor_of(llm) if llm is not None else None
        if floor is not None:
            return float(floor.tau)
        return self.tau if self.tau is not None else float(llm.max_dropped_mass if llm is not None else 1.0)

    def apply_tau(self) -> None:
        """Give the floor the τ set live (a budget change builds a new policy with the start's τ)."""
        floor = floor_of(self.core._llm)
        if floor is not None and self.tau is not None:
            floor.tau = self.tau

    def read(self) -> dict[str, Any]:
        core = self.core
        if (self.changing or core.in_transition) and self.last is not None:
            return {**self.last, "changing": self.changing, "time": time.time()}
        t = core.telemetry()
        out: dict[str, Any] = {
            "model": core.alias, "policy": core.policy_name, "n_expert": core.meta["n_expert"],
            "experts_per_layer": t.slots, "sleeping": core.sleeping, "changing": self.changing,
            "time": time.time(), "swaps": t.swaps, "swap_failures": t.swap_failures, "hit_rate": t.hit_rate,
            "tokens": t.tokens, "decode_tokens": t.decode_tokens, "decode_seconds": t.decode_seconds,
            "prefill_tokens": t.prefill_tokens, "prefill_seconds": t.prefill_seconds, "rss_bytes": t.rss_bytes,
            "peak_rss_bytes": t.peak_rss_bytes, "budget_bytes": t.budget_bytes,
            "device_bytes": sum((t.device_bytes or {}).values()) or None, "vram_budget_bytes": t.vram_budget_bytes,
            "requests": core.counters["requests"], "running": 0,
            "max_dropped_mass": self.tau_now(), "tau_live": self.tau_live,
        }
        layers = sorted(t.resident)
        out["layers"] = layers
        out["resident"] = [sorted(t.resident[l]) for l in layers]
        out.update(self._wanted(layers, t.resident, t.slots))
        if not core.sleeping:
            floor = floor_of(core._llm)
            out["floor_acted"] = (floor.acted / floor.checked) if floor is not None and floor.checked else None
            out["memory_plan"] = core._llm.memory.parts()
            out["running"] = core._engine.n_busy  # requests being generated now
        self.last = out
        return out

    def _wanted(self, layers: list[int], resident: dict[int, tuple[int, ...]], slots: int) -> dict[str, Any]:
        """Per layer: experts being read (swaps in flight), hot ones, and the scheduler's scores
        scaled to the layer's best (0..1; None without a scheduler)."""
        core = self.core
        n = len(layers)
        loading: list[list[int]] = [[] for _ in range(n)]
        hot: list[set[int]] = [set() for _ in range(n)]
        scores: list[list[float]] | None = None
        if core.sleeping:
            return {"loading": loading, "hot": [[] for _ in range(n)], "scores": None}
        llm = core._llm
        row = {l: i for i, l in enumerate(layers)}
        for layer, _slot, expert, _read in list(llm.pending):
            if layer in row:
                loading[row[layer]].append(int(expert))
                hot[row[layer]].add(int(expert))
        sched = getattr(llm.policy, "scheduler", None)
        if sched is not None:
            scores = []
            for i, l in enumerate(layers):
                s = np.array(sched.effective(l), dtype=np.float64)                    # [n_expert]
                top = s.max() if s.size else 0.0
                scores.append([round(float(x), 3) for x in (s / top if top > 0 else s)])
                if top > 0:
                    want = np.argsort(-s, kind="stable")[:slots]
                    hot[i].update(int(e) for e in want if s[e] > 0)
        for i, l in enumerate(layers):
            hot[i] -= set(resident[l])
        return {"loading": [sorted(x) for x in loading], "hot": [sorted(x) for x in hot], "scores": scores}
