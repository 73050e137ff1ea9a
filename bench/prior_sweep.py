"""The scheduler's knobs against `static` on the default model's mixed-domain request stream.

    python bench/prior_sweep.py [--experts-per-layer 24 16 8] [--prior 0 0.25 0.5 1] [--chunks 16]
    python bench/prior_sweep.py --variant prior_weight=0.25,quota=4 --variant decay=0.95 ...

One `full` pass gives the reference; then, on the same chunks (each a request, the scheduler's
state carried from one to the next, the topic switching every --switch-every requests), `static`
and `swapmoe` with each calibrated-prior weight (scheduler.py), or with each --variant of the
scheduler's settings (SchedulerConfig fields, comma-separated; the rest stay default).
Prints KL(full || policy) and perplexity per S, and the ratio to `static`'s KL: the issue-13
targets are <= 1 at every S, <= 1/2 at a quarter of the experts, <= 1/4 at half.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from swapmoe_gguf.converters.default_model import default_model, shipped_heldout
from swapmoe_gguf.commands.evaluate import evaluate, read_texts, stream_chunks
from swapmoe_gguf.runtime import SwapMoELlama
from swapmoe_gguf.residency.scheduler import SchedulerConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts-per-layer", type=int, nargs="+", default=[24, 16, 8])
    ap.add_argument("--prior", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    ap.add_argument("--variant", action="append", default=[], help="k=v,k=v: SchedulerConfig fields (repeatable)")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--switch-every", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="default: the embedded default model")
    a = ap.parse_args()
    path = a.model or str(default_model())
    kw = dict(n_ctx=a.ctx + 8, n_batch=a.ctx, n_threads=a.threads, n_threads_batch=a.threads, verbose=False, seed=1)
    full = SwapMoELlama(path, policy="full", **kw)
    try:
        chunks = stream_chunks(full, read_texts([str(p) for p in shipped_heldout()]), a.ctx, a.chunks, a.switch_every)
        ref_res, reference = evaluate(full, chunks)
    finally:
        full.close()
    print(f"{len(chunks)} requests of {a.ctx} tokens, switching every {a.switch_every}; full perplexity "
          f"{ref_res.ppl:.3f}\n")
    variants = [{kv.split("=")[0]: float(kv.split("=")[1]) for kv in v.split(",")} for v in a.variant] \
        or [{"prior_weight": w} for w in a.prior]
    fields = SchedulerConfig.__dataclass_fields__
    for v in variants:
        for k in v:
            if k not in fields:
                raise SystemExit(f"--variant: {k!r} is not a SchedulerConfig field ({', '.join(fields)})")
    print("| S | policy | scheduler settings | KL vs full | KL / static's | perplexity | swaps |\n"
          "|---|---|---|---|---|---|---|")
    for s in a.experts_per_layer:
        static_kl = None
        for policy, v in [("static", None)] + [("swapmoe", v) for v in variants]:
            cfg = None if v is None else replace(SchedulerConfig(), **{k: type(getattr(SchedulerConfig(), k))(x)
                                                                       for k, x in v.items()})
            llm = SwapMoELlama(path, policy=policy, experts_per_layer=s, scheduler=cfg, **kw)
            try:
                r = evaluate(llm, chunks, reference)[0]
            finally:
                llm.close()
            static_kl = r.kl if policy == "static" else static_kl
            desc = "-" if v is None else ", ".join(f"{k}={x:g}" for k, x in v.items())
            print(f"| {s}/{r.n_expert} | {policy} | {desc} | {r.kl:.4f} | {r.kl / static_kl:.2f} | {r.ppl:.3f} | "
                  f"{r.swaps} |", flush=True)


if __name__ == "__main__":
    main()
