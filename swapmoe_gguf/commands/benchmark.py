"""`swapmoe bench`: the paper's claim, measured side by side in one invocation.

Speed and memory on a large synthetic MoE (random weights, real shapes), quality on the trained
default model:

* speed cells: `full` and plain llama-cpp-python at 100 % of what `full` needs, then `static`,
  `exact` and `swapmoe` at each smaller budget (a whole-process `--memory-budget P%`). Every cell
  runs in its own process (peak RSS is that process's VmHWM), cells are interleaved over rounds
  (machine drift hits every cell alike), and the file's pages are dropped from the page cache
  before each measured request, so expert misses go to disk. `swapmoe` runs with the plan
  `swapmoe plan` makes for this device.
* type cells: `full` against plain llama-cpp-python on a Mixtral-shaped model of each quant type
  in `--types` (default Q4_K_M, the type most downloads have; ggml-cpu repacks it), page cache kept
  (this compares compute, not disk), interleaved with the speed cells.
* quality cells: perplexity, KL and top-1 agreement against `full` (as `swapmoe eval`) at
  S = the same share of each layer's experts (the default model is small next to the Python
  process, so a whole-process percentage would mostly budget the interpreter).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .bench_speed import (LONG_PROMPT_TOKENS, PROMPT_TOKENS, SPEED_POLICIES, SpeedCell, add_bounds, run_speed,
                          speed_cells)

log = logging.getLogger(__name__)

# quality on the trained model ------------------------------------------------------------------
def slots_for(pct: float, n_expert: int, top_k: int) -> int:
    return max(top_k, min(n_expert, round(pct / 100 * n_expert)))


def run_quality(model: str, text: "str | dict[str, str]", budgets: list[float], *, ctx: int, chunks: int,
                threads: int, floors: tuple[float, ...] = ()) -> list[dict]:
    from ..fileformat.reader import read_gguf
    from .evaluate import run_eval_cells

    info = read_gguf(model)
    n, k = info.n_expert, info.params.n_expert_used
    cells = [(p, slots_for(b, n, k), b, 1.0) for b in budgets if slots_for(b, n, k) < n for p in SPEED_POLICIES]
    cells += [("swapmoe", slots_for(b, n, k), b, t) for b in budgets if slots_for(b, n, k) < n for t in floors]
    res = run_eval_cells(model, text, [(p, s, None, t) for p, s, _, t in cells], ctx=ctx, chunks=chunks,
                         threads=threads)
    rows = [asdict(res[0]) | {"budget_pct": 100.0}]
    rows += [asdict(r) | {"budget_pct": b} for r, (_, _, b, _) in zip(res[1:], cells)]
    return rows



# the whole benchmark ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchOptions:
    out_dir: str = "swapmoe-bench"
    speed_model: str | None = None      # None: the synthetic model, built once in the cache
    quality_model: str | None = None    # None: the embedded default model
    text: str | None = None             # None: the default model's held-out mixed-domain stream
    budgets: tuple[float, ...] = (100.0, 75.0, 50.0, 25.0)
    n_predict: int = 64
    rounds: int = 3
    threads: int = 0
    n_ctx: int = 512
    chunks: int = 12
    eval_ctx: int = 256
    quick: bool = False
    types: tuple[str, ...] = ("q4_k_m",)  # quant types for the stock-speed rows
    floors: tuple[float, ...] = (0.3,)     # swapmoe's quality floors measured beside plain swapmoe
    device: str = ""                       # JSON of the speed cells' placement (n_gpu_layers, rpc_servers, ...)

    @classmethod
    def quick_options(cls, **kw: Any) -> "BenchOptions":
        return cls(**({"budgets": (100.0, 50.0), "n_predict": 16, "rounds": 1, "chunks": 2, "eval_ctx": 128,
                       "quick": True} | kw))


def synthetic_model(quick: bool) -> Path:
    """The synthetic speed model in the user cache (about 2.4 GiB; 210 MiB with --quick)."""
    from ..base.paths import cache_dir
    from ..converters.synthetic import GENERATOR_VERSION, SyntheticShape, write_synthetic_moe

    # quick: experts still dominate the process (~210 MiB of them), so 50 % leaves a real choice of S
    shape = SyntheticShape(layers=4, hidden=1024, ffn=512, experts=32, top_k=4, heads=8, kv_heads=2) if quick \
        else SyntheticShape()
    path = cache_dir() / "synthetic" / (f"synthetic-moe-v{GENERATOR_VERSION}-{shape.layers}x{shape.experts}x{shape.ffn}"
                                        f"x{shape.hidden}.gguf")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing the synthetic speed model ({shape.file_bytes() / 2 ** 30:.2f} GiB) to {path}", file=sys.stderr)
        write_synthetic_moe(path, shape)
    return path


# a Mixtral shape whose experts dominate compute; --quick: a tiny one (K-quants need 256-multiples)
TYPE_SHAPE = dict(hidden=2048, ffn=5632, layers=4, experts=8, heads=16, kv_heads=8)
TYPE_SHAPE_QUICK = dict(hidden=256, ffn=512, layers=2, experts=8, heads=4, kv_heads=2)


def typed_model(qtype: str, quick: bool) -> Path:
    """A Mixtral-shaped model of one quant type (random weights), written once into the user cache,
    for the stock-speed rows: `full` against plain llama-cpp-python where ggml-cpu repacks weights."""
    import tempfile

    import numpy as np

    from ..base.paths import cache_dir
    from ..converters import convert
    from ..converters.tiny_checkpoint import write_tiny_mixtral

    shape = TYPE_SHAPE_QUICK if quick else TYPE_SHAPE
    path = cache_dir() / "synthetic" / f"mixtral-{'x'.join(map(str, shape.values()))}-{qtype}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing the {qtype} speed model to {path}", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=path.parent) as d:
            src = write_tiny_mixtral(Path(d) / "hf", **shape, dtype=np.dtype(np.uint16), std=0.02)
            convert(src, path, qtype, progress=False)
    return path


def machine() -> str:
    import platform

    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2 ** 30:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}")


def run_bench(o: BenchOptions) -> dict[str, Path]:
    from datetime import datetime, timezone

    from .. import __version__
    from ..converters.default_model import default_model, shipped_heldout
    from ..fileformat.reader import read_gguf
    from ..residency.budget import BudgetError
    from . import bench_report
    from .evaluate import SWITCH_EVERY, read_texts

    if not o.budgets or any(not 0 < b <= 100 for b in o.budgets):
        raise BudgetError(f"bench: budgets must be percentages in (0, 100], got {list(o.budgets)}")
    threads = o.threads or max(1, (os.cpu_count() or 2) // 2)
    texts = read_texts([o.text] if o.text else [str(p) for p in shipped_heldout()])
    text_name = (Path(o.text).name if o.text
                 else f"held-out stream of {', '.join(texts)}, switching every {SWITCH_EVERY} chunks")
    speed_model = o.speed_model or str(synthetic_model(o.quick))
    quality_model = o.quality_model or str(default_model())
    info = read_gguf(speed_model)
    if info.layout_problem():
        from ..base.errors import LayoutError

        raise LayoutError(f"{speed_model}: not a swap-ready GGUF ({info.layout_problem()}); run `swapmoe convert`")
    from ..planning.profile import load_or_measure
    from ..runtime import SwapMoELlama

    dev = json.loads(o.device) if o.device else {}
    if dev.get("rpc_servers"):
        from ..llamacpp.devices import add_rpc_servers

        add_rpc_servers(dev["rpc_servers"])
    # profile once (cached), before anything is timed
    prof = load_or_measure(info, SwapMoELlama, threads=threads, n_gpu_layers=int(dev.get("n_gpu_layers", 0)))
    cells = speed_cells(speed_model, sorted(o.budgets, reverse=True), o.n_predict, threads, o.n_ctx, o.floors,
                        device=o.device)
    cells += [SpeedCell(str(typed_model(t, o.quick)), p, 100.0, o.n_predict, threads, o.n_ctx, label=t,
                        drop_cache=False) for t in o.types for p in ("full", "plain")]
    t0 = time.perf_counter()
    measured = [r.summary() for r in run_speed(cells, o.rounds)]
    speed = add_bounds([r for r in measured if not r["label"]], prof.read_mb_s)
    types = [r for r in measured if r["label"]]
    quality = run_quality(quality_model, texts, list(o.budgets), ctx=o.eval_ctx, chunks=o.chunks, threads=threads,
                          floors=o.floors)
    qinfo = read_gguf(quality_model)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "threads": threads, "rounds": o.rounds, "read_mb_s": round(prof.read_mb_s, 1), "n_predict": o.n_predict,
            "prompt_tokens": PROMPT_TOKENS, "long_prompt_tokens": min(LONG_PROMPT_TOKENS, o.n_ctx - 8),
            "version": __version__,
            "speed_model": f"{Path(speed_model).name} ({info.total_bytes / 2 ** 30:.2f} GiB, {len(info.moe_layers)} "
                           f"MoE layers x {info.n_expert} experts, top-{info.params.n_expert_used})",
            # what floor_targets needs to price the trained model's on-demand loads on the synthetic model
            "speed_shape": {"moe_layers": len(info.moe_layers), "top_k": info.params.n_expert_used,
                            "expert_bytes": info.expert_bytes},
            "quality_shape": {"moe_layers": len(qinfo.moe_layers), "top_k": qinfo.params.n_expert_used},
            "quality_model": Path(quality_model).name, "quality_text": f"{text_name}, {o.chunks} chunks "
            f"of {o.eval_ctx} tokens", "seconds": round(time.perf_counter() - t0, 1), "options": asdict(o)}
    return bench_report.write(Path(o.out_dir), meta, speed, quality, types)
