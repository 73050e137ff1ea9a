"""Memory budgets: parse `--memory-budget`, account for the whole process, derive the slot count S.

The budget covers the process's resident memory, interpreter included:

    total(S) = process baseline (measured RSS now: interpreter, numpy, llama.cpp libraries)
             + non-expert weights + router rows kept in RAM + KV cache + compute and output buffers
             + staging buffers for in-flight swaps + the RAM tier (--ram-tier, experts cached below
               the slots: store/ram_tier.py) + S * (one expert in every MoE layer)

Compute buffers are estimated from the graph's largest intermediates (llama.cpp sizes them at
context creation); the estimate is deliberately generous and checked by measured peak RSS in the
tests. A percentage budget is relative to total(n_expert), what the process needs with every
expert resident.
"""
from __future__ import annotations

import math

import re
from dataclasses import dataclass

import psutil

from ..base.errors import SwapMoEError
from ..fileformat.info import GGUFInfo

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000 ** 4, "tib": 1 << 40}
_BUDGET = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*|%)\s*$")


class BudgetError(SwapMoEError):
    pass


@dataclass(frozen=True)
class Budget:
    """Either an absolute byte count or a percentage of the all-experts footprint."""

    nbytes: int | None = None
    percent: float | None = None

    def resolve(self, full_bytes: int) -> int:
        return self.nbytes if self.nbytes is not None else int(full_bytes * self.percent / 100.0)  # type: ignore[operator]

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else fmt(self.nbytes or 0)


def parse_budget(text: str) -> Budget:
    """'3GiB', '3G' (GiB, as llama.cpp and most tools mean it), '3000MiB', '3GB' (10^9), '75%'."""
    m = _BUDGET.match(str(text))
    if not m:
        raise BudgetError(f"cannot parse memory budget {text!r}; expected e.g. 3GiB, 3G, 3000MiB or 75%")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "%":
        if not 0 < value <= 100:
            raise BudgetError(f"memory budget {text!r}: a percentage must be in (0, 100]")
        return Budget(percent=value)
    if unit not in _UNITS:
        raise BudgetError(f"memory budget {text!r}: unknown unit {m.group(2)!r}; use KiB, MiB, GiB, TiB (or K, M, G, T) or %")
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise BudgetError(f"memory budget {text!r} must be positive")
    return Budget(nbytes=n)


def fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


@dataclass(frozen=True)
class MemoryPlan:
    """What the process needs, part by part, and the slot count that fits."""

    baseline: int      # measured process RSS before the model is built
    non_expert: int    # weights that are always resident
    rows: int          # router (+ per-expert bias) rows kept whole in RAM, raw and as f32
    kv_cache: int
    compute: int       # compute + logits/output buffers (estimate)
    staging: int       # buffers for swaps in flight
    per_slot: int      # one expert in every MoE layer
    slots: int
    n_expert: int
    top_k: int
    ram_tier: int = 0  # host RAM tier capacity (store/ram_tier.py)

    @property
    def fixed(self) -> int:
        return (self.baseline + self.non_expert + self.rows + self.kv_cache + self.compute + self.staging
                + self.ram_tier)

    def total(self, slots: int | None = None) -> int:
        return self.fixed + (self.slots if slots is None else slots) * self.per_slot

    @property
    def full(self) -> int:
        """What the process needs with every expert resident (no RAM tier: nothing left to cache):
        what a percentage budget is a percentage of."""
        return self.fixed - self.ram_tier + self.n_expert * self.per_slot

    def parts(self, slots: int | None = None) -> str:
        n = self.slots if slots is None else slots
        return (f"process {fmt(self.baseline)} + non-expert weights {fmt(self.non_expert)} + router rows "
                f"{fmt(self.rows)} + KV cache {fmt(self.kv_cache)} + compute buffers {fmt(self.compute)} + "
                f"staging {fmt(self.staging)} + " + (f"RAM tier {fmt(self.ram_tier)} + " if self.ram_tier else "")
                + f"{n} experts x {fmt(self.per_slot)}")


def estimate(info: GGUFInfo, *, n_ctx: int, n_batch: int, n_ubatch: int | None = None, logits_all: bool = False,
             staging_buffers: int = 2, baseline: int | None = None, kv_bytes_per_elem: int = 2,
             flash_attn: bool = True, streams: bool = False, capture_tokens: int = 9,
             ram_tier: int = 0) -> MemoryPlan:
    p = info.params
    n_ub = min(n_ubatch or n_batch, n_batch)
    per_layer = {l: sum(t.expert_nbytes for t in info.layer_expert_tensors(l)) for l in info.moe_layers}
    rows = sum(t.nbytes for t in info.tensors if t.block in per_layer and ".ffn_gate_inp." in t.name)
    rows += 4 * p.n_expert * p.n_embd * len(per_layer)  # f32 copy of the full router
    kv = n_ctx * p.n_layer * p.n_head_kv * (p.n_embd_head_k + p.n_embd_head_v) * kv_bytes_per_elem
    # Largest live graph intermediates for one micro-batch (attention scores without flash attention,
    # top-k expert activations, hidden states, logits), plus the logits kept by llama.cpp and by
    # llama-cpp-python's `scores` array. Calibrated against measured peak RSS (README): the graph
    # allocator reuses memory, so the sum of these terms is close to llama.cpp's compute buffer;
    # +15 % and 8 MiB cover allocator slack and Python objects created while serving.
    # Without flash attention the scores are materialised ([n_head, n_ctx] per token); with it,
    # llama.cpp still keeps per-token work over the context (mask, f16 conversions): 2 floats per
    # cell covers what we measured at 2k-4k contexts.
    scores = 2 * n_ctx if flash_attn else p.n_head * n_ctx
    inter = 4 * n_ub * (scores + 3 * p.n_expert_used * p.n_ff_exp + 8 * p.n_embd + p.n_vocab)
    outputs = 4 * p.n_vocab * ((n_ctx if logits_all else n_batch) + n_batch)
    # The router tap copies each MoE layer's router input of a micro-batch to numpy (all layers of
    # one decode call are held until it returns) and scores it: logits, softmax and temporaries.
    tap = 4 * n_ub * len(per_layer) * (p.n_embd + 4 * p.n_expert)
    # ... and keeps the decode steps' inputs the C filter gathers between two scorings: `capture_tokens`
    # rows per MoE layer (F + 1 steps of up to one token per parallel sequence, RouterTap)
    tap += 4 * capture_tokens * len(per_layer) * p.n_embd
    # `exact` and the floor compute a prompt's missing experts outside the graph (`streams`): per
    # expert its input rows, gate/up/activation and output, then the layer's output read, summed and
    # written back (policies.ExactPolicy, expert_compute.py), plus ggml's graph overhead
    stream = 4 * n_ub * (6 * p.n_embd + 4 * p.n_ff_exp) + (2 << 20) if streams else 0
    compute = int(1.15 * inter) + outputs + tap + stream + (8 << 20)
    return MemoryPlan(
        baseline=psutil.Process().memory_info().rss if baseline is None else baseline,
        non_expert=info.non_expert_bytes, rows=rows, kv_cache=kv, compute=compute,
        staging=(staging_buffers + _repack_scratch(info)) * max(per_layer.values()), per_slot=sum(per_layer.values()),
        slots=p.n_expert, n_expert=p.n_expert, top_k=p.n_expert_used, ram_tier=ram_tier)


def parse_ram_tier(text: str | int | Budget) -> Budget:
    """--ram-tier: SIZE ('2GiB', as --memory-budget), a percentage of all the model's experts
    ('25%': a quarter of them kept in host memory), or 0 / off (no tier)."""
    if isinstance(text, Budget):
        return text
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise BudgetError(f"--ram-tier must be >= 0 bytes, got {text}")
        return Budget(nbytes=text)
    t = str(text).strip().lower()
    if t in ("0", "off", "none", "0%", "0b"):
        return Budget(nbytes=0)
    try:
        return parse_budget(t)
    except BudgetError:
        raise BudgetError(f"--ram-tier {text!r}: expected a size (512MiB, 2GiB), a percentage of the model's "
                          "experts (25%) or 0 for none") from None


def ram_tier_bytes(spec: Budget, mem: MemoryPlan) -> int:
    """The tier's bytes: a size as given, a percentage of all experts (n_expert x per_slot)."""
    return spec.resolve(mem.n_expert * mem.per_slot)


def _repack_scratch(info: GGUFInfo) -> int:
    """Experts' worth of scratch the CPU repack path keeps (repack.py: one expert tensor per type and
    shape, together at most one expert): 1 when an expert tensor has a type ggml-cpu may repack."""
    from gguf import GGMLQuantizationType as Q

    repackable = {Q.Q4_0, Q.Q8_0, Q.Q2_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.MXFP4}
    return int(any(t.qtype in repackable for t in info.expert_tensors))


def plan_slots(mem: MemoryPlan, budget: Budget | None, experts_per_layer: int | None) -> MemoryPlan:
    """Choose S from a budget and/or an explicit count; refuse what cannot fit."""
    from dataclasses import replace

    k, n = mem.top_k, mem.n_expert
    if experts_per_layer is not None and not k <= experts_per_layer <= n:
        raise BudgetError(f"--experts-per-layer must be between top-k={k} and n_expert={n}, got {experts_per_layer}")
    if budget is None:
        return replace(mem, slots=experts_per_layer or n)
    limit = budget.resolve(mem.full)
    fit = min(n, (limit - mem.fixed) // mem.per_slot) if limit > mem.fixed else -1
    if fit < k:
        hint = ""
        if budget.percent is not None:  # a % of what `full` needs: say which percentages work on this model
            low = math.ceil(100 * mem.total(k) / mem.full)
            hint = (f"; with this model a percentage budget needs {low}% or more (the fixed part weighs "
                    f"{100 * mem.fixed / mem.full:.0f}% of it)" if low <= 100 else "")
        raise BudgetError(f"memory budget {fmt(limit)} is below the minimum {fmt(mem.total(k))} = {mem.parts(k)}"
                          + hint)
    if experts_per_layer is not None:
        if experts_per_layer > fit:
            raise BudgetError(f"--experts-per-layer {experts_per_layer} needs {fmt(mem.total(experts_per_layer))}, "
                              f"above the memory budget {fmt(limit)}; the budget admits at most {fit}")
        return replace(mem, slots=experts_per_layer)
    return replace(mem, slots=int(fit))
