"""Time to the first token of a fresh process on a model with nothing cached (issue 26's first start).

The model's calibration cache is removed and its pages are dropped from the page cache, then one
process imports the package, builds `SwapMoELlama` (calibration included) and evaluates a prompt:

    python bench/first_start.py [-m MODEL] [--memory-budget 8GiB] [-t 2] [--policy swapmoe]

Default model: the `swapmoe bench --scale` one (48 layers, 29 GiB; written once into the cache).
Target: the first token within 60 s.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

T0 = time.perf_counter()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--memory-budget", default="8GiB")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--policy", default="swapmoe")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import numpy as np

    from swapmoe_gguf.base.paths import cache_dir
    from swapmoe_gguf.runtime import SwapMoELlama

    if a.model is None:
        from swapmoe_gguf.commands.bench_scale import scale_model

        a.model = str(scale_model())
    for p in (cache_dir() / "calibration").glob(os.path.basename(a.model) + "-*"):
        p.unlink()
    with open(a.model, "rb") as f:  # a cold start: none of the file in the page cache
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    t1 = time.perf_counter()
    llm = SwapMoELlama(a.model, memory_budget=a.memory_budget, policy=a.policy, n_ctx=256, n_threads=a.threads,
                       n_threads_batch=a.threads)
    t2 = time.perf_counter()
    llm.eval(llm.tokenize(b"The quick brown fox jumps over the lazy dog.", add_bos=True))
    int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t3 = time.perf_counter()
    print(f"{os.path.basename(a.model)}, {a.policy} at {a.memory_budget}, S={llm.vmodel.slots}: imports "
          f"{t1 - T0:.1f} s, model and calibration {t2 - t1:.1f} s, prompt {t3 - t2:.1f} s; first token "
          f"{t3 - T0:.1f} s after the start (target <= 60 s: {'met' if t3 - T0 <= 60 else 'missed'})")
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
