"""SwapMoELlama: llama-cpp-python's high-level `Llama`, running on Virtual Experts.

Chat formats, samplers, `create_completion`/`create_chat_completion` and `llama_cpp.server`
work unchanged. Differences from a plain `Llama`:

* the llama.cpp model is built from the swap-ready GGUF with S expert slots per MoE layer
  (`VirtualExpertModel`), S from `memory_budget` and/or `experts_per_layer`;
* the context carries an eval callback (`RouterTap`) that scores all experts from the full
  router, and a decode hook that commits finished swaps only *between* `llama_decode` calls;
* `telemetry()` reports residency, swaps, I/O, hit rate and memory;
* `scheduler`: a `SchedulerConfig`, or "auto" (what the CLI, the server and `demo` pass): F, Q and the
  scoring stride the planner picks for S from this device's cached profile (`swapmoe plan`), the
  scheduler's defaults without one; a `plan` fixes them too.

How it is built into `Llama`: hooks.py. Process-wide settings (malloc trim, BLAS threads):
process.py.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from typing import Any, Callable

import llama_cpp
import numpy as np
from llama_cpp import Llama

from ..base.errors import ContextFull, LayoutError, SwapMoEError
from ..fileformat.reader import read_gguf
from ..llamacpp.expert_compute import WEIGHT_NODES, ExpertFFN, ffn_spec
from ..llamacpp.router import FullRouter, RouterBatch, RouterTap
from ..llamacpp.routing import hit_shares
from ..llamacpp.scoring import token_masks
from ..llamacpp.vmodel import VirtualExpertModel
from ..planning import calib_cache
from ..planning.planner import Plan
from ..residency.budget import (Budget, BudgetError, MemoryPlan, estimate, fmt, parse_budget, parse_ram_tier,
                                plan_slots, ram_tier_bytes)
from ..residency.calibration import CALIB_SECONDS, calib_chunk, calibrate, ranking
from ..residency.policies import POLICIES, ExactPolicy, FullPolicy, StaticPolicy, SwapMoEPolicy
from ..residency.protocols import ResidencyPolicy
from ..residency.scheduler import ImportanceScheduler, SchedulerConfig
from ..residency.telemetry import RssProbe, Telemetry, TelemetrySnapshot
from ..store.expert_store import ExpertReadError, StagedExpert
from ..store.ram_tier import RamTier
from .hooks import HookedContext, construct_with
from .placement import Placement
from .process import release_memory, single_threaded_blas

AUTO = "auto"  # scheduler=AUTO: F and Q from the cached device profile (the planner's), else the defaults

log = logging.getLogger(__name__)


class SwapMoELlama(Llama):
    def __init__(self, model_path: str, *, memory_budget: str | Budget | None = None,
                 experts_per_layer: int | None = None, policy: str | None = None,
                 scheduler: SchedulerConfig | str | None = None, calibration: str | None = None,
                 plan: Plan | str | None = None,
                 initial_experts: dict[int, list[int]] | None = None, staging_buffers: int = 2,
                 max_dropped_mass: float | None = None, n_seq_max: int = 1, kv_unified: bool = False,
                 swa_full: bool = False,
                 n_ctx: int = 2048, n_batch: int = 512, n_ubatch: int = 512, n_gpu_layers: int = 0,
                 logits_all: bool = False, flash_attn: bool = True, repack: bool = True, verbose: bool = False,
                 rpc_servers: str | list[str] | None = None, tensor_split: str | list[float] | None = None,
                 vram_budget: str | Budget | None = None, cpu_moe: bool = False, n_cpu_moe: int = 0,
                 override_tensor: list[str] | tuple[str, ...] = (),
                 ram_tier: str | int | Budget | None = None,
                 **kwargs: Any):
        # llama-cpp-python's log callback prints llama.cpp's messages unless its logger says otherwise;
        # the model is built before Llama.__init__ would set it.
        logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
        planned_s = None  # S from a plan: the most a budget gives, fewer when this policy needs more buffers
        if plan is not None:  # a plan fixes S, F and Q for this very file
            plan = Plan.load(plan) if isinstance(plan, str) else plan
            plan.check_model(model_path)
            planned_s = None if experts_per_layer else plan.experts_per_layer
            experts_per_layer = experts_per_layer or plan.experts_per_layer
            scheduler = plan.scheduler if scheduler in (None, AUTO) else scheduler
            policy = policy or plan.policy
            if max_dropped_mass is None and policy == "swapmoe":
                max_dropped_mass = plan.max_dropped_mass
            if ram_tier is None and plan.ram_tier_bytes:
                ram_tier = plan.ram_tier_bytes
        policy = policy or "swapmoe"
        max_dropped_mass = 1.0 if max_dropped_mass is None else max_dropped_mass
        if policy not in POLICIES:
            raise SwapMoEError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
        if not 0.0 <= max_dropped_mass <= 1.0:
            raise SwapMoEError(f"max dropped mass must be between 0 and 1, got {max_dropped_mass:g}")
        if max_dropped_mass < 1.0 and policy == "static":
            raise SwapMoEError("a quality floor (max dropped mass < 1) needs a policy that swaps: swapmoe or exact")
        if max_dropped_mass == 0.0 and policy == "swapmoe":
            policy = "exact"  # nothing may be dropped: that is `exact`
        self.max_dropped_mass = max_dropped_mass if policy == "swapmoe" else 1.0
        if n_seq_max < 1:
            raise SwapMoEError(f"need at least one sequence, got n_seq_max={n_seq_max}")
        self.n_seq_max, self.kv_unified, self.swa_full = n_seq_max, kv_unified, swa_full
        # the floor's synchronous reads (expert_store): two, so that a streamed prompt reads one expert
        # while it computes another (policies.ExactPolicy)
        reserved = 2 if self.max_dropped_mass < 1.0 else 0
        info = read_gguf(model_path)
        problem = info.run_problem()
        if problem:  # before any sizing: a non-MoE file has no experts to budget
            raise LayoutError(f"{model_path}: cannot run this GGUF ({problem})")
        n_expert = info.n_expert
        single_threaded_blas()
        gc.collect()  # the baseline below is measured: release what earlier models left behind first
        release_memory()
        budget = parse_budget(memory_budget) if isinstance(memory_budget, str) else memory_budget
        tier_spec = None if ram_tier is None else parse_ram_tier(ram_tier)  # a bad value: before anything is built
        self.ram_tier: RamTier | None = None
        self._tier_ngl = n_gpu_layers  # where slots live: the tier goes in that device's host memory
        if policy == "full":
            experts_per_layer = n_expert
        n_batch_eff = min(n_ctx, n_batch) if n_ctx else n_batch
        lossless = policy == "exact" or self.max_dropped_mass < 1.0
        # decode steps read router inputs in C (up to n_seq_max tokens a step, one per parallel sequence)
        # and are scored every F steps, when the scheduler acts: room for F such steps, and one more
        # (F not known yet with AUTO: room for the most, 64 steps)
        auto = scheduler == AUTO
        if auto:
            scheduler = None
        elif isinstance(scheduler, str):
            raise SwapMoEError(f"scheduler: expected a SchedulerConfig or {AUTO!r}, got {scheduler!r}")
        self._capture = (min(n_seq_max, 16), min(64 if auto else (scheduler or SchedulerConfig()).interval, 64) + 1)
        mem = estimate(info, n_ctx=n_ctx or info.params.n_ctx_train, n_batch=n_batch_eff, n_ubatch=n_ubatch,
                       logits_all=logits_all, staging_buffers=staging_buffers + reserved, flash_attn=flash_attn,
                       streams=lossless, capture_tokens=self._capture[0] * self._capture[1])
        if tier_spec is not None:  # an explicit RAM tier comes out of the host budget before the slots
            mem = replace(mem, ram_tier=ram_tier_bytes(tier_spec, mem))
        try:
            self.memory: MemoryPlan = plan_slots(mem, budget, experts_per_layer)
        except BudgetError:
            fit = plan_slots(mem, budget, None).slots if planned_s and budget else None
            if fit is None or fit >= experts_per_layer:
                raise
            log.info("the plan's %d experts per layer do not fit this budget with the lossless path's buffers "
                     "and scratch: running %d", planned_s, fit)
            self.memory = plan_slots(mem, budget, fit)
        self.budget_bytes = budget.resolve(mem.full) if budget else None
        # devices (placement.py): RPC servers registered, -ot/--cpu-moe overrides, S within --vram-budget
        self.placement = Placement.prepare(info, self.memory, n_gpu_layers=n_gpu_layers, rpc_servers=rpc_servers,
                                           tensor_split=tensor_split, vram_budget=vram_budget, cpu_moe=cpu_moe,
                                           n_cpu_moe=n_cpu_moe, override_tensor=override_tensor,
                                           experts_per_layer=experts_per_layer)
        if tier_spec is None:  # the device budget bounds S: host memory left over becomes the RAM tier
            self.placement = replace(self.placement, memory=self._auto_tier(
                info, self.placement.memory, budget, n_gpu_layers, int(kwargs.get("n_threads") or 0)))
        self.memory = self.placement.memory
        # slots on a device: a missing expert needed by at most this many tokens of a micro-batch is computed
        # on the CPU from RAM (lossless path) rather than uploaded into a slot (the profile measures both)
        self.miss_cpu_tokens = self._miss_cpu_tokens(info, plan, n_gpu_layers, int(kwargs.get("n_threads") or 0))
        # (kept: a budget change plans F and Q again for the new S)
        self._scheduler_auto, self._threads = auto, int(kwargs.get("n_threads") or 0)
        if auto and policy == "swapmoe":
            scheduler = self._planned_scheduler(info, n_gpu_layers)
        self.requested_policy = policy  # what a budget change returns to when not everything fits
        if self.memory.slots == n_expert and policy != "full":
            log.info("every expert fits (%d of %d): running the full model", n_expert, n_expert)
            policy = "full"
        self.policy_name = policy
        self.expert_ffn: dict[int, ExpertFFN] = {}  # lossless prompts: experts run outside the graph
        self.static_rank: dict[int, list[int]] | None = None  # static: calibration order per layer
        self.calib_rates: np.ndarray | None = None  # importance per token on the calibration text [n_layer, n_expert]
        self.telemetry_ = Telemetry()
        self._rss = RssProbe()
        self.pending: list[tuple[int, int, int, Future[StagedExpert]]] = []  # (layer, slot, expert, read)
        self._finished: collections.deque = collections.deque()  # reads finished since the last commit pass
        self._hit_masks: list[tuple[int, np.ndarray]] = []  # see _add_hits
        self.repack = repack
        self.vmodel = VirtualExpertModel(model_path, self.memory.slots, initial=initial_experts, repack=repack,
                                         n_gpu_layers=n_gpu_layers, staging_buffers=staging_buffers, info=info,
                                         reserved_buffers=reserved, tensor_split=self.placement.tensor_split,
                                         overrides=self.placement.overrides)
        try:
            self.placement.check_built(self.vmodel)
            self._attach_tier()
        except BaseException:
            self.close()  # the model and the RSS probe (Llama.__init__ has not run)
            raise
        self.policy = self._make_policy(policy, scheduler)
        self._stop = threading.Event()
        self.commit_rate = (scheduler or SchedulerConfig()).commit_rate
        self._commit_credit = 0.0
        # The tap asks for router nodes only while `tap.enabled` (policies that score experts).
        # the exact policy also needs the probability nodes: decided by what was asked for, so that a
        # budget change from `full` back to `exact` finds them
        self.full_router = self._full_router()
        self.tap = RouterTap(self.full_router, in_graph=getattr(self.policy, "in_graph", None),
                             probs=self.requested_policy == "exact" or self.max_dropped_mass < 1.0,
                             capture_tokens=self._capture[0], capture_steps=self._capture[1])
        self.tap.enabled = False
        self.tap.stride = (scheduler or SchedulerConfig()).observe_every if policy == "swapmoe" else 1
        try:
            with construct_with(self):
                super().__init__(model_path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch,
                                 n_gpu_layers=n_gpu_layers, logits_all=logits_all, flash_attn=flash_attn,
                                 verbose=verbose, **kwargs)
            self.flash_attn = flash_attn
            self._probe_routing()
            self._setup_streaming()
            prior = (scheduler or SchedulerConfig()).prior_weight > 0 and policy == "swapmoe"
            if initial_experts is None and (policy == "static" or prior):
                self._calibrate(calibration)
            self.tap.enabled = self.policy.observes
            self.warm_tier()
        except BaseException:
            self.close()
            raise
        self._sample_rss()
        log.info("SwapMoE (%s): %d of %d experts per layer resident; %s", policy, self.memory.slots,
                 n_expert, self.memory.parts())

    # the host RAM tier (store/ram_tier.py) -------------------------------------------------
    def _auto_tier(self, info: Any, mem: MemoryPlan, budget: Budget | None, n_gpu_layers: int,
                   threads: int) -> MemoryPlan:
        """With a device budget bounding S below what the host budget admits, the host memory left
        becomes the RAM tier (planning/tiers.py; bandwidths from the cached device profile, if any)."""
        dev = self.placement.device
        host_s = plan_slots(replace(mem, slots=mem.n_expert), budget, None).slots if budget else mem.n_expert
        if dev is None or budget is None or mem.slots >= host_s:
            return mem
        from ..planning.profile import cached_profile
        from ..planning.tiers import split

        prof = cached_profile(info, threads=threads, n_gpu_layers=n_gpu_layers)
        read, up = (prof.read_mb_s, prof.upload_mb_s) if prof else (0.0, 0.0)  # unmeasured: assume it pays
        t = split(replace(mem, slots=host_s), host_limit=budget.resolve(mem.full),
                  device_slots=mem.slots, read_mb_s=read, upload_mb_s=up)
        for r in t.reasons:
            log.info("RAM tier: %s", r)
        return replace(mem, ram_tier=t.ram_tier)

    def _miss_cpu_tokens(self, info: Any, plan: Plan | None, n_gpu_layers: int, threads: int) -> int:
        """From the plan, else from the cached device profile (0 without one, or with slots on the host)."""
        if not (self.placement.offload and n_gpu_layers):
            return 0
        if plan is not None:
            return plan.miss_cpu_tokens
        from ..planning.profile import cached_profile

        prof = cached_profile(info, threads=threads, n_gpu_layers=n_gpu_layers)
        return prof.miss_cpu_tokens() if prof else 0

    def _planned_scheduler(self, info: Any, n_gpu_layers: int,
                           base: SchedulerConfig | None = None) -> SchedulerConfig | None:
        """`base` with the F, Q, scoring stride and commit pacing the planner picks for this S from the
        cached device profile (`swapmoe plan`'s choice); None (keep the scheduler's) without one."""
        from ..planning.planner import scheduler_for
        from ..planning.profile import cached_profile

        slots = self.memory.slots
        if slots >= info.n_expert:
            return None
        prof = cached_profile(info, threads=self._threads, n_gpu_layers=n_gpu_layers)
        if prof is None:
            log.info("no device profile cached for this model: the scheduler's defaults (`swapmoe plan` measures one)")
            return None
        cfg = scheduler_for(prof, slots, len(info.moe_layers), base=base)
        log.info("scheduler planned from the device profile for S=%d: F=%d, Q=%d, scoring every %d token(s), "
                 "%.3g commits per token", slots, cfg.interval, cfg.quota, cfg.observe_every, cfg.commit_rate)
        return cfg

    def _attach_tier(self) -> None:
        """Build the RAM tier (`memory.ram_tier` bytes; in the offload device's pinned host memory where
        it has one) or hand the existing one to a rebuilt model's store."""
        nbytes = self.memory.ram_tier if self.vmodel.slots < self.vmodel.n_expert else 0  # full: nothing to cache
        if self.ram_tier is None and nbytes:
            from ..llamacpp import devices
            from ..llamacpp.host_buffer import allocate

            offload = devices.offload_devices() if self.placement.offload and self._tier_ngl else []
            arena = allocate(nbytes, offload) if offload else None
            self.ram_tier = RamTier(nbytes, self.vmodel.store.max_expert_nbytes,
                                    arena=arena.array if arena else None, release=arena.release if arena else None,
                                    where=arena.where if arena else "host (numpy)")
            self.ram_tier.value = self._tier_value
            log.info("RAM tier: room for %d experts (about %d per MoE layer) in %s, %s", self.ram_tier.n_blocks,
                     self.ram_tier.n_blocks // len(self.vmodel.moe_layers), self.ram_tier.where,
                     fmt(self.ram_tier.capacity))
        self.vmodel.store.attach_tier(self.ram_tier)

    def _tier_value(self, layer: int) -> np.ndarray:
        """What the RAM tier keeps a layer's experts by: the scheduler's importance (0 without one:
        least recently used), the experts in slots lowest (a slot holds them already). [n_expert]"""
        vm = self.vmodel
        sched = getattr(getattr(self, "policy", None), "scheduler", None)
        v = np.array(sched.effective(layer), dtype=np.float64) if sched is not None else np.zeros(vm.n_expert)
        v[list(vm.slot_map[layer])] = -np.inf
        return v

    def warm_tier(self, wait: bool = False) -> None:
        """Fill the RAM tier in the background with the most important experts not in slots (rank S,
        S+1, ... of every layer in turn), then, while blocks are free, the experts in slots (so that one
        swapped out later is still in RAM), until it admits no more. `wait`: until that is done."""
        if self.ram_tier is None:
            return
        vm = self.vmodel
        ranked = {l: self._ranked(l) for l in vm.moe_layers}
        outside = {l: [e for e in r if e not in vm.slot_map[l]] for l, r in ranked.items()}
        inside = {l: [e for e in r if e in vm.slot_map[l]] for l, r in ranked.items()}
        order = [(l, group[l][r]) for group in (outside, inside) for r in range(vm.n_expert)
                 for l in vm.moe_layers if r < len(group[l])]
        vm.store.warm(order)
        if wait:
            vm.store.wait_warm()

    def lossless_ubatch(self) -> int:
        """S // k: a micro-batch this size always fits its experts in the slots. Batches up to it load
        their missing experts into slots (`exact`, the floor); larger ones compute them outside the
        graph, or are cut to this size (no `expert_ffn`)."""
        return max(1, self.vmodel.slots // max(1, self.vmodel.top_k))

    def _setup_streaming(self) -> None:
        """`exact` and the floor: where every MoE layer's FFN is one expert_compute reproduces, a
        prompt runs in one graph and its missing experts outside it; else prompts are cut into
        micro-batches of S // k tokens (their experts always fit), which needs a new context."""
        self.expert_ffn = {}
        if not (self.requested_policy == "exact" or self.max_dropped_mass < 1.0):
            return
        ffn, why = self._expert_ffns()
        if ffn:
            self.expert_ffn = ffn
            return
        ub = self.lossless_ubatch()
        log.info("lossless prompts in micro-batches of S // k = %d tokens: %s", ub, why)
        if self.context_params.n_ubatch > ub:
            self.context_params.n_ubatch = ub
            self._ctx.close()
            self._ctx = HookedContext(runtime=self, model=self._model, params=self.context_params,
                                       verbose=self.verbose)

    def _expert_ffns(self) -> tuple[dict[int, ExpertFFN], str]:
        """Each MoE layer's expert FFN, read off the probed graph, with the router nodes the stream
        path rewrites; ({}, why) when some layer is not reproduced (expert_compute.ffn_spec)."""
        out: dict[int, ExpertFFN] = {}
        finals: dict[int, str] = {}
        for layer in self.vmodel.moe_layers:
            nodes, spec = self.tap.nodes.get(layer, {}), self.full_router.specs[layer]
            if spec.select != "probs":  # (the full model's groups are fine: the slot graph has none, vmodel.py)
                return {}, f"layer {layer} ranks experts by {spec.select}"
            f = ffn_spec(nodes, self.vmodel.info.layer_expert_tensors(layer))
            if isinstance(f, str):
                return {}, f"layer {layer}: {f}"
            final = next((n for n in WEIGHT_NODES if n in nodes), None)
            if final is None or "ffn_moe_out" not in nodes:
                return {}, f"layer {layer}: no expert weights or output node"
            out[layer], finals[layer] = f, final
        self.tap.want("weights", finals)
        self.tap.want("out", {l: "ffn_moe_out" for l in out})
        return out, ""

    def _full_router(self) -> FullRouter:
        vm = self.vmodel
        return FullRouter(vm.router, vm.top_k, bias=vm.router_bias, selection_bias=vm.selection_bias)

    def _probe_routing(self) -> None:
        """Read each MoE layer's gating off llama.cpp's own graph (one token, then forgotten), so that
        the full model's routing is reproduced as llama.cpp computes it (see routing.py)."""
        tok = self.token_bos()
        tok = tok if 0 <= tok < self.n_vocab() else 0
        self.tap.start_probe()
        try:
            self.eval([tok])
        finally:
            info = self.vmodel.info
            self.tap.finish_probe(info.params.n_expert_groups, info.params.n_group_used)
            self.reset()
            self.telemetry_ = Telemetry()
        self.vmodel.check_unused_absent(self.tap.graph_inputs)
        log.debug("routing: %s", {l: s for l, s in self.full_router.specs.items()})

    def _make_policy(self, name: str, cfg: SchedulerConfig | None,
                     scheduler: ImportanceScheduler | None = None) -> ResidencyPolicy:
        vm = self.vmodel
        if name == "swapmoe":
            sched = scheduler
            if sched is None:
                sched = ImportanceScheduler(vm.moe_layers, vm.n_expert, vm.top_k, vm.info.expert_norms,  # type: ignore[arg-type]
                                            cfg or SchedulerConfig())
                if self.calib_rates is not None:  # a live budget change: the calibration already made
                    sched.set_prior(self.calib_rates)
            floor = ExactPolicy(self, self.max_dropped_mass, sched) if self.max_dropped_mass < 1.0 else None
            return SwapMoEPolicy(sched, floor)
        if name == "exact":
            return ExactPolicy(self)
        return StaticPolicy() if name == "static" else FullPolicy()

    def _calibrate(self, text: str | None) -> None:
        """Each layer's top-S experts by importance over a calibration text: `static`'s fixed set, and
        `swapmoe`'s starting set and prior (scheduler.py)."""
        if text is None:
            text = calib_cache.default_calibration_text()
        vm = self.vmodel
        chunk = calib_chunk(self)
        rates = calib_cache.load(vm.info, text, vm.slots, chunk)
        if rates is None:
            toks = self.tokenize(text.encode(), add_bos=True)
            log.info("calibrating on up to %d tokens, at most ~%.0f s (once per model, text and S: cached)",
                     len(toks), CALIB_SECONDS)
            rates = calibrate(self, toks)
            calib_cache.save(vm.info, text, vm.slots, chunk, rates)
        self.calib_rates = rates
        rank = ranking(rates, vm.moe_layers)
        if self.policy_name == "static":
            self.static_rank = rank
        sched = getattr(self.policy, "scheduler", None)
        if sched is not None:
            sched.set_prior(rates)
        for layer, order in rank.items():
            want = order[: self.vmodel.slots]
            slots = self.vmodel.slot_map[layer]
            free = [s for s, e in enumerate(slots) if e not in want]
            for slot, e in zip(free, [e for e in want if e not in slots]):
                self.vmodel.swap(layer, slot, e)
        self.telemetry_ = Telemetry()  # calibration is not part of serving

    # hooks (decoding thread) -------------------------------------------------------------
    def n_ctx_seq(self) -> int:
        """Context of one sequence: n_ctx split between the parallel sequences (unless unified)."""
        return int(llama_cpp.llama_n_ctx_seq(self._ctx.ctx))

    def request_stop(self) -> None:
        """Stop the generation in progress before its next decode step (raises KeyboardInterrupt
        there, out of llama-cpp-python's loop). Safe to call from a signal handler or another thread."""
        self._stop.set()

    def clear_stop(self) -> None:
        """Forget a stop request that arrived after the generation had ended."""
        self._stop.clear()

    def decode_batch(self, batch: llama_cpp.llama_batch, run: Callable[[], None] | None = None) -> None:
        """llama_decode with the runtime's hooks around it (tap, scheduler, swaps, telemetry): for
        callers that build their own batches (the parallel engine)."""
        t_start = time.perf_counter()
        swaps0, copy0 = self.telemetry_.swaps, self.tap.capture_seconds
        if self.tap.pending_steps and not self.tap.will_capture(batch.n_tokens):
            self._flush_tap()  # the steps so far are scored before this one
        self._before_decode()
        self.tap.begin(batch.n_tokens)  # (after the commits: the captured steps' resident sets are known)
        t0 = time.perf_counter()
        try:
            if run is not None:
                run()
            else:
                rc = llama_cpp.llama_decode(self._ctx.ctx, batch)
                if rc == 1:
                    raise ContextFull("no room in the KV cache for this batch")
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc}")
        finally:
            self.tap.end()  # redirected router inputs: pointers back before anything else reads the graph
        t1 = time.perf_counter()
        self._after_decode(batch.n_tokens, t1 - t0)
        if batch.n_tokens == 1:
            t = self.telemetry_
            t.decode_swaps += t.swaps - swaps0
            # the hooks around the decode, and the router inputs the C filter copied inside it
            t.decode_sched_seconds += (t0 - t_start) + (time.perf_counter() - t1) + self.tap.capture_seconds - copy0

    def _before_decode(self) -> None:
        if self._stop.is_set():
            self._stop.clear()
            raise KeyboardInterrupt
        self.policy.before_decode(self)
        if self.pending:  # commit at most `commit_rate` finished swaps per step, on average
            self._commit_credit = min(self._commit_credit + self.commit_rate, max(1.0, self.commit_rate))
            if self._commit_credit >= 1.0 and self._finished:  # (a read finished: no scan of the futures per step)
                if self.tap.pending_steps and not self.policy.owns_hit_rate:
                    if self.tap.pending_aligned:  # each step's hits count against the experts it ran with
                        self._hit_masks.append((self.tap.pending_steps, self.vmodel.resident_mask.copy()))
                    else:
                        self._flush_tap()
                self._commit_credit -= self.apply_pending(limit=int(self._commit_credit))

    def _after_decode(self, n_tokens: int, seconds: float) -> None:
        if self.tap.error is not None:
            err, self.tap.error = self.tap.error, None
            if isinstance(err, KeyboardInterrupt):  # Ctrl-C landed in the callback: deliver it here
                raise err
            raise RuntimeError(f"router tap failed: {err}") from err
        t = self.telemetry_
        t.tokens += n_tokens
        if n_tokens == 1:
            t.decode_tokens += 1
            t.decode_seconds += seconds
        else:
            t.prefill_tokens += n_tokens
            t.prefill_seconds += seconds
        batch = self.tap.take()
        if batch is not None:
            self._observe(batch)
        elif self.tap.pending_steps and self.policy.scores_due(self):
            self._flush_tap()
        self._sample_rss()

    def _flush_tap(self) -> None:
        """Score the decode steps the router tap gathered (with the resident sets they ran with)."""
        entries, self._hit_masks = self._hit_masks, []
        sink = getattr(self.policy, "score_sink", None)
        masks = None
        # (steps not aligned: a commit flushed them first, so `entries` is empty and one mask serves all)
        if sink is not None and not self.policy.owns_hit_rate and (self.tap.pending_aligned or not entries):
            masks = token_masks(entries, self.vmodel.resident_mask, self.tap.pending_steps)
        batch = self.tap.flush(sink if masks is not None else None, masks)
        if batch is None:
            return
        if batch.hits is not None:
            self.telemetry_.add_hit_sums(batch.hits.mass, batch.hits.count)
            self.policy.on_router(self, batch)
        else:
            self._observe(batch, entries)

    def _observe(self, batch: RouterBatch, masks: list[tuple[int, np.ndarray]] = ()) -> None:  # type: ignore[assignment]
        """Hand the full model's routing to the hit counter and the policy."""
        if not self.policy.owns_hit_rate:
            self._add_hits(batch, masks)
        self.policy.on_router(self, batch)

    def _add_hits(self, batch: RouterBatch, masks: list[tuple[int, np.ndarray]] = ()) -> None:  # type: ignore[assignment]
        """Share of the full model's expert weight on resident experts, every scored token and layer.
        `masks`: (step, resident mask) where swaps were committed during the gathered decode steps:
        the steps before `step` (since the previous entry) ran with that mask."""
        mask = self.vmodel.resident_mask                                                  # [n_moe_layer, n_expert]
        shares = []
        for g in batch.groups:
            if masks:
                m = np.empty((len(g.rows), g.n_tokens, mask.shape[1]), dtype=bool)       # [G, n, n_expert]
                start = 0
                for end, old in [*masks, (g.n_tokens, mask)]:
                    m[:, start:end] = old[g.rows][:, None, :]
                    start = end
                m = m.reshape(-1, mask.shape[1])
            else:
                m = np.repeat(mask[g.rows], g.n_tokens, axis=0)
            shares.append(hit_shares(g.routed, m))
        self.telemetry_.add_hits(np.concatenate(shares) if len(shares) > 1 else shares[0])

    def _sample_rss(self) -> int:
        rss = self._rss()
        self.telemetry_.peak_rss_bytes = max(self.telemetry_.peak_rss_bytes, rss)
        return rss

    # swaps ---------------------------------------------------------------------------------
    def request_swap(self, layer: int, slot: int, expert: int) -> None:
        """Start reading `expert` for `slot` of `layer` in the background; committed between decodes."""
        if any(l == layer and s == slot for l, s, _, _ in self.pending):
            return
        fut = self.vmodel.store.submit(layer, expert)
        fut.add_done_callback(self._finished.append)  # (deque.append: safe from the read thread)
        self.pending.append((layer, slot, expert, fut))

    def apply_pending(self, wait: bool = False, limit: int | None = None) -> int:
        """Commit the swaps whose reads have finished (all of them if `wait`; at most `limit`).
        Never raises on I/O errors."""
        done, keep = 0, []
        t0 = time.perf_counter()
        self._finished.clear()
        for layer, slot, expert, fut in self.pending:
            if not (wait or fut.done()) or (limit is not None and done >= limit):
                if fut.done():  # finished, left for a later step
                    self._finished.append(fut)
                keep.append((layer, slot, expert, fut))
                continue
            try:
                staged = fut.result()
            except ExpertReadError:
                self.telemetry_.swap_failures += 1
                continue
            try:
                self.vmodel.commit(slot, staged)
            finally:
                self.vmodel.store.release(staged)
            self.telemetry_.swaps += 1
            done += 1
        if wait:
            self.telemetry_.io_blocked_seconds += time.perf_counter() - t0
        self.pending = keep
        return done

    # budget changes ------------------------------------------------------------------------
    def set_budget(self, memory_budget: str | Budget | None, experts_per_layer: int | None = None) -> int:
        """Change the memory budget of the running model; returns the new slot count S.

        llama.cpp fixes the slot count when it builds a model, so a different S rebuilds it: the
        old context and model are freed first (memory never holds both), a new model is built with
        the S most important experts (scheduler scores, else the current set and weight norms) and a
        new context takes the old one's place. Cost: reading the non-expert weights and S experts
        per layer again, and the KV cache (the conversation is re-evaluated on the next request).
        """
        budget = parse_budget(memory_budget) if isinstance(memory_budget, str) else memory_budget
        vm = self.vmodel
        mem0 = estimate(vm.info, n_ctx=self.n_ctx(), n_batch=self.n_batch, logits_all=self._logits_all,
                        staging_buffers=vm.store.staging_buffers + vm.store.reserved, baseline=self.memory.baseline,
                        flash_attn=self.flash_attn,
                        streams=self.requested_policy == "exact" or self.max_dropped_mass < 1.0,
                        capture_tokens=self._capture[0] * self._capture[1], ram_tier=self.memory.ram_tier)
        new = plan_slots(mem0, budget, experts_per_layer)
        dev = self.placement.device
        if dev is not None and new.slots > dev.max_slots(vm.n_expert):  # --vram-budget still holds
            cap = dev.max_slots(vm.n_expert)
            if experts_per_layer is not None:
                raise BudgetError(f"{experts_per_layer} experts per layer: --vram-budget {fmt(dev.limit or 0)} admits "
                                  f"at most {cap} on the device")
            log.info("--vram-budget %s: %d experts per layer on the device (the host budget admits %d)",
                     fmt(dev.limit or 0), cap, new.slots)
            new = dataclasses.replace(new, slots=cap)
        self.budget_bytes = budget.resolve(mem0.full) if budget else None
        if new.slots == vm.slots:
            self.memory = new
            return new.slots
        self._flush_tap()  # the scores the new set is chosen by
        initial = {l: self._ranked(l)[: new.slots] for l in vm.moe_layers}
        self.apply_pending(wait=True)
        path, ngl = str(vm.info.path), self.model_params.n_gpu_layers
        staging = vm.store.staging_buffers
        self._ctx.close()
        vm.close()
        release_memory()
        self.vmodel = VirtualExpertModel(path, new.slots, initial=initial, n_gpu_layers=ngl, staging_buffers=staging,
                                         repack=self.repack, reserved_buffers=vm.store.reserved,
                                         tensor_split=self.placement.tensor_split, overrides=self.placement.overrides)
        self._attach_tier()  # the same file: what the tier holds stays valid
        self._model.model = self.vmodel.model
        self._model.vocab = llama_cpp.llama_model_get_vocab(self.vmodel.model)
        if (self.requested_policy == "exact" or self.max_dropped_mass < 1.0) and not self.expert_ffn:
            self.context_params.n_ubatch = self.lossless_ubatch()
        self._ctx = HookedContext(runtime=self, model=self._model, params=self.context_params, verbose=self.verbose)
        specs = self.full_router.specs
        self.full_router = self._full_router()
        self.full_router.specs = specs  # the same file: the same gating
        self.tap.router = self.full_router
        self.memory = new
        name = "full" if new.slots == self.vmodel.n_expert else (
            "swapmoe" if self.requested_policy == "full" else self.requested_policy)
        if name != self.policy_name or getattr(self.policy, "in_graph", None) is not None:  # per-slot state
            keep = getattr(self.policy, "scheduler", None)
            self.policy = self._make_policy(name, keep.config if keep else None, keep)
            self.tap.in_graph = getattr(self.policy, "in_graph", None)
            self.policy_name = name
        sched = getattr(self.policy, "scheduler", None)
        if self._scheduler_auto and name == "swapmoe" and sched is not None:  # F and Q planned for the new S
            cfg = self._planned_scheduler(self.vmodel.info, ngl, base=sched.config)
            if cfg is not None:
                sched.config, self.commit_rate, self.tap.stride = cfg, cfg.commit_rate, cfg.observe_every
        self.tap.enabled = self.policy.observes
        self.reset()
        self.n_tokens = 0
        self.warm_tier()
        log.info("budget changed: %d of %d experts per layer now resident", new.slots, self.vmodel.n_expert)
        return new.slots

    def _ranked(self, layer: int) -> list[int]:
        """Experts of a layer, most important first (scheduler scores, then residency, then norms)."""
        vm = self.vmodel
        if self.static_rank is not None:  # static: the calibration's order, whatever S is
            return list(self.static_rank[layer])
        sched = getattr(self.policy, "scheduler", None)
        score = sched.effective(layer) if sched is not None else np.zeros(vm.n_expert)
        norms = vm.info.expert_norms[vm.moe_layers.index(layer)]  # type: ignore[index]
        resident = set(vm.slot_map[layer])
        return sorted(range(vm.n_expert), key=lambda e: (-score[e], e not in resident, -norms[e]))

    # reporting -----------------------------------------------------------------------------
    def score_pending(self) -> None:
        """Score the decode steps the router tap has gathered but not yet scored (at most one update
        interval: the scheduler acts every F steps), so that `telemetry()`'s hit rate counts them.
        On the decoding thread only (`telemetry()` may be read from any thread, so it does not)."""
        self._flush_tap()

    def telemetry(self) -> TelemetrySnapshot:
        """Counters so far (the hit rate lags by the decode steps not yet scored: `score_pending`)."""
        st, t = self.vmodel.store.stats, self.telemetry_
        return TelemetrySnapshot(
            resident={l: tuple(v) for l, v in self.vmodel.slot_map.items()}, slots=self.vmodel.slots,
            swaps=t.swaps, swap_failures=t.swap_failures, bytes_read=st.bytes_read, read_seconds=st.read_seconds,
            io_blocked_seconds=t.io_blocked_seconds, tokens=t.tokens, decode_tokens=t.decode_tokens,
            decode_seconds=t.decode_seconds, prefill_tokens=t.prefill_tokens, prefill_seconds=t.prefill_seconds,
            hit_rate=1.0 if self.vmodel.slots == self.vmodel.n_expert else t.hit_rate,
            rss_bytes=self._sample_rss(), peak_rss_bytes=t.peak_rss_bytes, budget_bytes=self.budget_bytes,
            decode_swaps=t.decode_swaps, decode_sched_seconds=t.decode_sched_seconds,
            device_bytes=self.placement.device_bytes(self.vmodel),
            vram_budget_bytes=self.placement.device.limit if self.placement.device else None,
            ram_tier_bytes=self.ram_tier.capacity if self.ram_tier else 0,
            ram_tier_experts=len(self.ram_tier) if self.ram_tier else 0, tier_hits=st.tier_hits)

    def close(self) -> None:
        # Queued reads are cancelled; finished ones give their buffers back; the one running (if any)
        # gets a bounded wait: at interpreter exit the read thread may already be frozen.
        pending = getattr(self, "pending", ())
        for *_, fut in pending:
            fut.cancel()
        for *_, fut in sorted(pending, key=lambda p: not p[3].done()):
            if not fut.cancelled():
                with contextlib.suppress(Exception):
                    self.vmodel.store.release(fut.result(timeout=5))
        self.pending = []
        if hasattr(self, "_stack"):  # Llama.__init__ ran
            super().close()
        if hasattr(self, "tap"):  # (after the context: its graph may point into the tap's areas)
            self.tap.close()
        if hasattr(self, "vmodel"):
            self.vmodel.close()
        if getattr(self, "ram_tier", None) is not None:  # after the store: nothing reads it any more
            self.ram_tier.close()
            self.ram_tier = None
        if hasattr(self, "_rss"):
            self._rss.close()


__all__ = ["SwapMoELlama", "ResidencyPolicy", "BudgetError", "SchedulerConfig", "release_memory"]
