"""How good can one expert set per request be? An upper bound for SwapMoE's quality target.

    python bench/oracle_sets.py [--experts-per-layer 24 16 8] [--chunks 12]

For each evaluation chunk of `swapmoe eval` (the default model's held-out mixed-domain stream, 256 tokens: first half prompt,
second half scored), the oracle knows the future: it scores every expert with Eq. 1 on the FULL
model over the chunk itself (or only its scored half), keeps the top-S per layer for the whole
request and is evaluated exactly like the policies (KL to full on the scored half). No scheduler
that holds one set per request can beat it; only swapping within the request can.
"""
from __future__ import annotations

import argparse

import numpy as np

from swapmoe_gguf.converters.default_model import default_model, shipped_heldout
from swapmoe_gguf.commands.evaluate import evaluate, read_texts, stream_chunks
from swapmoe_gguf.residency.calibration import _Collector
from swapmoe_gguf.runtime import SwapMoELlama
from swapmoe_gguf.residency.scheduler import ImportanceScheduler, SchedulerConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts-per-layer", type=int, nargs="+", default=[24, 16, 8])
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    path = str(default_model())
    texts = read_texts([str(p) for p in shipped_heldout()])
    kw = dict(n_ctx=264, n_batch=256, n_threads=a.threads, n_threads_batch=a.threads, verbose=False, seed=1)
    full = SwapMoELlama(path, policy="full", **kw)
    chunks = stream_chunks(full, texts, 256, a.chunks)
    _, reference = evaluate(full, chunks)
    vm = full.vmodel
    scores: dict[str, list[ImportanceScheduler]] = {"whole chunk": [], "scored half": []}
    for which, out in scores.items():
        for chunk in chunks:
            toks = chunk.tokens
            sched = ImportanceScheduler(vm.moe_layers, vm.n_expert, vm.top_k, vm.info.expert_norms,  # type: ignore[arg-type]
                                        SchedulerConfig(decay=1 - 1e-9, interval=1 << 30, quota=0))
            full.policy, full.tap.enabled = _Collector(sched), True
            full.reset()
            half = len(toks) // 2
            if which == "scored half":
                full.eval(toks[:half])
                sched.scores[:] = 0
                full.eval(toks[half:])
            else:
                full.eval(toks)
            out.append(sched)
    full.close()
    print(f"oracle per-request expert sets, {len(chunks)} chunks of 256 tokens; KL(full || oracle), nats/token")
    print("| S | oracle from the whole chunk | oracle from the scored half |\n|---|---|---|")
    for s in a.experts_per_layer:
        row = []
        for which, scheds in scores.items():
            kls = []
            for chunk, ref, sched in zip(chunks, reference, scheds):
                llm = SwapMoELlama(path, policy="static", experts_per_layer=s,
                                   initial_experts={l: sched.target(l, s) for l in vm.moe_layers}, **kw)
                try:
                    kls.append(evaluate(llm, [chunk], [ref])[0].kl)
                finally:
                    llm.close()
            row.append(float(np.mean(kls)))
        print(f"| {s}/{vm.n_expert} | {row[0]:.4f} | {row[1]:.4f} |")


if __name__ == "__main__":
    main()
