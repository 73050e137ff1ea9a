"""Residency policies on the same runtime: which experts sit in the S slots, and when they move.

* `swapmoe` (default): importance-aware virtual experts, masked gating among them, asynchronous
  updates every F tokens (and after each prefill), at most Q swaps per layer per update.
* `static`: the pruned compact model: a fixed top-S set per layer from a calibration text, never swapped.
* `exact`: lossless on-demand swapping: inside the graph, right after a layer's router ran, load
  the experts the full model selects that are missing (least recently used slot out, blocking I/O)
  and rewrite the node llama.cpp ranks slots by with the full model's values (-inf elsewhere), so
  the layer selects and weighs exactly as the full model does (routing.py: its own gating).
* `swapmoe` with a quality floor τ (`--max-dropped-mass`): as `swapmoe`, but where a token's share of
  the full model's top-k weight on non-resident experts exceeds τ in a layer, that layer does what
  `exact` does (the missing experts loaded into the least important slots, the full model's routing).
  τ = 1 is plain `swapmoe`, τ = 0 is `exact`.
* `full`: every expert resident (S = n_expert).
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from .ggml import ggml
from .router import RouterBatch
from .routing import Routed, hit_shares, slot_mask_values
from .scheduler import ImportanceScheduler, SchedulerConfig

if TYPE_CHECKING:
    from .runtime import SwapMoELlama

log = logging.getLogger(__name__)

POLICIES = ("swapmoe", "static", "exact", "full")


class FixedPolicy:
    """Keeps whatever is resident (`static` after calibration, `full`)."""

    name = "fixed"
    observes = False
    owns_hit_rate = False

    def on_router(self, rt: "SwapMoELlama", batch: RouterBatch) -> None:
        pass

    def before_decode(self, rt: "SwapMoELlama") -> None:
        pass


class StaticPolicy(FixedPolicy):
    name = "static"


class FullPolicy(FixedPolicy):
    name = "full"


class SwapMoEPolicy:
    name = "swapmoe"
    observes = True

    def __init__(self, scheduler: ImportanceScheduler, floor: "ExactPolicy | None" = None):
        self.scheduler = scheduler
        self.floor = floor          # the quality floor's on-demand loader (None: τ = 1)
        self._seen_tokens = 0

    @property
    def in_graph(self) -> "ExactPolicy | None":
        return self.floor

    @property
    def owns_hit_rate(self) -> bool:  # with a floor: measured before its loads, as `exact` does
        return self.floor is not None

    def on_router(self, rt: "SwapMoELlama", batch: RouterBatch) -> None:
        n_tok = 0
        for layer, x_norm, r in zip(batch.layers, batch.x_norm, batch.routed):
            self.scheduler.observe_routed(layer, x_norm, r.selected, r.weights)
            n_tok = max(n_tok, r.selected.shape[0])
        # Count every decoded token, also those of steps that scored no layer (observe_every > 1).
        new_tokens = rt.telemetry_.tokens - self._seen_tokens
        self._seen_tokens = rt.telemetry_.tokens
        # An update every F tokens, and right after a prompt's prefill (several tokens at once).
        if self.scheduler.tick(new_tokens) or n_tok > 1:
            busy = {(l, s) for l, s, _, _ in rt.pending}
            coming = {(l, e) for l, _, e, _ in rt.pending}
            for sw in self.scheduler.propose(rt.vmodel.slot_map, busy):
                if (sw.layer, sw.expert) not in coming:
                    rt.request_swap(sw.layer, sw.slot, sw.expert)

    def before_decode(self, rt: "SwapMoELlama") -> None:
        pass


class ExactPolicy:
    """Lossless: the full model's experts, loaded on demand before each layer's experts run, and the
    graph's ranking node rewritten so that it selects exactly those (see routing.slot_mask_values)."""

    name = "exact"
    observes = True
    owns_hit_rate = True  # hit = the full model's expert weight already resident BEFORE loading

    def __init__(self, rt: "SwapMoELlama", max_dropped_mass: float = 0.0,
                 scheduler: ImportanceScheduler | None = None):
        self.rt = rt
        self.tau = max_dropped_mass  # act only where a token's dropped share exceeds this (0: always)
        self.scheduler = scheduler   # victims by its importance (the floor); None: least recently used
        self.clock = 0
        self.last_used = {l: np.zeros(rt.vmodel.slots, dtype=np.int64) for l in rt.vmodel.moe_layers}
        self._routed: dict[int, Routed] = {}
        self._before: dict[int, list[int]] = {}  # slot map of a layer before this step's loads
        self.overflows = 0  # batches whose experts did not fit in S slots (not exact then)
        self.checked = self.acted = 0  # (micro-batch, layer) pairs seen / made exact
        # the full model's expert weight still routed elsewhere after the floor, summed over
        # (token, layer): 0 where the floor acted, the dropped share where it let the residents route
        self.dropped_sum, self.dropped_n = 0.0, 0

    @property
    def in_graph(self) -> "ExactPolicy":
        return self

    def mask_node(self, layer: int) -> str:
        """The node whose values llama.cpp ranks the slots by (rewritten with the full model's choice)."""
        spec = self.rt.full_router.specs[layer]
        return "probs" if spec.select == "probs" else "logits_biased" if layer in self.rt.full_router.bias else "logits"

    def __call__(self, kind: str, layer: int, t: int) -> None:
        rt, vm = self.rt, self.rt.vmodel
        if kind == "logits":
            self._load(layer, rt.tap.last_routed())
        if kind == self.mask_node(layer):
            routed = self._routed.pop(layer, None)
            if routed is None:
                return
            g = ggml()
            slots = vm.slot_map[layer]
            ours = routed.probs if kind == "probs" else rt.full_router.logits(layer, rt.tap.last_input())
            if kind == "probs" and rt.full_router.specs[layer].func == "softmax":
                values = ours[:, slots]   # the full softmax, not the graph's over S slots: [n_tok, S]
            else:
                # the graph's own values (bit for bit what the full model computes), except in slots
                # loaded just now: the router ran before their rows arrived
                values = g.get_f32(t).reshape(-1, len(slots))                  # [n_tok, S]
                fresh = [s for s, e in enumerate(slots) if self._before[layer][s] != e]
                values[:, fresh] = ours[:, [slots[s] for s in fresh]]
            g.set(t, slot_mask_values(routed, slots, values))

    def _load(self, layer: int, routed: Routed) -> None:
        rt, vm = self.rt, self.rt.vmodel
        mask = vm.resident_mask[rt.tap.index[layer]]
        shares = hit_shares(routed, mask)                                              # [n_tok]
        rt.telemetry_.add_hits(shares)
        self.checked += 1
        self.dropped_n += shares.size
        if self.tau > 0 and (not shares.size or 1.0 - float(shares.min()) <= self.tau):
            self.dropped_sum += float((1.0 - shares).sum())
            return  # within the floor: the layer routes among the residents (masked gating)
        self.acted += 1
        self._before[layer] = list(vm.slot_map[layer])
        mass = np.zeros(vm.n_expert)
        np.add.at(mass, routed.selected.ravel(), np.abs(routed.weights).ravel() + 1e-12)
        need = [int(e) for e in np.argsort(-mass, kind="stable") if mass[e] > 0]  # most needed first
        if len(need) > vm.slots:
            self.overflows += 1
            need = need[: vm.slots]
        self.clock += 1
        slots = vm.slot_map[layer]
        for e in need:
            if e in slots:
                self.last_used[layer][slots.index(e)] = self.clock
        missing = [e for e in need if e not in slots]
        if missing:
            t0 = time.perf_counter()
            keep = set(need)
            if self.scheduler is None:  # least recently used first
                order = lambda s: self.last_used[layer][s]  # noqa: E731
            else:  # least important first (the scheduler's scores)
                score = self.scheduler.effective(layer)
                order = lambda s: score[slots[s]]  # noqa: E731
            victims = sorted((s for s in range(vm.slots) if slots[s] not in keep), key=order)
            for e, slot in zip(missing, victims):
                try:
                    vm.swap(layer, slot, e)  # blocking read + commit: the layer waits
                except Exception as err:  # noqa: BLE001 - keep generating with what is resident
                    rt.telemetry_.swap_failures += 1
                    log.debug("exact: loading expert %d of layer %d failed: %s", e, layer, err)
                    continue
                self.last_used[layer][slot] = self.clock
                rt.telemetry_.swaps += 1
            rt.telemetry_.io_blocked_seconds += time.perf_counter() - t0
        self._routed[layer] = routed

    def on_router(self, rt: "SwapMoELlama", batch: RouterBatch) -> None:
        pass

    def before_decode(self, rt: "SwapMoELlama") -> None:
        pass


class _Collector(FixedPolicy):
    observes = True

    def __init__(self, scheduler: ImportanceScheduler):
        self.scheduler = scheduler

    def on_router(self, rt: "SwapMoELlama", batch: RouterBatch) -> None:
        for layer, x_norm, r in zip(batch.layers, batch.x_norm, batch.routed):
            self.scheduler.observe_routed(layer, x_norm, r.selected, r.weights)


CALIB_CHUNK = 256  # tokens per calibration window: fixed, so the result does not depend on n_ctx or slots


def calib_chunk(rt: "SwapMoELlama") -> int:
    return max(1, min(CALIB_CHUNK, rt.n_ctx_seq(), len(rt.input_ids)) - 1)


def calibrate(rt: "SwapMoELlama", tokens: list[int]) -> np.ndarray:
    """Importance per token over a calibration text (Eq. 1, no decay), read in windows of CALIB_CHUNK
    tokens. [n_moe_layer, n_expert]"""
    vm = rt.vmodel
    sched = ImportanceScheduler(vm.moe_layers, vm.n_expert, vm.top_k, vm.info.expert_norms,  # type: ignore[arg-type]
                                SchedulerConfig(decay=1.0 - 1e-9, interval=1 << 30, quota=0))
    saved, enabled = rt.policy, rt.tap.enabled
    rt.policy, rt.tap.enabled = _Collector(sched), True
    try:
        chunk = calib_chunk(rt)
        for i in range(0, len(tokens), chunk):
            rt.reset()
            rt.eval(tokens[i:i + chunk])
    finally:
        rt.policy, rt.tap.enabled = saved, enabled
        rt.reset()
    return sched.scores / max(1, len(tokens))


def ranking(rates: np.ndarray, layers: list[int]) -> dict[int, list[int]]:
    """Every layer's experts, most important first. rates: [n_layer, n_expert]"""
    return {l: [int(e) for e in np.argsort(-rates[i], kind="stable")] for i, l in enumerate(layers)}
