"""Two budgets, three places for an expert: device slots, the host RAM tier, the disk.

The host budget (`--memory-budget`) pays for the process (baseline, weights, KV cache, buffers) and
the RAM tier; the device budget (`--vram-budget`) pays for the slots S. Where slots live in host
memory (no offload), a byte given to the tier would serve only swaps, while the same byte as a slot
serves every token without a swap: the host budget goes to slots and the tier is 0. Where a device
budget bounds S, the host memory left after the process is the tier's, if it makes swaps cheaper:

    swap from disk:  t_read + t_upload = b / disk_MB_s + b / upload_MB_s
    swap from tier:           t_upload = b / upload_MB_s
    gain = 1 + upload_MB_s / disk_MB_s

Both bandwidths are the device profile's (read: disk -> RAM, page cache dropped; commit: RAM ->
slot, `ggml_backend_tensor_set`). A gain under MIN_GAIN (an upload as slow as the disk: a distant
RPC server) is not worth the RAM. The tier holds up to every expert not in a slot; the share of
swaps it serves is estimated as the share of those experts it holds (the most important ones: a
lower bound, swaps favour them). Pure Python: tested without a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..residency.budget import MemoryPlan, fmt
from .profile import DeviceProfile

MIN_GAIN = 1.25  # a RAM tier must make a swap at least this much faster than reading it from disk


@dataclass(frozen=True)
class TierSplit:
    slots: int                 # S: experts per layer in slots
    ram_tier: int              # bytes of host memory for the RAM tier
    tier_experts: int          # experts per layer the tier holds (ram_tier / one expert of every layer)
    hit_share: float           # share of swaps the tier is expected to serve
    reasons: tuple[str, ...]


def _held(ram_tier: int, mem: MemoryPlan, slots: int) -> tuple[int, float]:
    per_layer = ram_tier // mem.per_slot if mem.per_slot else 0
    outside = mem.n_expert - slots
    return per_layer, (min(1.0, per_layer / outside) if outside > 0 else 0.0)


def split(mem: MemoryPlan, *, host_limit: int | None, device_slots: int | None, read_mb_s: float,
          upload_mb_s: float, ram_tier: int | None = None, host_free: int | None = None) -> TierSplit:
    """`mem`: the host plan (S = what the host budget admits, without a tier). `device_slots`: S as
    the device budget bounds it (None: the slots are in host memory). `ram_tier`: bytes asked for
    explicitly (None: chosen here). `host_free`: host memory to use when there is no host budget."""
    s = mem.slots if device_slots is None else min(mem.slots, device_slots)
    outside = (mem.n_expert - s) * mem.per_slot  # every expert not in a slot
    if read_mb_s > 0 and upload_mb_s > 0:
        gain = 1.0 + upload_mb_s / read_mb_s
        bw = (f"disk -> RAM {read_mb_s:.0f} MB/s, RAM -> slot {upload_mb_s:.0f} MB/s: a swap from the RAM tier "
              f"is {gain:.1f}x faster than from disk")
    else:  # no device profile measured yet: a read saved is never slower than a read made
        gain, bw = float("inf"), "bandwidths not measured (no device profile): a RAM tier assumed worth it"
    if s >= mem.n_expert:
        return TierSplit(s, 0, 0, 0.0, ("every expert has a slot: no RAM tier",))
    if ram_tier is not None:
        tier = min(ram_tier, outside)
        per, hit = _held(tier, mem, s)
        why = f"--ram-tier {fmt(ram_tier)}" + (f", capped to the {fmt(outside)} of experts not in slots"
                                               if tier < ram_tier else "")
        return TierSplit(s, tier, per, hit, (f"{why}: {per} experts per layer in host RAM beside the {s} in "
                                             f"slots (~{hit:.0%} of swaps read RAM, not disk); {bw}",))
    if device_slots is None:
        return TierSplit(s, 0, 0, 0.0, (
            "slots are in host memory: a byte there as a slot serves every token without a swap, as a RAM tier "
            "only swaps; the host budget goes to slots (RAM tier 0)",))
    if gain < MIN_GAIN:
        return TierSplit(s, 0, 0, 0.0, (f"{bw} (under {MIN_GAIN}x): no RAM tier",))
    if host_limit is not None:
        room = max(0, host_limit - mem.total(s))
        src = f"the host budget {fmt(host_limit)} leaves {fmt(room)} beside the process ({fmt(mem.total(s))})"
    else:
        room = max(0, host_free or 0)
        src = f"no --memory-budget: up to {fmt(room)} of the host's free memory"
    tier = min(room, outside) // mem.per_slot * mem.per_slot if mem.per_slot else 0
    per, hit = _held(tier, mem, s)
    if not tier:
        return TierSplit(s, 0, 0, 0.0, (f"{src}: not one expert per layer fits; no RAM tier",))
    return TierSplit(s, tier, per, hit, (
        f"the device budget admits S={s}; {src}: RAM tier {fmt(tier)} = {per} experts per layer "
        f"(of the {mem.n_expert - s} outside the slots; ~{hit:.0%} of swaps read RAM, not disk); {bw}",))


def split_from_profile(mem: MemoryPlan, prof: DeviceProfile, **kw: Any) -> TierSplit:
    """`split` with the bandwidths of a device profile."""
    return split(mem, read_mb_s=prof.read_mb_s, upload_mb_s=prof.upload_mb_s, **kw)
