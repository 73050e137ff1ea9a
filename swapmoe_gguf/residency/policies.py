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

`exact` and the floor run a prompt's micro-batch in one graph: where a batch has more tokens than
S // k (its experts may not fit in the slots), the graph computes the resident experts and each
missing one is read once, computed outside the graph on the tokens that chose it and added into the
layer's output (expert_compute.py). Models whose expert FFN that module does not reproduce run such
prompts in micro-batches of S // k tokens instead.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from ..llamacpp.expert_compute import run_expert
from ..llamacpp.ggml import ggml
from ..llamacpp.router import RouterBatch
from ..llamacpp.routing import Routed, hit_shares, slot_mask_values
from ..store.expert_store import ExpertReadError
from .protocols import Runtime
from .scheduler import ImportanceScheduler

if TYPE_CHECKING:
    from ..llamacpp.expert_compute import ExpertFFN
    from ..store.expert_store import ExpertStore

log = logging.getLogger(__name__)

POLICIES = ("swapmoe", "static", "exact", "full")


def observe(scheduler: ImportanceScheduler, batch: RouterBatch) -> None:
    """Add a decode call's routing to the scheduler's scores, a group of layers at a time (nothing
    when the C kernel already added it into the scheduler's `sink`)."""
    for g in batch.groups:
        shape = (len(g.layers), g.n_tokens, g.routed.selected.shape[-1])  # (a layer may compute no token)
        scheduler.observe_layers(g.layers, g.x_norm, g.routed.selected.reshape(shape), g.routed.weights.reshape(shape))


class FixedPolicy:
    """Keeps whatever is resident (`static` after calibration, `full`)."""

    name = "fixed"
    observes = False
    owns_hit_rate = False

    def on_router(self, rt: Runtime, batch: RouterBatch) -> None:
        pass

    def before_decode(self, rt: Runtime) -> None:
        pass

    def scores_due(self, rt: Runtime) -> bool:
        return False


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
        self._sink = scheduler.sink()

    @property
    def score_sink(self):  # -> ScoreSink | None
        """Where the router tap's C kernel adds captured decode steps (none with a floor: its
        in-graph hook reads every layer in Python)."""
        return self._sink if self.floor is None else None

    @property
    def in_graph(self) -> "ExactPolicy | None":
        return self.floor

    @property
    def owns_hit_rate(self) -> bool:  # with a floor: measured before its loads, as `exact` does
        return self.floor is not None

    def on_router(self, rt: Runtime, batch: RouterBatch) -> None:
        observe(self.scheduler, batch)
        # Count every decoded token, also those of steps that scored no layer (observe_every > 1).
        new_tokens = rt.telemetry_.tokens - self._seen_tokens
        self._seen_tokens = rt.telemetry_.tokens
        # An update every F tokens, and right after a prompt's prefill (several tokens at once).
        if self.scheduler.tick(new_tokens) or batch.prompt:
            busy = {(l, s) for l, s, _, _ in rt.pending}
            coming = {(l, e) for l, _, e, _ in rt.pending}
            for sw in self.scheduler.propose(rt.vmodel.slot_map, busy):
                if (sw.layer, sw.expert) not in coming:
                    rt.request_swap(sw.layer, sw.slot, sw.expert)

    def before_decode(self, rt: Runtime) -> None:
        if self.floor is not None:
            self.floor.before_decode(rt)

    def scores_due(self, rt: Runtime) -> bool:
        """Whether the decode steps gathered so far complete an update interval (see `on_router`)."""
        return self.scheduler.due(rt.telemetry_.tokens - self._seen_tokens)


_PICK = np.float32(1e6)  # spacing of the ranking values a streamed batch writes (far above any selection bias)


class _StreamJob:
    """One layer of a micro-batch whose missing experts are computed outside the graph: a worker
    thread takes each expert as its read lands, computes it on the tokens that chose it and sums
    the weighted outputs, while llama.cpp computes the resident experts (both overlap the reads)."""

    def __init__(self, store: "ExpertStore", ffn: "ExpertFFN", layer: int, routed: Routed, x: np.ndarray,
                 missing: list[int], values: np.ndarray, weights: np.ndarray):
        self.routed, self.x, self.missing = routed, x, missing  # x [n_tok, n_embd]: the router's input
        self.values = values    # [n_tok, S] written into the ranking node: the graph picks `picks`, in order
        self.weights = weights  # [n_tok, k] written into the final weights node: the full model's, 0 on fillers
        self.acc = np.zeros_like(x)                                                     # [n_tok, n_embd]
        self.done = self.failed = 0
        self.error: BaseException | None = None
        self._cancelled = False
        self._store, self._ffn, self._layer = store, ffn, layer
        self.stream = store.stream(layer, missing)
        self._thread = threading.Thread(target=self._run, name="swapmoe-experts", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel, w = self.routed.selected, self.routed.weights
        try:
            for e, staged in zip(self.missing, self.stream):
                if self._cancelled:
                    if not isinstance(staged, ExpertReadError):
                        self._store.release(staged)
                    break
                if isinstance(staged, ExpertReadError):
                    self.failed += 1
                    log.debug("exact: reading expert %d of layer %d failed: %s", e, self._layer, staged)
                    continue
                try:
                    rows, cols = np.nonzero(sel == e)  # an expert is selected at most once per token
                    # one thread: llama.cpp's own threads compute the resident experts meanwhile
                    self.acc[rows] += w[rows, cols, None] * run_expert(self._ffn, staged, self.x[rows], 1)
                finally:
                    self._store.release(staged)
                self.done += 1
        except BaseException as err:  # noqa: BLE001 - re-raised on the decoding thread by result()
            self.error = err
        finally:
            self.stream.close()  # (only this thread touches the stream)

    def result(self) -> np.ndarray:
        """Wait for every missing expert; their weighted sum [n_tok, n_embd]."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.acc

    def cancel(self) -> None:
        self._cancelled = True
        self._thread.join(timeout=30)


def stream_picks(routed: Routed, slots: list[int], n_expert: int) -> tuple[np.ndarray, np.ndarray]:
    """What the graph must compute for a batch whose missing experts run outside it: each token's
    resident selected experts (the full model's order), then filler slots up to k (weight 0; the
    graph always runs k). Returns the ranking values [n_tok, S] (distinct, descending along the
    picks, so llama.cpp's top-k returns exactly them in that order) and their weights [n_tok, k]."""
    n_tok, k = routed.selected.shape
    n_slots = len(slots)
    slot_of = np.full(n_expert, -1, dtype=np.int64)
    slot_of[slots] = np.arange(n_slots)
    ps = slot_of[routed.selected]                                                   # [n_tok, k], -1: missing
    real = ps >= 0
    order = np.argsort(~real, axis=1, kind="stable")                                # resident first
    picks = np.take_along_axis(ps, order, axis=1)
    weights = np.take_along_axis(np.where(real, routed.weights, 0.0), order, axis=1).astype(np.float32)
    n_real = real.sum(1)                                                            # [n_tok]
    c = min(n_slots, 2 * k)  # the first 2k slots hold enough fillers for any token
    taken = np.zeros((n_tok, c), dtype=bool)
    r, j = np.nonzero((picks >= 0) & (picks < c))
    taken[r, picks[r, j]] = True
    free = np.argsort(taken, axis=1, kind="stable")                                 # [n_tok, c] untaken first
    for d in range(k):
        rows = np.nonzero(n_real + d < k)[0]
        if not rows.size:
            break
        picks[rows, n_real[rows] + d] = free[rows, d]
    values = np.zeros((n_tok, n_slots), dtype=np.float32)
    np.put_along_axis(values, picks, np.broadcast_to(_PICK * (2 * k - np.arange(k, dtype=np.float32)), picks.shape),
                      axis=1)
    return values, weights


def _overwrite(t: int, values: np.ndarray) -> None:
    """Replace a graph node's whole f32 data (its consumers have not run yet)."""
    g = ggml()
    if g.nbytes(t) != values.nbytes:
        raise RuntimeError(f"{g.name(t)}: {g.nbytes(t)} bytes in the graph, {values.nbytes} to write")
    g.set(t, values.astype(np.float32, copy=False))


class ExactPolicy:
    """Lossless: the full model's experts, loaded on demand before each layer's experts run, and the
    graph's ranking node rewritten so that it selects exactly those (see routing.slot_mask_values);
    in batches of more than S // k tokens, missing experts computed outside the graph instead."""

    name = "exact"
    observes = True
    owns_hit_rate = True  # hit = the full model's expert weight already resident BEFORE loading

    def __init__(self, rt: Runtime, max_dropped_mass: float = 0.0,
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
        self._jobs: dict[int, _StreamJob] = {}
        self.streamed = 0  # experts computed outside the graph

    @property
    def in_graph(self) -> "ExactPolicy":
        return self

    def wants(self, kind: str, layer: int) -> bool:
        return layer in self._jobs  # the final weights and the output of a streamed layer

    def mask_node(self, layer: int) -> str:
        """The node whose values llama.cpp ranks the slots by (rewritten with the full model's choice)."""
        spec = self.rt.full_router.specs[layer]
        return "probs" if spec.select == "probs" else "logits_biased" if layer in self.rt.full_router.bias else "logits"

    def __call__(self, kind: str, layer: int, t: int) -> None:
        rt, vm = self.rt, self.rt.vmodel
        if kind == "logits":
            self._load(layer, rt.tap.last_routed())
        elif kind == "weights":
            _overwrite(t, self._jobs[layer].weights)
            return
        elif kind == "out":
            self._finish(layer, t)
            return
        if kind == self.mask_node(layer) and layer in self._jobs:
            _overwrite(t, self._jobs[layer].values)
            return
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
        mass = np.zeros(vm.n_expert)
        np.add.at(mass, routed.selected.ravel(), np.abs(routed.weights).ravel() + 1e-12)
        need = [int(e) for e in np.argsort(-mass, kind="stable") if mass[e] > 0]  # most needed first
        big = routed.selected.shape[0] > rt.lossless_ubatch()
        if rt.expert_ffn and (big or rt.miss_cpu_tokens):
            resident = set(vm.slot_map[layer])
            missing = [e for e in need if e not in resident]
            # a big batch: each missing expert read once and computed outside the graph (module docstring);
            # slots on a device: also where the profile measured the CPU, from RAM, faster than an upload
            # for as many tokens as the most-used missing expert has here
            cpu = big or (missing and int(max((routed.selected == e).sum() for e in missing)) <= rt.miss_cpu_tokens)
            if missing and cpu:
                values, weights = stream_picks(routed, vm.slot_map[layer], vm.n_expert)
                self._jobs[layer] = _StreamJob(vm.store, rt.expert_ffn[layer], layer, routed, rt.tap.last_input(),
                                               missing, values, weights)
                return
        self._before[layer] = list(vm.slot_map[layer])
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

    def _finish(self, layer: int, t: int) -> None:
        """The layer's output node is computed (resident experts): add the missing experts' part."""
        rt, job = self.rt, self._jobs.pop(layer)
        t0 = time.perf_counter()
        try:
            acc = job.result()
        finally:
            rt.telemetry_.io_blocked_seconds += time.perf_counter() - t0
            rt.telemetry_.swap_failures += job.failed
            self.streamed += job.done
        _overwrite(t, ggml().get_f32(t).reshape(acc.shape) + acc)                     # [n_tok, n_embd]

    def on_router(self, rt: Runtime, batch: RouterBatch) -> None:
        pass

    def before_decode(self, rt: Runtime) -> None:
        for job in self._jobs.values():  # a decode that failed mid-graph: stop its reads
            job.cancel()
        self._jobs.clear()

    def scores_due(self, rt: Runtime) -> bool:
        return False  # (in-graph: nothing is gathered)
