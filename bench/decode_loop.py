"""Decode speed of `swapmoe` against `static` (the pruned model) and `full` in a plain greedy loop.

The scheduler's per-token cost (issue 26) shows most on small, fast steps: this runs the embedded
default model (or -m MODEL) at S experts per layer, greedy, with prompts that switch topic, each
policy in a fresh process per round, rounds interleaved. Prints tok/s per policy (median of rounds),
swapmoe/static, and the scheduler's own time per token (telemetry: the hooks around each decode
and the router inputs copied in C).

    python bench/decode_loop.py [-m MODEL] [--experts 16] [--rounds 5] [-n 64] [-t 1] [--rpc HOST:PORT -ngl 99]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROMPTS = ("ROMEO.\nBut soft, what light through yonder window breaks?\n",
           "def read_config(path):\n    \"\"\"Read a JSON configuration file.\"\"\"\n",
           "KING HENRY.\nOnce more unto the breach, dear friends, once more;\n",
           "class Cache:\n    def __init__(self, size):\n")
PLANNED = "swapmoe-plan"  # swapmoe with the planner's F and Q instead of the scheduler's defaults


def cell(model: str, policy: str, experts: int, n: int, threads: int, rpc: str | None = None, ngl: int = 0) -> dict:
    from swapmoe_gguf.commands.evaluate import greedy_decode_seconds
    from swapmoe_gguf.runtime import SwapMoELlama

    kw: dict = {} if policy == "full" else {"experts_per_layer": experts}
    if rpc:
        kw |= {"rpc_servers": rpc, "n_gpu_layers": ngl}
    if policy == PLANNED:  # F, Q (and the scoring stride) from the planner, for this device's profile
        from swapmoe_gguf.fileformat.reader import read_gguf
        from swapmoe_gguf.planning.profile import load_or_measure

        load_or_measure(read_gguf(model), SwapMoELlama, threads=threads, n_gpu_layers=ngl if rpc else 0)
        kw["scheduler"], policy = "auto", "swapmoe"
    llm = SwapMoELlama(model, policy=policy, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False,
                       **kw)
    try:
        secs, toks = greedy_decode_seconds(llm, PROMPTS, n), n * len(PROMPTS)
        t = llm.telemetry()
        sched = getattr(t, "decode_sched_seconds", float("nan"))  # (an older runtime under PYTHONPATH: not counted)
        return {"tok_s": toks / secs, "interval": llm.policy.scheduler.config.interval if policy == "swapmoe" else 0,
                "quota": llm.policy.scheduler.config.quota if policy == "swapmoe" else 0, "sched_us": 1e6 * sched / max(1, t.decode_tokens),
                "step_us": 1e6 * secs / toks, "swaps": t.swaps, "hit_rate": t.hit_rate}
    finally:
        llm.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=64, help="tokens per prompt")
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--policies", default="full,static,swapmoe",
                    help=f"comma-separated; {PLANNED}: swapmoe with the plan `swapmoe plan` makes for S")
    ap.add_argument("--rpc", default=None, help="an rpc-server (`swapmoe rpc-server`) to put the layers on")
    ap.add_argument("-ngl", type=int, default=99)
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cell:
        print(json.dumps(cell(a.model, a.cell, a.experts, a.n, a.threads, a.rpc, a.ngl)))
        return 0
    if a.model is None:
        from swapmoe_gguf.converters.default_model import default_model

        a.model = str(default_model())
    res: dict[str, list[dict]] = {p: [] for p in a.policies.split(",")}
    for r in range(a.rounds):
        for p in res:
            out = subprocess.run([sys.executable, __file__, "-m", a.model, "--cell", p, "--experts", str(a.experts),
                                  "-n", str(a.n), "-t", str(a.threads), "-ngl", str(a.ngl)]
                                 + (["--rpc", a.rpc] if a.rpc else []), capture_output=True, text=True, check=True)
            res[p].append(json.loads(out.stdout.strip().splitlines()[-1]))
    where = f"layers on RPC {a.rpc} (-ngl {a.ngl})" if a.rpc else "CPU"
    print(f"{a.model}: S={a.experts}, {where}, {a.rounds} rounds, {len(PROMPTS)} prompts x {a.n} tokens, "
          f"{a.threads} thread(s)")
    med = {p: statistics.median(x["tok_s"] for x in v) for p, v in res.items()}
    for p, v in res.items():
        fq = f"  F={v[-1]['interval']} Q={v[-1]['quota']}" if v[-1].get("interval") else ""
        print(f"  {p:12s} {med[p]:8.1f} tok/s  step {statistics.median(x['step_us'] for x in v):7.1f} us  "
              f"scheduler {statistics.median(x['sched_us'] for x in v):6.1f} us/token  swaps {v[-1]['swaps']}{fq}")
    for p in ("swapmoe", PLANNED):
        if p in med and "static" in med:
            sw = statistics.median(x["sched_us"] for x in res[p])
            step = statistics.median(x["step_us"] for x in res[p])
            print(f"  {p} / static: {med[p] / med['static']:.3f}  (target >= 0.95); "
                  f"scheduler {100 * sw / step:.1f} % of its step (target <= 3 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
