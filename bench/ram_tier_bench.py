"""Swap latency from disk vs from the host RAM tier, side by side in one run (issue 25).

    python bench/ram_tier_bench.py [--dir bench/out] [--experts 16] [--rounds 3] [--rpc HOST:PORT]

Builds a synthetic MoE (converters/synthetic.py: page-aligned Q8_0 experts, so disk reads are
O_DIRECT and never come from the page cache) and two `static` runtimes with the same S slots: one
without a tier, one with every expert in a RAM tier (warmed first). Rounds alternate between them
(the machine's noise lands on both). Timed per expert:

* swap: `request_swap` -> `apply_pending(wait=True)` (the read, or the tier hit, plus the commit)
* prompt: an `exact` 32-token prompt whose missing experts are computed outside the graph
  (expert_compute.py) from bytes read from disk or held in the tier;
* decode: the `exact` decode steps after it, each loading its missing experts into slots first.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from swapmoe_gguf.converters.synthetic import SyntheticShape, write_synthetic_moe
from swapmoe_gguf.runtime import SwapMoELlama

KW = dict(n_ctx=128, n_threads=2, verbose=False)


def _swaps(rt: SwapMoELlama, cold: list[tuple[int, int]]) -> list[float]:
    """ms per swap: each expert of `cold` into slot 0 of its layer, one at a time."""
    out = []
    for layer, e in cold:
        t0 = time.perf_counter()
        rt.request_swap(layer, 0, e)
        rt.apply_pending(wait=True)
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def _prompt(rt: SwapMoELlama, tokens: list[int]) -> float:
    rt.reset()
    t0 = time.perf_counter()
    rt.eval(tokens)
    return 1e3 * (time.perf_counter() - t0)


def _decode(rt: SwapMoELlama, n: int) -> list[float]:
    """ms per `exact` decode step after a prompt: each step loads its missing experts synchronously."""
    out, tok = [], 5
    for i in range(n):
        t0 = time.perf_counter()
        rt.eval([tok])
        out.append(1e3 * (time.perf_counter() - t0))
        tok = 1 + (tok * 31 + i) % 250
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="bench/out")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rpc", default=None, help="slots on this RPC server (-ngl 99): swaps upload over the network")
    a = ap.parse_args()
    if a.rpc:  # registered once in this process (a server serves one connection: no second reachability probe)
        from swapmoe_gguf.llamacpp.devices import add_rpc_servers

        add_rpc_servers(a.rpc)
        KW.update(n_gpu_layers=99)
    shape = SyntheticShape(layers=4, hidden=2048, ffn=768, experts=a.experts, top_k=2, heads=16, kv_heads=4)
    Path(a.dir).mkdir(parents=True, exist_ok=True)
    path = Path(a.dir) / f"ram-tier-synthetic-{a.experts}e.gguf"
    if not path.exists():
        write_synthetic_moe(path, shape, progress=False)
    init = {l: list(range(a.slots)) for l in range(shape.layers)}
    plain = SwapMoELlama(str(path), experts_per_layer=a.slots, policy="static", initial_experts=init, **KW)
    tiered = SwapMoELlama(str(path), experts_per_layer=a.slots, policy="static", initial_experts=init,
                          ram_tier="100%", **KW)
    tiered.warm_tier(wait=True)
    ex_plain = SwapMoELlama(str(path), experts_per_layer=a.slots, policy="exact", initial_experts=init, **KW)
    ex_tier = SwapMoELlama(str(path), experts_per_layer=a.slots, policy="exact", initial_experts=init,
                           ram_tier="100%", **KW)
    ex_tier.warm_tier(wait=True)
    cold = [(l, e) for e in range(a.slots, a.experts) for l in range(shape.layers)]
    prompt = [1 + (7 * i) % 250 for i in range(32)]
    res: dict[str, list[float]] = {f"{w} {s}": [] for w in ("swap", "prompt", "decode") for s in ("disk", "tier")}
    try:
        for _ in range(a.rounds):
            res["swap disk"] += _swaps(plain, cold)
            res["swap tier"] += _swaps(tiered, cold)
            for rt in (ex_plain, ex_tier):  # the prompt starts from the same resident set each round
                for l in init:
                    for s, e in enumerate(init[l]):
                        if rt.vmodel.slot_map[l][s] != e:
                            rt.vmodel.swap(l, s, e)
            res["prompt disk"].append(_prompt(ex_plain, prompt))
            res["decode disk"] += _decode(ex_plain, 16)
            res["prompt tier"].append(_prompt(ex_tier, prompt))
            res["decode tier"] += _decode(ex_tier, 16)
        disk_reads = tiered.vmodel.store.stats.reads + ex_tier.vmodel.store.stats.reads
    finally:
        for rt in (plain, tiered, ex_plain, ex_tier):
            rt.close()
    expert_mib = shape.expert_bytes() / (1 << 20)
    summary = {k: {"median_ms": round(statistics.median(v), 3), "n": len(v)} for k, v in res.items()}
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
            "cpus": __import__("os").cpu_count(), "expert_MiB": round(expert_mib, 2), "shape": str(shape),
            "slots": a.slots, "disk_reads_tiered": disk_reads, "rpc": a.rpc}
    print(json.dumps({"meta": meta, "results": summary}, indent=2))
    where = f"slots on RPC {a.rpc}" if a.rpc else "slots in host memory"
    print(f"\none expert = {expert_mib:.2f} MiB, S={a.slots} of {a.experts}, {where}, {a.rounds} rounds interleaved")
    print(f"{'':14} {'disk':>10} {'RAM tier':>10} {'speedup':>8}")
    for what in ("swap", "prompt", "decode"):
        d, t = summary[f"{what} disk"]["median_ms"], summary[f"{what} tier"]["median_ms"]
        print(f"{what + ' (ms)':14} {d:10.2f} {t:10.2f} {d / t:7.1f}x")
    print(f"disk reads by the tiered runtimes after warm-up: {disk_reads}")


if __name__ == "__main__":
    main()
