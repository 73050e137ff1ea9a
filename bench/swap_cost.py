"""What one swap costs the decoding thread, in parts: the request, the commit between steps, and
what the read (on its thread) adds to the decode steps it overlaps.

The planner's `swap_cost_ms` (profile.py) is the sum of these; on a small model it is of the order
of a whole decode step, which is why the plan swaps little there. Blocks of plain steps and of
steps with one swap requested each alternate (interleaved), in one process:

    python bench/swap_cost.py [-m MODEL] [--experts 16] [-t 1] [--blocks 20] [--block 16] [--tier]

`--tier`: the experts come from a RAM tier (no disk read): the Python and commit part alone.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--block", type=int, default=16, help="steps per block")
    ap.add_argument("--tier", action="store_true", help="swaps served by a RAM tier holding every expert")
    a = ap.parse_args()

    from swapmoe_gguf.converters.default_model import default_model
    from swapmoe_gguf.runtime import SwapMoELlama

    model = a.model or str(default_model())
    llm = SwapMoELlama(model, policy="static", experts_per_layer=a.experts, n_ctx=512, n_threads=a.threads,
                       n_threads_batch=a.threads, verbose=False, ram_tier="100%" if a.tier else 0)
    if a.tier:
        llm.warm_tier(wait=True)
    vm = llm.vmodel
    cold = [(l, e) for l in vm.moe_layers for e in range(vm.n_expert) if e not in vm.slot_map[l]]
    tok, i = 5, 0
    llm.eval([1, 2, 3, 4])
    for _ in range(8):
        llm.eval([tok])
    plain, swapping, request, commit = [], [], [], []
    for _ in range(a.blocks):
        for kind in ("plain", "swap"):
            for _ in range(a.block):
                if kind == "swap":
                    layer, e = cold[i % len(cold)]
                    i += 1
                    t0 = time.perf_counter()
                    llm.request_swap(layer, i % vm.slots, e)
                    request.append(time.perf_counter() - t0)
                if llm.n_tokens >= 500:  # (the context is 512: start over)
                    llm.reset()
                    llm.eval([1, 2, 3, 4])
                t0 = time.perf_counter()
                llm.eval([tok])
                (plain if kind == "plain" else swapping).append(time.perf_counter() - t0)
                if kind == "swap":
                    while llm.pending and not llm.pending[0][3].done():
                        time.sleep(0)  # (reads land within a step here; not counted)
                    t0 = time.perf_counter()
                    llm.apply_pending()
                    commit.append(time.perf_counter() - t0)
                    cold = [(l, x) for l in vm.moe_layers for x in range(vm.n_expert) if x not in vm.slot_map[l]]
                tok = 1 + (tok * 31) % 200
    us = lambda v: 1e6 * statistics.median(v)  # noqa: E731
    step_plain, step_swap = us(plain), us(swapping)
    print(f"{model.rsplit('/', 1)[-1]} S={a.experts} t={a.threads} {'tier' if a.tier else 'disk'}: "
          f"step plain {step_plain:.0f} us, with a read in flight {step_swap:.0f} us "
          f"(+{step_swap - step_plain:.0f}); request {us(request):.0f} us; commit {us(commit):.0f} us; "
          f"swaps {llm.telemetry_.swaps}")
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
