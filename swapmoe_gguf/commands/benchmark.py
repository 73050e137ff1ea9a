"""`swapmoe bench`: the paper's claim, measured side by side in one invocation, on one model.

The bench model is the trained default model with its experts widened by zeros to real expert sizes
(converters/widened.py: the default model's routing and logits, Qwen3-30B-A3B-like bytes per
expert, Q8_0), built once into the cache in seconds. Speed and quality are both measured on it:

* speed cells: `full` and plain llama-cpp-python at 100 % of what `full` needs, then `static`,
  `exact`, `swapmoe` and swapmoe with each quality floor at each smaller budget (a whole-process
  `--memory-budget P%`). Every cell runs in its own process (peak RSS is that process's VmHWM),
  cells are interleaved over rounds (machine drift hits every cell alike), and the file's pages are
  dropped from the page cache before each measured request, so expert misses go to disk. `swapmoe`
  runs with the plan `swapmoe plan` makes for this device.
* quality cells: perplexity, KL and top-1 agreement against `full` on the mixed-domain stream, for
  each speed cell at the S its budget gave it (and `swapmoe` with the same plan), so every policy at
  every budget has both its KL and its decode speed: the quality-speed frontier.
* worst case: the same speed cells on a synthetic model of random routing (no locality, the worst
  case for every residency policy), labelled so in the table.
* type cells: `full` against plain llama-cpp-python on a Mixtral-shaped model of each quant type
  in `--types` (default Q4_K_M, the type most downloads have; ggml-cpu repacks it), page cache kept
  (this compares compute, not disk), interleaved with the speed cells.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .bench_speed import (LONG_PROMPT_TOKENS, PROMPT_TOKENS, SPEED_POLICIES, SpeedCell, add_bounds, run_speed,
                          speed_cells)

log = logging.getLogger(__name__)

# quality on the bench model -------------------------------------------------------------------
def slots_for(pct: float, n_expert: int, top_k: int) -> int:
    return max(top_k, min(n_expert, round(pct / 100 * n_expert)))


@dataclass(frozen=True)
class QualityCell:
    policy: str
    slots: int
    budget_pct: float
    max_dropped_mass: float = 1.0


def quality_cells(speed: list[dict], budgets: list[float], n_expert: int, top_k: int,
                  floors: tuple[float, ...]) -> list[QualityCell]:
    """One quality cell per speed cell below 100 %, at the S that cell ran with (its budget's share
    of the experts where the speed cell failed)."""
    got = {(r["policy"], r["budget_pct"], r.get("max_dropped_mass", 1.0)): r.get("experts_per_layer") for r in speed}
    cells = []
    for b in budgets:
        for policy, tau in [(p, 1.0) for p in SPEED_POLICIES] + [("swapmoe", t) for t in floors if t < 1.0]:
            s = got.get((policy, b, tau)) or slots_for(b, n_expert, top_k)
            if s < n_expert:
                cells.append(QualityCell(policy, s, b, tau))
    return cells


def run_quality(model: str, text: "str | dict[str, str]", cells: list[QualityCell], *, ctx: int, chunks: int,
                threads: int, plan_ctx: int = 512) -> list[dict]:
    """`full` (the reference), then each cell on the same tokens; `swapmoe` with the plan its speed
    cell had (the same S, F, Q and commit pacing)."""
    from ..fileformat.reader import read_gguf
    from ..planning.planner import make_plan
    from ..planning.profile import load_or_measure
    from ..runtime import SwapMoELlama
    from .evaluate import evaluate, run_reference

    info = read_gguf(model)
    prof = load_or_measure(info, SwapMoELlama, threads=threads)
    kw, toks, ref, reference = run_reference(model, text, ctx=ctx, chunks=chunks, threads=threads)
    rows = [asdict(ref) | {"kl": 0.0, "top1_agreement": 1.0, "budget_pct": 100.0,
                           "domains": [asdict(d) | {"kl": 0.0, "top1_agreement": 1.0} for d in ref.domains]}]
    for c in cells:
        plan = None
        if c.policy == "swapmoe":  # F and Q depend on S, not on the budget that gave it
            plan = make_plan(info, prof, None, n_ctx=plan_ctx, threads=threads, experts_per_layer=c.slots)
        llm = SwapMoELlama(model, policy=c.policy, experts_per_layer=c.slots, plan=plan,
                           max_dropped_mass=c.max_dropped_mass, **kw)
        try:
            rows.append(asdict(evaluate(llm, toks, reference)[0]) | {"budget_pct": c.budget_pct})
        finally:
            llm.close()
            del llm
    return rows


# the whole benchmark ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchOptions:
    out_dir: str = "swapmoe-bench"
    speed_model: str | None = None      # None: the bench model (the default model widened), built once in the cache
    quality_model: str | None = None    # None: the speed model
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
    worst_case: bool = True                # also the speed cells on the random-routing synthetic model
    # budgets below 100 %: that share of each layer's experts resident (S, as the quality cells), the
    # memory it takes reported beside it; False: a whole-process --memory-budget of that % of `full`'s
    share_of_experts: bool = True

    @classmethod
    def quick_options(cls, **kw: Any) -> "BenchOptions":
        return cls(**({"budgets": (100.0, 50.0), "n_predict": 16, "rounds": 1, "chunks": 2, "eval_ctx": 128,
                       "quick": True, "worst_case": False} | kw))


WORST_CASE = "random routing"  # the label of the worst-case speed rows
BENCH_WIDTH = 8192        # per-expert FFN width of the bench model: 4.8 MiB per Q8_0 expert (Qwen3-30B-A3B: 4.8 MiB)
BENCH_WIDTH_QUICK = 2048  # --quick: 1.2 MiB per expert, 230 MiB in all


def bench_model(quick: bool) -> Path:
    """The bench model in the user cache: the default model, experts widened by zeros to
    BENCH_WIDTH, Q8_0 (0.9 GiB; 230 MiB with --quick). Seconds to build, no training."""
    from ..base.paths import cache_dir
    from ..converters.default_model import default_model
    from ..converters.widened import WIDENED_VERSION, widen

    src = default_model()
    width = BENCH_WIDTH_QUICK if quick else BENCH_WIDTH
    path = cache_dir() / "bench" / f"{src.stem.removesuffix('-f16')}-w{width}-q8_0-v{WIDENED_VERSION}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing the bench model (the default model, experts widened to {width}, Q8_0) to {path}",
              file=sys.stderr)
        widen(src, path, width, "q8_0")
    return path


def synthetic_model(quick: bool) -> Path:
    """The random-routing synthetic model in the user cache (about 2.4 GiB; 210 MiB with --quick)."""
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


def _model_desc(path: str, info: Any) -> str:
    return (f"{Path(path).name} ({info.total_bytes / 2 ** 30:.2f} GiB, {len(info.moe_layers)} MoE layers x "
            f"{info.n_expert} experts of {info.expert_bytes / 2 ** 20:.2f} MiB, top-{info.params.n_expert_used})")


def run_bench(o: BenchOptions) -> dict[str, Path]:
    from datetime import datetime, timezone

    from .. import __version__
    from ..converters.default_model import shipped_heldout
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
    speed_model = o.speed_model or str(bench_model(o.quick))
    quality_model = o.quality_model or speed_model
    info = read_gguf(speed_model)
    if info.layout_problem():
        from ..base.errors import LayoutError

        raise LayoutError(f"{speed_model}: not a swap-ready GGUF ({info.layout_problem()}); run `swapmoe convert`")
    worst_model = str(synthetic_model(o.quick)) if o.worst_case else None
    from ..planning.profile import load_or_measure
    from ..runtime import SwapMoELlama

    dev = json.loads(o.device) if o.device else {}
    if dev.get("rpc_servers"):
        from ..llamacpp.devices import add_rpc_servers

        add_rpc_servers(dev["rpc_servers"])
    # profile once (cached), before anything is timed
    ngl = int(dev.get("n_gpu_layers", 0))
    prof = load_or_measure(info, SwapMoELlama, threads=threads, n_gpu_layers=ngl)
    budgets = sorted(o.budgets, reverse=True)
    cells = speed_cells(speed_model, budgets, o.n_predict, threads, o.n_ctx, o.floors, device=o.device,
                        share_of_experts=o.share_of_experts)
    worst_prof = None
    if worst_model:
        worst_prof = load_or_measure(read_gguf(worst_model), SwapMoELlama, threads=threads, n_gpu_layers=ngl)
        cells += [replace(c, label=WORST_CASE) for c in speed_cells(worst_model, budgets, o.n_predict, threads,
                                                                        o.n_ctx, o.floors, device=o.device,
                                                                        share_of_experts=o.share_of_experts)
                  if c.policy != "plain"]
    cells += [SpeedCell(str(typed_model(t, o.quick)), p, 100.0, o.n_predict, threads, o.n_ctx, label=t,
                        drop_cache=False) for t in o.types for p in ("full", "plain")]
    t0 = time.perf_counter()
    measured = [r.summary() for r in run_speed(cells, o.rounds)]
    speed = add_bounds([r for r in measured if not r["label"]], prof.read_mb_s)
    worst = add_bounds([r for r in measured if r["label"] == WORST_CASE], worst_prof.read_mb_s) if worst_prof else []
    types = [r for r in measured if r["label"] and r["label"] != WORST_CASE]
    qinfo = read_gguf(quality_model)
    qcells = quality_cells(speed if quality_model == speed_model else [], [b for b in budgets if b < 100],
                           qinfo.n_expert, qinfo.params.n_expert_used, o.floors)
    quality = run_quality(quality_model, texts, qcells, ctx=o.eval_ctx, chunks=o.chunks, threads=threads,
                          plan_ctx=o.n_ctx)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "threads": threads, "rounds": o.rounds, "read_mb_s": round(prof.read_mb_s, 1), "n_predict": o.n_predict,
            "prompt_tokens": PROMPT_TOKENS, "long_prompt_tokens": min(LONG_PROMPT_TOKENS, o.n_ctx - 8),
            "version": __version__, "speed_model": _model_desc(speed_model, info),
            "one_model": quality_model == speed_model, "share_of_experts": o.share_of_experts,
            "worst_case_model": _model_desc(worst_model, read_gguf(worst_model)) if worst_model else None,
            "worst_read_mb_s": round(worst_prof.read_mb_s, 1) if worst_prof else None,
            "quality_model": Path(quality_model).name, "quality_text": f"{text_name}, {o.chunks} chunks "
            f"of {o.eval_ctx} tokens", "seconds": round(time.perf_counter() - t0, 1), "options": asdict(o)}
    return bench_report.write(Path(o.out_dir), meta, speed, quality, types, worst=worst)
