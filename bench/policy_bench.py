"""Policies side by side on one model and budget: swapmoe vs static vs exact vs full.

    python bench/policy_bench.py [--model M.gguf] [--experts-per-layer 3] [--tokens 96] [--rounds 3]

Interleaved rounds; before every run the page cache is dropped for the file's expert ranges,
so misses go to disk. Per policy: decode tokens/s, router hit rate, bytes read per token,
p50/p99 time per token. Targets: swapmoe >= 0.95x static (same S), >= 3x exact; p99 <= 1.3x p50.
Without --model a Mixtral-shaped Q8_0 model (hidden 1024, 8 experts of 2816, 4 layers) is built.
Random weights: speed and I/O only, never quality.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

POLICIES = ("swapmoe", "static", "exact", "full")


def drop_expert_pages(llm) -> None:
    store = llm.vmodel.store
    os.fsync(store.fd)
    for tensors in store.layers.values():
        for t in tensors:
            os.posix_fadvise(store.fd, t.offset, t.nbytes, os.POSIX_FADV_DONTNEED)


def run_once(llm, prompt: list[int], n: int) -> dict:
    drop_expert_pages(llm)
    before = llm.telemetry()
    llm.reset()
    times, last = [], None
    t0 = time.perf_counter()
    for i, tok in enumerate(llm.generate(prompt, temp=0.0)):
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
        if i + 1 >= n:
            break
    total = time.perf_counter() - t0
    after = llm.telemetry()
    return {"tok_s": len(times) / sum(times), "ttft_s": total - sum(times), "times": times,
            "bytes": after.bytes_read - before.bytes_read, "swaps": after.swaps - before.swaps,
            "hit_rate": after.hit_rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--experts-per-layer", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(Path(__file__).parent / "out" / "policy_bench.json"))
    a = ap.parse_args()
    from swapmoe_gguf.converters import convert
    from swapmoe_gguf.converters.tiny_checkpoint import write_tiny_mixtral
    from swapmoe_gguf.runtime import SwapMoELlama

    model = a.model
    if not model:
        work = Path(tempfile.mkdtemp(prefix="swapmoe-policy-bench-"))
        src = write_tiny_mixtral(work / "hf", hidden=1024, ffn=2816, layers=4, experts=8, heads=16, kv_heads=8,
                                 dtype=np.dtype(np.uint16), std=0.02)
        model = str(work / "m.gguf")
        convert(src, model, "q8_0", progress=False)
    kw = dict(n_ctx=512, n_threads=a.threads, n_threads_batch=a.threads, verbose=False, seed=1)
    # swapmoe runs as `swapmoe plan` configures it for this device (F, Q, scoring stride)
    from swapmoe_gguf.fileformat.reader import read_gguf
    from swapmoe_gguf.planning.planner import make_plan
    from swapmoe_gguf.planning.profile import load_or_measure

    info = read_gguf(model)
    plan = make_plan(info, load_or_measure(info, SwapMoELlama, threads=a.threads), None, n_ctx=512, threads=a.threads,
                     experts_per_layer=a.experts_per_layer)
    llms = {p: SwapMoELlama(model, policy=p, **({} if p == "full" else {"experts_per_layer": a.experts_per_layer}),
                            **({"scheduler": plan.scheduler} if p == "swapmoe" else {}), **kw) for p in POLICIES}
    prompt = llms["full"].tokenize(b"The river ran high that spring, and the ferryman told everyone who would listen")
    res: dict[str, list[dict]] = {p: [] for p in POLICIES}
    for _ in range(a.rounds):
        for p, llm in llms.items():
            res[p].append(run_once(llm, prompt, a.tokens))
    rows = {}
    for p, runs in res.items():
        times = [t for r in runs for t in r["times"]]
        n_tok = sum(len(r["times"]) + 1 for r in runs)
        rows[p] = {"tok_s": round(statistics.median(r["tok_s"] for r in runs), 1),
                   "ttft_ms": round(1e3 * statistics.median(r["ttft_s"] for r in runs), 1),
                   "p50_ms": round(1e3 * float(np.percentile(times, 50)), 2),
                   "p99_ms": round(1e3 * float(np.percentile(times, 99)), 2),
                   "bytes_per_token": int(sum(r["bytes"] for r in runs) / n_tok),
                   "swaps_per_token": round(sum(r["swaps"] for r in runs) / n_tok, 3),
                   "hit_rate": None if runs[-1]["hit_rate"] is None else round(runs[-1]["hit_rate"], 3)}
    sw = rows["swapmoe"]
    summary = {"swapmoe_vs_static": round(sw["tok_s"] / rows["static"]["tok_s"], 3),
               "swapmoe_vs_exact": round(sw["tok_s"] / rows["exact"]["tok_s"], 2),
               "swapmoe_p99_over_p50": round(sw["p99_ms"] / sw["p50_ms"], 2)}
    meta = {"date": date.today().isoformat(), "cpus": os.cpu_count(), "threads": a.threads, "model": model,
            "experts_per_layer": a.experts_per_layer, "n_expert": llms["full"].vmodel.n_expert,
            "scheduler": str(plan.scheduler), "plan": {p: llm.memory.parts() for p, llm in llms.items()}}
    print(f"{meta['date']}, {meta['cpus']} CPUs, {a.threads} threads, S={a.experts_per_layer} of "
          f"{meta['n_expert']}, {a.rounds} interleaved rounds x {a.tokens} tokens, page cache dropped before each run")
    print(f"swapmoe scheduler from the planner: {plan.scheduler}\n")
    print("| policy | decode tok/s | TTFT ms | p50 ms | p99 ms | bytes read / token | swaps / token | hit rate |")
    print("|---|---|---|---|---|---|---|---|")
    for p, r in rows.items():
        print(f"| {p} | {r['tok_s']} | {r['ttft_ms']} | {r['p50_ms']} | {r['p99_ms']} | {r['bytes_per_token']} | "
              f"{r['swaps_per_token']} | {r['hit_rate']} |")
    print(f"\nswapmoe / static = {summary['swapmoe_vs_static']} (target >= 0.95), swapmoe / exact = "
          f"{summary['swapmoe_vs_exact']} (target >= 3), swapmoe p99 / p50 = {summary['swapmoe_p99_over_p50']} (<= 1.3)")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=2))
    for llm in llms.values():
        llm.close()


if __name__ == "__main__":
    main()
