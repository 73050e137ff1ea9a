"""`swapmoe demo`: the main job on an embedded default, end to end, with nothing downloaded.

Until the trained default model ships (issue: embedded default model), the demo builds a small
random Mixtral checkpoint with numpy, converts it to a swap-ready Q8_0 GGUF, inspects it and
runs it on the Virtual Experts runtime with 3 of its 8 experts per layer resident. Random
weights: the generated text is noise.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .inspect import render, summary
from .paths import cache_dir


def default_model(directory: Path | None = None, force: bool = False) -> Path:
    """The embedded default model as a swap-ready GGUF, built and converted once into the cache."""
    from .converters import convert
    from .converters.tiny_checkpoint import write_tiny_mixtral

    root = directory or cache_dir() / "demo"
    ckpt, gguf = root / "tiny-mixtral-hf", root / "tiny-mixtral-q8_0.gguf"
    if force or not (ckpt / "config.json").is_file():
        print(f"building a random 8-expert Mixtral checkpoint in {ckpt}")
        # 256 x 512 experts: Q8_0 slices of exactly 34 pages, so every slice is page-aligned.
        write_tiny_mixtral(ckpt, hidden=256, ffn=512, layers=4, experts=8, top_k=2, heads=8, kv_heads=4)
    if force or not gguf.is_file():
        r = convert(ckpt, gguf, "q8_0", force=True)
        print(f"converted to {gguf} in {r.seconds:.1f} s")
    return gguf


def run_demo(directory: str | None, force: bool = False) -> int:
    from .gguf_info import read_gguf

    gguf = default_model(Path(directory) if directory else None, force)
    print(render(summary(read_gguf(gguf))))

    from .budget import fmt
    from .runtime import SwapMoELlama

    rt = SwapMoELlama(str(gguf), experts_per_layer=3, n_ctx=256, n_threads=min(4, os.cpu_count() or 1), seed=1)
    t0 = time.perf_counter()
    out = rt.create_completion("the expert", max_tokens=48, temperature=0.0)
    dt = time.perf_counter() - t0
    t = rt.telemetry()
    n = out["usage"]["completion_tokens"]
    print(f"\nSwapMoE runtime: {t.slots} of {rt.vmodel.n_expert} experts resident per layer "
          f"(slot map {dict(t.resident)})")
    print(f"generated {n} tokens in {dt:.2f} s ({n / dt:.0f} tok/s); router hit rate "
          f"{t.hit_rate:.1%} (share of the full router's top-2 mass on resident experts)")
    print(f"peak RSS {fmt(t.peak_rss_bytes)}; planned {fmt(rt.memory.total())} = {rt.memory.parts()}")
    print("weights are random, so the text is noise; the trained default model comes with the eval issue")
    rt.close()
    return 0
