"""Where a `SwapMoELlama` puts its tensors: RPC servers, offload overrides, the device budget.

Prepared before the model is built (RPC servers registered with llama.cpp, `-ot`/`--cpu-moe`/
`--n-cpu-moe` turned into buffer-type overrides, S lowered to what `--vram-budget` admits on the
devices) and checked after (the weight buffers llama.cpp allocated on the devices, slots
included, against the budget's share for them).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Sequence

from ..fileformat.info import GGUFInfo
from ..llamacpp import devices
from ..llamacpp.vmodel import VirtualExpertModel
from ..residency.budget import Budget, BudgetError, MemoryPlan, fmt, parse_budget
from ..residency.device_budget import DevicePlan, device_plan, fit_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    memory: MemoryPlan                    # the host plan, S lowered to what the device admits
    overrides: tuple[tuple[str, int], ...]  # (regex, buffer type), llama.cpp's order
    tensor_split: tuple[float, ...] | None
    rpc_servers: tuple[str, ...]
    device: DevicePlan | None             # with --vram-budget
    offload: tuple[str, ...]              # names of the devices llama.cpp offloads to

    @classmethod
    def prepare(cls, info: GGUFInfo, memory: MemoryPlan, *, n_gpu_layers: int,
                rpc_servers: str | Sequence[str] | None, tensor_split: str | Sequence[float] | None,
                vram_budget: str | Budget | None, cpu_moe: bool, n_cpu_moe: int, override_tensor: Sequence[str],
                experts_per_layer: int | None) -> "Placement":
        eps: tuple[str, ...] = ()
        if rpc_servers:
            devs = devices.add_rpc_servers(rpc_servers)
            eps = tuple(d.description for d in devs)
            if n_gpu_layers == 0:
                log.warning("RPC servers registered but -ngl is 0: nothing is offloaded to them")
        overrides = tuple(devices.tensor_overrides(tuple(override_tensor), cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe))
        split = devices.parse_tensor_split(tensor_split if isinstance(tensor_split, str) else
                                           (list(tensor_split) if tensor_split else None))
        offload = devices.offload_devices()
        if split and len(split) > len(offload):
            raise BudgetError(f"--tensor-split {','.join(f'{x:g}' for x in split)}: {len(split)} proportions for "
                              f"{len(offload)} offload device(s) ({', '.join(d.name for d in offload) or 'none'})")
        dplan = None
        if vram_budget is not None:
            budget = parse_budget(vram_budget) if isinstance(vram_budget, str) else vram_budget
            if not offload or n_gpu_layers == 0:
                raise BudgetError("--vram-budget: nothing is offloaded (no GPU or RPC device, or -ngl 0)")
            cpu = devices.buffer_types().get("CPU")
            host = [p for p, b in overrides if b == cpu]
            dplan = device_plan(info, memory, n_gpu_layers=n_gpu_layers, host_patterns=host, slots=memory.slots)
            dplan = fit_device(dplan, budget, total_device=sum(d.total for d in offload), top_k=memory.top_k,
                               n_expert=memory.n_expert, experts_per_layer=experts_per_layer)
            if dplan.slots < memory.slots:
                log.info("--vram-budget %s: %d experts per layer on the device (the host budget admits %d)",
                         fmt(dplan.limit or 0), dplan.slots, memory.slots)
                memory = replace(memory, slots=dplan.slots)
        return cls(memory=memory, overrides=overrides, tensor_split=tuple(split) if split else None,
                   rpc_servers=eps, device=dplan, offload=tuple(d.name for d in offload))

    @staticmethod
    def device_bytes(vm: VirtualExpertModel) -> dict[str, int]:
        """Weight buffers (slots included) on non-host buffer types, as llama.cpp allocated them."""
        return {k: v for k, v in vm.buffer_bytes().items() if not k.startswith("CPU")}

    def check_built(self, vm: VirtualExpertModel) -> None:
        """The device weights llama.cpp allocated against the budget's share for weights and slots."""
        if self.device is None or self.device.limit is None:
            return
        used = sum(self.device_bytes(vm).values())
        room = self.device.limit - self.device.kv_cache - self.device.compute
        if used > room:
            raise BudgetError(f"--vram-budget {fmt(self.device.limit)}: llama.cpp allocated {fmt(used)} of weights "
                              f"and {vm.slots} expert slots on the devices, {fmt(used - room)} over the "
                              f"{fmt(room)} left beside KV cache {fmt(self.device.kv_cache)} and compute buffers "
                              f"{fmt(self.device.compute)}")
        log.info("devices: %s of weights and slots (budget %s)",
                 ", ".join(f"{k} {fmt(v)}" for k, v in self.device_bytes(vm).items()) or "none",
                 fmt(self.device.limit))
