"""Runtime overhead and swap cost, side by side in one run.

    python bench/runtime_bench.py [--model M.gguf] [--tokens 64] [--rounds 5] [--threads 2]

1. Decode tokens/s of SwapMoELlama with every expert resident against plain llama-cpp-python
   on the same swap-ready GGUF, same threads, interleaved rounds (target >= 0.95x).
2. Swap throughput: reading expert slices with the page cache dropped for them (MB/s), the
   commit (`ggml_backend_tensor_set`) per expert, and one swap against one decode step.
Without --model a Mixtral-shaped Q8_0 model (hidden 1024, 8 experts of 2816, 4 layers) is built.
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


def _decode_tps(llm, prompt: list[int], n: int) -> float:
    llm.reset()
    llm.eval(prompt)
    tok = prompt[-1]
    t0 = time.perf_counter()
    for _ in range(n):
        llm.eval([tok])
        tok = 7 + (tok * 31) % 200  # a fixed token sequence: the same work for every runtime
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--json", default=str(Path(__file__).parent / "out" / "runtime_bench.json"))
    a = ap.parse_args()
    import llama_cpp

    from swapmoe_gguf.converters import convert
    from swapmoe_gguf.converters.tiny_checkpoint import write_tiny_mixtral
    from swapmoe_gguf.runtime import SwapMoELlama

    if a.model:
        model = a.model
    else:
        work = Path(tempfile.mkdtemp(prefix="swapmoe-rt-bench-"))
        src = write_tiny_mixtral(work / "hf", hidden=a.hidden, ffn=a.ffn, layers=4, experts=8, heads=16, kv_heads=8,
                                 dtype=np.dtype(np.uint16), std=0.02)
        model = str(work / "m.gguf")
        convert(src, model, "q8_0", progress=False)
    kw = dict(n_ctx=512, n_batch=512, n_threads=a.threads, n_threads_batch=a.threads, verbose=False, flash_attn=True)
    # All experts resident: the runtime runs the `full` policy (no router tap). The second copy
    # switches the tap on, as the `swapmoe` policy would, to show what scoring costs.
    runs = {"plain": llama_cpp.Llama(model, **kw), "swapmoe": SwapMoELlama(model, **kw),
            "swapmoe_no_tap": SwapMoELlama(model, **kw)}
    runs["swapmoe"].tap.enabled = True
    prompt = list(range(3, 35))
    tps: dict[str, list[float]] = {k: [] for k in runs}
    for llm in runs.values():
        _decode_tps(llm, prompt, 8)  # warm up
    for _ in range(a.rounds):  # interleaved: each round runs every variant once
        for name, llm in runs.items():
            tps[name].append(_decode_tps(llm, prompt, a.tokens))
    med = {k: statistics.median(v) for k, v in tps.items()}
    ratio = statistics.median(r / p for r, p in zip(tps["swapmoe"], tps["plain"]))
    ratio_no_tap = statistics.median(r / p for r, p in zip(tps["swapmoe_no_tap"], tps["plain"]))
    rt = runs["swapmoe"]
    step = 1.0 / med["swapmoe"]

    # swaps: cold read + commit, cycling experts through slot 0
    from swapmoe_gguf.planning.profile import time_swaps

    read_ms, commit_ms, nbytes = time_swaps(rt.vmodel)
    reads, commits = [r / 1e3 for r in read_ms], [c / 1e3 for c in commit_ms]
    res = {
        "date": date.today().isoformat(), "cpus": os.cpu_count(), "threads": a.threads, "model": model,
        "expert_MB": round(nbytes / 1e6, 2),
        "plain_tok_s": round(med["plain"], 1), "swapmoe_all_slots_tok_s": round(med["swapmoe"], 1),
        "swapmoe_no_tap_tok_s": round(med["swapmoe_no_tap"], 1),
        "ratio": round(ratio, 3), "ratio_no_tap": round(ratio_no_tap, 3),
        "read_MB_s": round(nbytes / statistics.median(reads) / 1e6, 1),
        "commit_ms": round(1e3 * statistics.median(commits), 3), "read_ms": round(1e3 * statistics.median(reads), 3),
        "decode_step_ms": round(1e3 * step, 2),
        "swap_over_decode_step": round((statistics.median(reads) + statistics.median(commits)) / step, 2),
    }
    print(f"decode tok/s (median of {a.rounds} interleaved rounds, {a.tokens} tokens, {a.threads} threads): "
          f"plain {res['plain_tok_s']}, SwapMoE all slots {res['swapmoe_all_slots_tok_s']} (ratio {res['ratio']}), "
          f"without the router tap {res['swapmoe_no_tap_tok_s']} (ratio {res['ratio_no_tap']})")
    print(f"one expert ({res['expert_MB']} MB): read {res['read_ms']} ms ({res['read_MB_s']} MB/s, page cache dropped), "
          f"commit {res['commit_ms']} ms; one decode step {res['decode_step_ms']} ms; swap/step = {res['swap_over_decode_step']}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=2))
    for llm in runs.values():
        llm.close()


if __name__ == "__main__":
    main()
