"""`swapmoe demo`: the main job on the embedded default model, end to end, nothing downloaded.

The shipped checkpoint (`data/shakespeare-moe`, a 16-expert Mixtral-architecture model trained
on Shakespeare by bench/train_default_moe.py) is converted once into the user cache; then a
passage is generated with about a third of the experts resident,
with `swapmoe` and with `static` (the pruned model) side by side, and the held-out perplexity
of both is measured against the full model.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from importlib import resources
from pathlib import Path

from .budget import fmt
from .inspect import render, summary
from .paths import cache_dir

PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?\n"


def shipped_checkpoint() -> Path:
    return Path(str(resources.files("swapmoe_gguf") / "data" / "shakespeare-moe"))


def default_model(directory: Path | None = None, force: bool = False) -> Path:
    """The embedded default model as a swap-ready F16 GGUF, converted once into the cache."""
    from .converters import convert

    ckpt = shipped_checkpoint()
    digest = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()[:12]
    gguf = (directory or cache_dir() / "default") / f"shakespeare-moe-{digest}-f16.gguf"
    if force or not gguf.is_file():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        print(f"converting the embedded default model to {gguf}", file=sys.stderr)
        # F16: its 192 x 192 experts are 18 pages each, so every expert slice is page-aligned.
        convert(ckpt, gguf, "f16", force=True)
    return gguf


def run_demo(directory: str | None, force: bool = False) -> int:
    from .evaluate import render as render_eval
    from .evaluate import run_eval
    from .gguf_info import read_gguf
    from .runtime import SwapMoELlama

    gguf = default_model(Path(directory) if directory else None, force)
    info = read_gguf(gguf)
    print(render(summary(info)))
    n = info.n_expert
    slots = max(info.params.n_expert_used, round(n / 3))
    threads = min(4, os.cpu_count() or 1)
    kw = dict(n_ctx=512, n_threads=threads, n_threads_batch=threads, seed=1)
    # This model is small next to the Python process around it (~60 MiB), so a whole-process budget
    # would be mostly interpreter; the demo fixes S directly and reports expert memory and peak RSS.
    for policy in ("swapmoe", "static"):
        llm = SwapMoELlama(str(gguf), experts_per_layer=slots, policy=policy, **kw)
        mem = llm.memory
        if policy == "swapmoe":
            print(f"\nabout a third of the experts resident: {slots} of {n} per layer = "
                  f"{fmt(slots * mem.per_slot)} of {fmt(n * mem.per_slot)} expert weights; the process plans "
                  f"{fmt(mem.total())} ({mem.parts()})\n")
        try:
            t0 = time.perf_counter()
            out = llm.create_completion(PROMPT, max_tokens=80, temperature=0.7, top_p=0.95, seed=1)
            dt = time.perf_counter() - t0
            t = llm.telemetry()
            print(f"--- {policy}: {t.slots} of {n} experts resident per layer ---")
            print(PROMPT + out["choices"][0]["text"].rstrip())
            hit = f"{t.hit_rate:.1%}" if t.hit_rate is not None else "- (no router scoring)"
            print(f"[{out['usage']['completion_tokens']} tokens in {dt:.2f} s, "
                  f"{t.decode_tokens / max(t.decode_seconds, 1e-9):.0f} tok/s decoding; hit rate {hit}; "
                  f"swaps {t.swaps}; peak RSS {fmt(t.peak_rss_bytes)}, planned {fmt(llm.memory.total())}]\n")
        finally:
            llm.close()
            del llm  # before the next model measures the process's baseline
    held = (shipped_checkpoint() / "heldout-macbeth.txt").read_text(encoding="utf-8")
    print("held-out perplexity (Macbeth, never trained on; each 256-token chunk is a request: first half "
          "prompt, second half decoded step by step and scored):")
    print(render_eval(run_eval(str(gguf), held, policies=["swapmoe", "static"], experts_per_layer=slots,
                               memory_budget=None, ctx=256, chunks=6, threads=threads)))
    return 0
