"""`swapmoe inspect`: what a GGUF holds and what it needs to run as SwapMoE."""
from __future__ import annotations

from collections import Counter
from typing import Any

from ..fileformat.constants import SwapKeys
from ..fileformat.info import GGUFInfo


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def summary(info: GGUFInfo) -> dict[str, Any]:
    p = info.params
    problem = info.layout_problem()
    sp = info.split
    return {
        "file": str(info.path),
        "file_bytes": sum(info.file_sizes),
        # a split GGUF (gguf-split shards): which one this is, which are present, which missing
        "split": {"shard": sp.no + 1, "count": sp.count, "present": [str(x) for x in sp.present],
                  "missing": [str(x) for x in sp.missing], "complete": sp.problem is None} if sp.is_split else None,
        "architecture": info.arch,
        "source": info.get(SwapKeys.SOURCE),
        "layers": p.n_layer,
        "moe_layers": len(info.moe_layers),
        "experts": p.n_expert,
        "experts_used": p.n_expert_used,
        "expert_bytes": info.expert_bytes,
        "expert_weight_bytes": info.total_bytes - info.non_expert_bytes,
        "non_expert_bytes": info.non_expert_bytes,
        "types": dict(sorted(Counter(t.qtype.name for t in info.tensors).items())),
        "expert_types": dict(sorted(Counter(t.qtype.name for t in info.expert_tensors).items())),
        "alignment": info.alignment,
        "swap_ready": problem is None,
        "swap_ready_problem": problem,
        # runs as SwapMoE without converting (experts read in place, buffered), when not swap-ready
        "runs_in_place": problem is not None and info.run_problem() is None,
        "run_problem": info.run_problem(),
        "slices_page_aligned": info.slices_aligned,
        "unaligned_reason": info.unaligned_reason(),
        "min_weight_bytes_topk": info.weight_bytes_with(p.n_expert_used),
        "all_experts_weight_bytes": info.weight_bytes_with(p.n_expert),
    }


def render(s: dict[str, Any]) -> str:
    ready = ("yes" + (", every expert slice page-aligned" if s["slices_page_aligned"] else
                      f", but {s['unaligned_reason']}")) if s["swap_ready"] else f"no: {s['swap_ready_problem']}"
    if s.get("runs_in_place"):
        ready += "; runs in place (experts read buffered; `swapmoe convert` gives page-aligned O_DIRECT reads)"
    sp = s.get("split")
    rows = [
        ("file", f"{s['file']} ({fmt_bytes(s['file_bytes'])}"
                 + (f" in {len(sp['present'])} of {sp['count']} shards)" if sp else ")")),
    ]
    if sp:
        shards = f"shard {sp['shard']} of {sp['count']}; present: {', '.join(_name(x) for x in sp['present'])}"
        if sp["missing"]:
            shards += f"; MISSING: {', '.join(_name(x) for x in sp['missing'])} (sizes below cover present shards only)"
        rows.append(("split", shards))
    rows += [
        ("architecture", s["architecture"] + (f" (from {s['source']})" if s["source"] else "")),
        ("layers", f"{s['layers']} ({s['moe_layers']} with routed experts)"),
        ("experts", f"{s['experts']} per layer, top-{s['experts_used']} used per token"),
        ("per-expert size", f"{fmt_bytes(s['expert_bytes'])} (one expert of one layer, all its tensors)"),
        ("expert weights", fmt_bytes(s["expert_weight_bytes"])),
        ("non-expert size", fmt_bytes(s["non_expert_bytes"])),
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in s["types"].items())),
        ("expert types", ", ".join(f"{k} x{v}" for k, v in s["expert_types"].items()) or "-"),
        ("data alignment", str(s["alignment"])),
        ("swap-ready", ready),
        ("min memory (weights)", f"{fmt_bytes(s['min_weight_bytes_topk'])} with top-{s['experts_used']} experts "
                                 "resident per layer (plus KV cache and compute buffers)"),
        ("all experts (weights)", fmt_bytes(s["all_experts_weight_bytes"])),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k + ':':<{w + 1}} {v}" for k, v in rows)


def _name(path: str) -> str:
    from pathlib import Path

    return Path(path).name
