"""Where a decode step's time goes, in one process: the whole step, the part inside llama_decode, and
the scheduler's hooks (telemetry), per round of greedy decoding on topic-switching prompts.

The processes of `decode_loop.py` are fresh each round; this one keeps one model for all rounds, so
the figures of a code version can be compared with another's run right after it (each line of the
output one process):

    python bench/decode_steps.py --policy swapmoe|swapmoe-plan|static|full [-m MODEL] [--experts 16] [--rounds 3] [-n 64] [-t 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_loop import PLANNED, PROMPTS  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="swapmoe", choices=("swapmoe", "static", "full", PLANNED))
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", type=int, default=64, help="tokens per prompt")
    ap.add_argument("-t", "--threads", type=int, default=1)
    a = ap.parse_args()
    import numpy as np

    from swapmoe_gguf.commands.evaluate import last_logits
    from swapmoe_gguf.converters.default_model import default_model
    from swapmoe_gguf.runtime import SwapMoELlama

    kw: dict = {} if a.policy == "full" else {"experts_per_layer": a.experts}
    model = a.model or str(default_model())
    if a.policy == PLANNED:  # the planner's F and Q for S on this device
        from swapmoe_gguf.fileformat.reader import read_gguf
        from swapmoe_gguf.planning.profile import load_or_measure

        load_or_measure(read_gguf(model), SwapMoELlama, threads=a.threads)
        kw["scheduler"] = "auto"
    llm = SwapMoELlama(model, policy="swapmoe" if a.policy == PLANNED else a.policy, n_ctx=512, n_threads=a.threads,
                       n_threads_batch=a.threads, verbose=False, **kw)
    rows = []
    for _ in range(a.rounds):
        t = llm.telemetry_
        t.decode_seconds, t.decode_tokens, t.decode_sched_seconds = 0.0, 0, 0.0
        t0, n = time.perf_counter(), 0
        for text in PROMPTS:
            llm.reset()
            llm.eval(llm.tokenize(text.encode(), add_bos=True))
            for _ in range(a.n):
                llm.eval([int(np.argmax(last_logits(llm)))])
                n += 1
        rows.append((1e6 * (time.perf_counter() - t0) / n, 1e6 * t.decode_seconds / t.decode_tokens,
                     1e6 * t.decode_sched_seconds / t.decode_tokens))
    print(f"{a.policy}: step / in llama_decode / scheduler, us per token, per round: "
          + ", ".join(f"{s:.0f} / {d:.0f} / {h:.0f}" for s, d, h in rows) + f"; swaps {llm.telemetry_.swaps}")
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
