"""Stock llama.cpp speed on the quant types users download: SwapMoE `full` vs plain llama-cpp-python.

    python bench/repack_bench.py [--types q8_0 q4_0 q4_k_m] [--hidden 1024 --ffn 2816] [--tokens 64] [--prompt 128]
                                 [--rounds 5] [--threads 2]

A Mixtral-shaped model (hidden 1024, 8 experts of 2816, 4 layers by default) is written once per type by the
project's converter. Per type, three runtimes on the same file with the same threads, interleaved
round by round: plain llama-cpp-python (which repacks Q4 weights for its CPU kernels), SwapMoE `full`
(every expert resident, repacking as stock), and SwapMoE `full --no-repack` (for reference).
Decode: tokens/s over `--tokens` one-token steps; prefill: tokens/s of one `--prompt`-token batch.
Target: SwapMoE >= 0.95x plain in both (median of the per-round ratios).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from runtime_bench import _decode_tps  # bench/ is on sys.path when run as a script


def _prefill_tps(llm, prompt: list[int]) -> float:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    return len(prompt) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", default=["q8_0", "q4_0", "q4_k_m"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--json", default=str(Path(__file__).parent / "out" / "repack_bench.json"))
    a = ap.parse_args()
    import llama_cpp

    from swapmoe_gguf.converters import convert
    from swapmoe_gguf.converters.tiny_checkpoint import write_tiny_mixtral
    from swapmoe_gguf.runtime import SwapMoELlama

    work = Path(tempfile.mkdtemp(prefix="swapmoe-repack-bench-"))
    src = write_tiny_mixtral(work / "hf", hidden=a.hidden, ffn=a.ffn, layers=4, experts=8, heads=16, kv_heads=8,
                             dtype=np.dtype(np.uint16), std=0.02)
    kw = dict(n_ctx=512, n_batch=512, n_threads=a.threads, n_threads_batch=a.threads, verbose=False, flash_attn=True)
    prompt = [3 + (i * 17) % 250 for i in range(a.prompt)]
    rows = []
    for typ in a.types:
        model = str(work / f"{typ}.gguf")
        convert(src, model, typ, progress=False)
        runs = {"plain": llama_cpp.Llama(model, **kw), "swapmoe": SwapMoELlama(model, policy="full", **kw),
                "swapmoe_no_repack": SwapMoELlama(model, policy="full", repack=False, **kw)}
        repacked = len(runs["swapmoe"].vmodel.repacked)
        dec: dict[str, list[float]] = {k: [] for k in runs}
        pre: dict[str, list[float]] = {k: [] for k in runs}
        for llm in runs.values():
            _decode_tps(llm, prompt, 8)  # warm up
        for _ in range(a.rounds):  # interleaved: each round runs every variant once
            for name, llm in runs.items():
                dec[name].append(_decode_tps(llm, prompt, a.tokens))
                pre[name].append(_prefill_tps(llm, prompt))
        for llm in runs.values():
            llm.close()
        ratio = lambda d, k: round(statistics.median(r / p for r, p in zip(d[k], d["plain"])), 3)  # noqa: E731
        row = {"type": typ, "repacked_expert_tensors": repacked,
               **{f"decode_{k}": round(statistics.median(v), 1) for k, v in dec.items()},
               **{f"prefill_{k}": round(statistics.median(v), 1) for k, v in pre.items()},
               "decode_ratio": ratio(dec, "swapmoe"), "prefill_ratio": ratio(pre, "swapmoe"),
               "decode_ratio_no_repack": ratio(dec, "swapmoe_no_repack"),
               "prefill_ratio_no_repack": ratio(pre, "swapmoe_no_repack")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nhidden {a.hidden}, experts of {a.ffn}; {a.rounds} interleaved rounds, {a.threads} threads, "
          f"{a.tokens} decode steps, {a.prompt}-token prefill; "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs\n")
    print("| type | plain decode tok/s | SwapMoE full (ratio) | --no-repack (ratio) | plain prefill tok/s | "
          "SwapMoE full (ratio) | --no-repack (ratio) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['decode_plain']} | {r['decode_swapmoe']} ({r['decode_ratio']}) | "
              f"{r['decode_swapmoe_no_repack']} ({r['decode_ratio_no_repack']}) | {r['prefill_plain']} | "
              f"{r['prefill_swapmoe']} ({r['prefill_ratio']}) | {r['prefill_swapmoe_no_repack']} "
              f"({r['prefill_ratio_no_repack']}) |")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
