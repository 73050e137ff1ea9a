"""Residency policies on the same runtime: which experts sit in the S slots, and when they move.

* `swapmoe` (default): importance-aware virtual experts, masked gating among them, asynchronous
  updates every F tokens (and after each prefill), at most Q swaps per layer per update.
* `static`: the pruned compact model: a fixed top-S set per layer from a calibration text, never swapped.
* `exact`: lossless on-demand swapping: inside the graph, right after a layer's router ran, load
  the full router's top-k experts that are missing (least recently used slot out, blocking I/O)
  and overwrite the layer's routing probabilities with the full router's, so the layer computes
  exactly what the full model computes.
* `full`: every expert resident (S = n_expert).
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from .ggml import ggml
from .router import RouterBatch, hit_shares, softmax
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
    owns_hit_rate = False

    def __init__(self, scheduler: ImportanceScheduler):
        self.scheduler = scheduler
        self._seen_tokens = 0

    def on_router(self, rt: "SwapMoELlama", batch: RouterBatch) -> None:
        n_tok = 0
        for layer in batch.layers:
            x_norm, probs = batch.layer(layer)
            self.scheduler.observe(layer, x_norm, probs)
            n_tok = max(n_tok, probs.shape[0])
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
    """Lossless: the full router's top-k, loaded on demand before each layer's experts run."""

    name = "exact"
    observes = True
    owns_hit_rate = True  # hit = top-k mass already resident BEFORE loading (after, it is always 1)

    def __init__(self, rt: "SwapMoELlama"):
        self.rt = rt
        self.clock = 0
        self.last_used = {l: np.zeros(rt.vmodel.slots, dtype=np.int64) for l in rt.vmodel.moe_layers}
        self._probs: dict[int, np.ndarray] = {}
        self.overflows = 0  # batches whose experts did not fit in S slots (not exact then)

    def __call__(self, kind: str, layer: int, t: int) -> None:
        rt, vm = self.rt, self.rt.vmodel
        if kind == "logits":
            x = rt.tap.last_input()                                   # [n_tok, n_embd]
            probs = softmax(x @ rt.tap.router_t[layer])                # [n_tok, n_expert]
            k = vm.top_k
            top = np.argpartition(-probs, k - 1, axis=-1)[:, :k]       # [n_tok, k]
            mask = vm.resident_mask[rt.tap.index[layer]]
            rt.telemetry_.add_hits(hit_shares(probs, mask, k))
            mass = np.zeros(vm.n_expert)
            np.add.at(mass, top.ravel(), np.take_along_axis(probs, top, -1).ravel())
            need = [int(e) for e in np.argsort(-mass) if mass[e] > 0]  # most needed first
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
                victims = sorted((s for s in range(vm.slots) if slots[s] not in keep),
                                 key=lambda s: self.last_used[layer][s])
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
            self._probs[layer] = probs
        elif kind == "probs":
            probs = self._probs.pop(layer, None)
            if probs is not None:  # the full router's probabilities, in slot order: [n_tok, S]
                ggml().set(t, np.ascontiguousarray(probs[:, vm.slot_map[layer]], dtype=np.float32))

    def on_router(self, rt: "SwapMoELlama", batch: RouterBatch) -> None:
        pass

    def before_decode(self, rt: "SwapMoELlama") -> None:
        pass


class _Collector(FixedPolicy):
    observes = True

    def __init__(self, scheduler: ImportanceScheduler):
        self.scheduler = scheduler

    def on_router(self, rt: "SwapMoELlama", batch: RouterBatch) -> None:
        for layer in batch.layers:
            self.scheduler.observe(layer, *batch.layer(layer))


def calibrate(rt: "SwapMoELlama", tokens: list[int]) -> dict[int, list[int]]:
    """Importance over a calibration text (no decay): every layer's experts, most important first."""
    vm = rt.vmodel
    sched = ImportanceScheduler(vm.moe_layers, vm.n_expert, vm.top_k, vm.info.expert_norms,  # type: ignore[arg-type]
                                SchedulerConfig(decay=1.0 - 1e-9, interval=1 << 30, quota=0))
    saved, enabled = rt.policy, rt.tap.enabled
    rt.policy, rt.tap.enabled = _Collector(sched), True
    try:
        chunk = max(1, min(rt.n_ctx(), len(rt.input_ids)) - 1)
        for i in range(0, len(tokens), chunk):
            rt.reset()
            rt.eval(tokens[i:i + chunk])
    finally:
        rt.policy, rt.tap.enabled = saved, enabled
        rt.reset()
    return {l: [int(e) for e in np.argsort(-sched.scores[sched.index[l]], kind="stable")] for l in vm.moe_layers}
