"""--vram-budget: what the model puts on its offload devices, part by part, and the slot count S that fits.

Placement is llama.cpp's: with `-ngl N` the last N of the n_layer + 1 layers (the output layer counts
as the last) live on the devices (llama-model.cpp, `i_gpu_start = n_layer + 1 - N`), token
embeddings stay on the host; expert tensors a `--cpu-moe` / `--n-cpu-moe` / `-ot ...=CPU` override
sends to the host are not counted. The estimate picks S before the model is built; the runtime then
checks the weight buffers llama.cpp actually allocated on the devices (`VirtualExpertModel.buffer_bytes`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from ..fileformat.info import GGUFInfo
from .budget import Budget, BudgetError, MemoryPlan, fmt


@dataclass(frozen=True)
class DevicePlan:
    """Device bytes the model needs (all offload devices together)."""

    weights: int    # non-expert weights of offloaded layers (+ output)
    kv_cache: int   # KV cache of offloaded layers
    compute: int    # compute buffer (llama.cpp allocates one per device; estimated as the host's)
    per_slot: int   # one expert in every offloaded MoE layer whose experts stay on the device
    slots: int
    limit: int | None = None

    def total(self, slots: int | None = None) -> int:
        return self.weights + self.kv_cache + self.compute + (self.slots if slots is None else slots) * self.per_slot

    def max_slots(self, n_expert: int) -> int:
        """The most experts per layer `limit` admits on the device (n_expert when unlimited or none are there)."""
        if self.limit is None or self.per_slot == 0:
            return n_expert
        return max(0, min(n_expert, (self.limit - self.total(0)) // self.per_slot))

    def parts(self, slots: int | None = None) -> str:
        n = self.slots if slots is None else slots
        return (f"weights {fmt(self.weights)} + KV cache {fmt(self.kv_cache)} + compute buffers "
                f"{fmt(self.compute)} + {n} expert slots x {fmt(self.per_slot)}")


def offloaded_layers(n_layer: int, n_gpu_layers: int) -> range:
    """Repeating layers llama.cpp puts on the devices for -ngl N (N < 0: all, as llama.cpp's -1/'all')."""
    n = n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers
    return range(max(n_layer + 1 - n, 0), n_layer)


def device_plan(info: GGUFInfo, mem: MemoryPlan, *, n_gpu_layers: int, host_patterns: Sequence[str] = (),
                slots: int) -> DevicePlan:
    """The device share of `mem` (budget.estimate's host plan) for this placement."""
    n_layer = info.params.n_layer
    on = set(offloaded_layers(n_layer, n_gpu_layers))
    output_on = n_gpu_layers != 0
    hosted = [re.compile(p) for p in host_patterns]
    weights = per_slot = 0
    for t in info.tensors:
        if t.block is None:
            if output_on and t.name.startswith(("output.", "output_norm.")):
                weights += t.nbytes
            continue
        if t.block not in on:
            continue
        if t.is_expert:
            if not any(r.search(t.name) for r in hosted):
                per_slot += t.expert_nbytes
        else:
            weights += t.nbytes
    names = {t.name for t in info.tensors}
    if output_on and "output.weight" not in names:  # tied embeddings: llama.cpp creates output.weight, a copy
        weights += sum(t.nbytes for t in info.tensors if t.name == "token_embd.weight")
    share = len(on) / max(1, n_layer)
    return DevicePlan(weights=weights, kv_cache=int(mem.kv_cache * share),
                      compute=mem.compute if on or output_on else 0, per_slot=per_slot, slots=slots)


def fit_device(plan: DevicePlan, budget: Budget, *, total_device: int, top_k: int, n_expert: int,
               experts_per_layer: int | None) -> DevicePlan:
    """S within the device budget (SIZE, or % of the devices' total memory); refuses what cannot fit,
    naming the part that is over and by how much."""
    from dataclasses import replace

    limit = budget.resolve(total_device)
    fixed = plan.total(0)
    if plan.per_slot == 0:  # no expert on the device: S is the host budget's business
        if fixed > limit:
            raise BudgetError(f"--vram-budget {fmt(limit)} is {fmt(fixed - limit)} short of the device part without "
                              f"experts: {plan.parts(0)}")
        return replace(plan, limit=limit)
    fit = min(n_expert, (limit - fixed) // plan.per_slot) if limit > fixed else -1
    if fit < top_k:
        need = plan.total(top_k)
        over = "weights, KV cache and compute buffers alone" if fixed > limit else f"the {top_k} experts per layer top-k needs"
        raise BudgetError(f"--vram-budget {fmt(limit)} is {fmt(need - limit)} short ({over} exceed it): the device "
                          f"needs at least {fmt(need)} = {plan.parts(top_k)}; lower -ngl or move experts to the "
                          "host with --n-cpu-moe N")
    if experts_per_layer is not None and experts_per_layer > fit:
        what = (f"all {n_expert} experts per layer (policy full)" if experts_per_layer == n_expert
                else f"--experts-per-layer {experts_per_layer}")
        raise BudgetError(f"{what} needs {fmt(plan.total(experts_per_layer))} on the "
                          f"device, {fmt(plan.total(experts_per_layer) - limit)} over --vram-budget {fmt(limit)}; "
                          f"it admits at most {fit}")
    return replace(plan, slots=min(plan.slots, int(fit)), limit=limit)
