"""Profiling-guided planner: a memory budget and a device profile -> S, F, Q.

S (experts per layer) is the largest slot count the budget admits (whole-process accounting,
`budget.py`). What swapmoe adds to a decode step over `static` (the pruned model) is planned within
OVERHEAD_SHARE = 3 % of it: first scoring the routers, then swaps get the rest. Measured, swaps cost
more than the profile's estimate (the commits' memory traffic slows the steps after them; reads from
disk compete for memory and cores), so 3 % planned is what keeps swapmoe at >= 0.95x `static`'s
decode speed on the 2-vCPU VMs of docs/bench.md (4 % planned measured 0.92-0.96x there).

Scoring (`t_tap` per layer, measured on the runtime's own path: router inputs the graph writes into
the tap's capture area, scored in one C call per F steps) is paid on every token. Only where
scoring every layer would itself exceed STAGGER_SHARE of a step is each layer scored on every o-th
token (staggered; the smallest o that fits, and F >= SAMPLES * o so every update sees enough tokens):
staggering has fixed costs of its own, so it never pays for a cheap tap.

F (update interval, tokens) and Q (swaps per layer per update) are then chosen so that

    I/O thread:  Q * n_moe_layers * t_read   <= IO_SHARE * F * t_decode   (reads overlap decoding)
    decode side: Q * n_moe_layers * t_swap   <= (OVERHEAD_SHARE - scoring share) * F * t_decode
                 (what a swap adds to decoding: its commit between steps plus the read competing for
                 cores and memory, measured by the profile; at least MIN_COMMIT_SHARE)

Among the (F, Q) pairs that satisfy both, the one with the highest swap capacity Q/F wins (the
scheduler adapts fastest), ties going to the smaller F. A slow disk therefore raises F and lowers Q.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..base.errors import SwapMoEError
from ..fileformat.info import GGUFInfo
from ..residency.budget import (Budget, BudgetError, MemoryPlan, estimate, fmt, parse_ram_tier, plan_slots,
                                ram_tier_bytes)
from ..residency.scheduler import SchedulerConfig
from .profile import DeviceProfile, model_fingerprint
from .tiers import split_from_profile

IO_SHARE = 0.5          # the read thread may be busy half of the decode time
OVERHEAD_SHARE = 0.03   # scoring plus swaps may add at most 3 % to a decode step (>= 0.95x `static`, measured)
STAGGER_SHARE = 0.05    # layers scored on every o-th token only where scoring all would cost more
MIN_COMMIT_SHARE = 0.01  # swaps get at least this much, whatever scoring costs
SAMPLES = 8           # scored tokens per layer per update window, at least
INTERVALS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PLAN_VERSION = 1


class PlanError(SwapMoEError):
    pass


@dataclass(frozen=True)
class Plan:
    version: int
    model: str
    fingerprint: str
    policy: str
    budget_bytes: int | None
    n_ctx: int
    threads: int
    experts_per_layer: int
    n_expert: int
    interval: int              # F
    quota: int                 # Q (per layer per update)
    decay: float
    margin: float
    expected_tok_s: float
    swaps_per_token: float     # upper bound: Q * n_moe_layers / F
    io_share: float            # read-thread busy share of decode time at full quota
    commit_share: float
    memory: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    observe_every: int = 1
    commit_rate: float = 1.0   # commits per decode step on average (paces a prefill's burst of swaps)
    max_dropped_mass: float = 1.0  # swapmoe's quality floor τ (floor_tuning.py picks it from a target)
    ram_tier_bytes: int = 0    # host RAM tier below the slots (tiers.py); the runtime's --ram-tier default
    miss_cpu_tokens: int = 0   # slots on a device: misses of up to this many tokens per expert are faster
                               # computed on the CPU from RAM than uploaded (profile); 0: upload

    @property
    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(decay=self.decay, interval=self.interval, quota=self.quota, margin=self.margin,
                               observe_every=self.observe_every, commit_rate=self.commit_rate)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> "Plan":
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise TypeError("expected a JSON object")
            if d.get("version") != PLAN_VERSION:
                raise PlanError(f"{source}: plan format {d.get('version')!r}, this build reads {PLAN_VERSION}")
            return cls(**d)
        except (ValueError, TypeError) as e:
            raise PlanError(f"{source}: not a swapmoe plan ({e})") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Plan":
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise PlanError(f"{path}: cannot read plan: {e.strerror or e}") from None
        return cls.from_json(text, str(path))

    def check_model(self, model_path: str | os.PathLike[str]) -> None:
        """Refuse a plan made for another model or for an earlier version of this file."""
        fp = model_fingerprint(model_path)
        if fp != self.fingerprint:
            same = Path(model_path).resolve() == Path(self.model)
            why = "the file changed since the plan was made" if same else f"the plan was made for {self.model}"
            raise PlanError(f"plan does not match {model_path}: {why} (fingerprint {self.fingerprint} != {fp}); "
                            "run `swapmoe plan` again")


def choose_observe(prof: DeviceProfile, t_dec: float, n_moe_layers: int) -> int:
    """Score each layer on every o-th token: the smallest o whose scoring cost fits STAGGER_SHARE."""
    return next((o for o in INTERVALS if n_moe_layers / o * prof.tap_ms <= STAGGER_SHARE * t_dec), INTERVALS[-1])


def scoring_share(prof: DeviceProfile, t_dec: float, n_moe_layers: int, observe: int) -> float:
    """What scoring the routers adds to a decode step, as a share of it."""
    return n_moe_layers / observe * prof.tap_ms / t_dec


def choose_interval_quota(prof: DeviceProfile, slots: int, n_moe_layers: int, min_interval: int = 1,
                          tier_hit: float = 0.0, commit_limit: float = OVERHEAD_SHARE) -> tuple[int, int, float, float]:
    """`tier_hit`: share of swaps the RAM tier serves (no read on the I/O thread for those);
    `commit_limit`: the share of a decode step swaps may add."""
    t_dec = prof.decode_ms_at(slots)
    read_ms = prof.read_ms * (1.0 - tier_hit)
    best: tuple[float, int, int] | None = None
    for f in (f for f in INTERVALS if f >= min(min_interval, INTERVALS[-1])):
        for q in range(1, slots + 1):
            io = q * n_moe_layers * read_ms / (f * t_dec)
            commit = q * n_moe_layers * prof.swap_cost_ms / (f * t_dec)
            if io <= IO_SHARE and commit <= commit_limit:
                cap = q / f
                if best is None or cap > best[0] + 1e-12:
                    best = (cap, f, q)
    if best is None:  # even one swap every 256 tokens is not hidden: swap rarely, one at a time
        f, q = INTERVALS[-1], 1
    else:
        _, f, q = best
    return (f, q, q * n_moe_layers * read_ms / (f * t_dec), q * n_moe_layers * prof.swap_cost_ms / (f * t_dec))


def schedule_for(prof: DeviceProfile, slots: int, n_moe_layers: int,
                 tier_hit: float = 0.0) -> tuple[int, int, int, float, float, float]:
    """The planner's scheduling for S = `slots` on this device: (observe_every, F, Q, read-thread share,
    commit share, commits per token)."""
    t_dec = prof.decode_ms_at(slots)
    observe = choose_observe(prof, t_dec, n_moe_layers)
    limit = commit_limit(prof, t_dec, n_moe_layers, observe)
    f, q, io, commit = choose_interval_quota(prof, slots, n_moe_layers, min_interval=SAMPLES * observe,
                                             tier_hit=tier_hit, commit_limit=limit)
    # Commits are paced at the planned rate, so a burst proposed after a prompt costs what F/Q allow.
    rate = round(min(1.0, q * n_moe_layers / f), 4) if q else 1.0
    return observe, f, q, io, commit, rate


def commit_limit(prof: DeviceProfile, t_dec: float, n_moe_layers: int, observe: int) -> float:
    """The share of a decode step swaps may add: what scoring leaves of OVERHEAD_SHARE (at least MIN_COMMIT_SHARE)."""
    return max(MIN_COMMIT_SHARE, OVERHEAD_SHARE - scoring_share(prof, t_dec, n_moe_layers, observe))


def scheduler_for(prof: DeviceProfile, slots: int, n_moe_layers: int, tier_hit: float = 0.0,
                  base: SchedulerConfig | None = None) -> SchedulerConfig:
    """`base` (default: the scheduler's defaults) with F, Q, the scoring stride and the commit pacing
    the planner picks for S on this device (what `swapmoe plan` writes, without a budget)."""
    observe, f, q, _, _, rate = schedule_for(prof, slots, n_moe_layers, tier_hit)
    return replace(base or SchedulerConfig(), interval=f, quota=q, observe_every=observe, commit_rate=rate)


def make_plan(info: GGUFInfo, prof: DeviceProfile, budget: Budget | None, *, n_ctx: int, threads: int,
              experts_per_layer: int | None = None, baseline: int | None = None,
              decay: float = SchedulerConfig.decay, margin: float = SchedulerConfig.margin,
              device_slots: int | None = None, ram_tier: int | Budget | None = None,
              host_free: int | None = None) -> Plan:
    """`device_slots`: S as a device budget bounds it (`device_slots_for`; None: slots in host memory).
    `ram_tier`: the RAM tier as given (bytes, or --ram-tier's SIZE/%; None: split from the profile's
    bandwidths, tiers.py)."""
    mem0 = estimate(info, n_ctx=n_ctx, n_batch=min(n_ctx, 512), baseline=baseline)
    if ram_tier is not None:  # a tier asked for: it comes out of the host budget first
        ram_tier = ram_tier_bytes(parse_ram_tier(ram_tier), mem0)
        mem0 = replace(mem0, ram_tier=ram_tier)
    mem: MemoryPlan = plan_slots(mem0, budget, experts_per_layer)
    n, k, layers = info.n_expert, info.params.n_expert_used, len(info.moe_layers)
    host_s = mem.slots
    tier = split_from_profile(replace(mem, ram_tier=0), prof, host_limit=budget.resolve(mem.full) if budget else None,
                              device_slots=device_slots, ram_tier=ram_tier, host_free=host_free)
    mem = replace(mem, slots=tier.slots, ram_tier=tier.ram_tier)
    s = mem.slots
    reasons = [f"memory: {fmt(mem.total())} = {mem.parts()}"]
    if budget is not None:
        reasons.append(f"budget {fmt(budget.resolve(mem.full))} admits {host_s} of {n} experts per layer "
                       f"(each slot costs {fmt(mem.per_slot)} across {layers} MoE layers)")
    if device_slots is not None and s < host_s:
        reasons.append(f"the device budget admits {s} experts per layer in slots")
    reasons += tier.reasons
    miss_cpu = prof.miss_cpu_tokens() if prof.n_gpu_layers else 0
    if prof.n_gpu_layers and prof.cpu_expert_ms:
        cpu = ", ".join(f"{v:.2f} ms for {t} token{'s' * (t > 1)}" for t, v in sorted(prof.cpu_expert_ms.items()))
        reasons.append(f"a missing expert: computed on the CPU from RAM in {cpu}; uploaded in {prof.commit_ms:.2f} "
                       "ms: " + (f"misses of up to {miss_cpu} tokens per expert are faster on the CPU" if miss_cpu
                                 else "uploading is faster"))
    if s == n:
        policy, f, q, io, commit, observe = "full", INTERVALS[-1], 0, 0.0, 0.0, 1
        reasons.append("everything fits: running the full model (no swapping)")
        t_dec = prof.decode_ms_at(s)
    else:
        policy = "swapmoe"
        t_dec = prof.decode_ms_at(s)
        observe, f, q, io, commit, rate = schedule_for(prof, s, layers, tier.hit_share)
        reasons.append(f"one expert: read {prof.read_ms:.2f} ms ({prof.read_mb_s:.0f} MB/s), commit "
                       f"{prof.commit_ms:.2f} ms; one swap adds {prof.swap_cost_ms:.2f} ms to decoding; scoring "
                       f"one layer's router adds {prof.tap_ms:.2f} ms; decode {t_dec:.2f} ms/token at S={s}")
        limit = commit_limit(prof, t_dec, layers, observe)
        reasons.append(f"scoring the routers adds {scoring_share(prof, t_dec, layers, observe):.1%} to decoding"
                       + (f" with each layer scored on every {observe}th token (staggered: all of them every token "
                          f"would cost more than {STAGGER_SHARE:.0%}); F >= {SAMPLES * observe} so each update sees "
                          f">= {SAMPLES} tokens per layer" if observe > 1 else "")
                       + f"; swaps may add {limit:.1%} (together at most {OVERHEAD_SHARE:.0%})")
        if tier.hit_share > 0:
            reasons.append(f"with ~{tier.hit_share:.0%} of swaps served by the RAM tier, the read thread reads "
                           f"{1 - tier.hit_share:.0%} of them from disk")
        reasons.append(f"F={f}, Q={q}: up to {q * layers} swaps every {f} tokens keep the read thread busy "
                       f"{io:.0%} of decode time (limit {IO_SHARE:.0%}) and add {commit:.1%} to decoding "
                       f"(limit {limit:.1%})")
        if s == k:
            reasons.append(f"S equals top-k ({k}): every token's experts come from the resident set only")
    if policy != "swapmoe":
        rate = 1.0
    if rate < 1.0:
        reasons.append(f"commits paced at {rate:g} per token (one every {1 / rate:.1f} tokens), also after a prompt")
    tok_s = 1e3 / (t_dec * (1 + commit + layers / observe * prof.tap_ms / t_dec * (policy == "swapmoe")))
    return Plan(PLAN_VERSION, str(info.path.resolve()), model_fingerprint(info.path), policy,
                budget.resolve(mem.full) if budget else None, n_ctx, threads, s, n, f, q, decay, margin,
                round(tok_s, 2), round(q * layers / f, 4), round(io, 4), round(commit, 4),
                {"baseline": mem.baseline, "non_expert": mem.non_expert, "rows": mem.rows, "kv_cache": mem.kv_cache,
                 "compute": mem.compute, "staging": mem.staging, "per_slot": mem.per_slot, "ram_tier": mem.ram_tier,
                 "total": mem.total()},
                reasons, observe_every=observe, commit_rate=rate, ram_tier_bytes=mem.ram_tier,
                miss_cpu_tokens=miss_cpu)


def device_slots_for(info: GGUFInfo, mem: MemoryPlan, *, n_gpu_layers: int, vram_budget: Budget,
                     total_device: int, experts_per_layer: int | None = None) -> int | None:
    """S as `--vram-budget` bounds it on the offload devices (None: no expert on a device)."""
    from ..residency.device_budget import device_plan, fit_device

    dplan = device_plan(info, mem, n_gpu_layers=n_gpu_layers, slots=mem.n_expert)
    if dplan.per_slot == 0:
        return None
    return fit_device(dplan, vram_budget, total_device=total_device, top_k=mem.top_k, n_expert=mem.n_expert,
                      experts_per_layer=experts_per_layer).slots


def render(plan: Plan) -> str:
    rows = [
        ("model", plan.model), ("policy", plan.policy),
        ("experts per layer (S)", f"{plan.experts_per_layer} of {plan.n_expert}"),
        ("update interval (F)", f"{plan.interval} tokens"), ("swap quota (Q)", f"{plan.quota} per layer per update"),
        ("memory", f"{fmt(plan.memory['total'])}" + (f" of {fmt(plan.budget_bytes)} budget" if plan.budget_bytes else "")),
        ("RAM tier", f"{fmt(plan.ram_tier_bytes)}" if plan.ram_tier_bytes else "none"),
        ("expected decode", f"{plan.expected_tok_s:.1f} tok/s"),
        ("quality floor (τ)", "none (1)" if plan.max_dropped_mass >= 1 else f"{plan.max_dropped_mass:g}"),
        ("swaps per token (max)", f"{plan.swaps_per_token:g}"),
        ("I/O share of a token", f"{plan.io_share:.1%} read thread, {plan.commit_share:.1%} commit"),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k + ':':<{w + 1}} {v}" for k, v in rows]
    return "\n".join(lines + ["", "why:"] + [f"  - {r}" for r in plan.reasons])


__all__ = ["Plan", "PlanError", "make_plan", "render", "choose_interval_quota", "schedule_for", "scheduler_for",
           "device_slots_for", "BudgetError"]
