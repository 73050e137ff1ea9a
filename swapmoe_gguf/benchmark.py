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
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPEED_POLICIES = ("static", "exact", "swapmoe")
PROMPT_TOKENS = 64
LONG_PROMPT_TOKENS = 448  # a second, prefill-only request (as llama-bench's pp512, within n_ctx 512)


@dataclass(frozen=True)
class SpeedCell:
    model: str
    policy: str          # full, plain (stock llama-cpp-python), static, exact, swapmoe
    budget_pct: float
    n_predict: int
    threads: int
    n_ctx: int
    label: str = ""          # a type cell: its quant type
    drop_cache: bool = True  # drop the file's pages before the measured request (misses go to disk)
    max_dropped_mass: float = 1.0  # swapmoe's quality floor (1: none)
    budget: str = ""         # an absolute budget ("8GiB") instead of budget_pct
    long_prompt: bool = True  # also time a prefill-only request of LONG_PROMPT_TOKENS

    @property
    def memory_budget(self) -> str:
        return self.budget or f"{self.budget_pct:g}%"


@dataclass
class SpeedResult:
    policy: str
    budget_pct: float
    label: str = ""
    repacked_tensors: int | None = None
    max_dropped_mass: float = 1.0
    experts_per_layer: int | None = None
    n_expert: int | None = None
    decode_tok_s: list[float] = field(default_factory=list)   # one per round
    prefill_tok_s: list[float] = field(default_factory=list)
    prefill_long_tok_s: list[float] = field(default_factory=list)   # the long prompt's prefill
    prefill_read_bytes: list[float] = field(default_factory=list)   # read from disk during the short prompt
    ttft_ms: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)         # every decode step of every round
    peak_rss: list[int] = field(default_factory=list)
    budget_bytes: int | None = None
    disk_bytes_per_token: list[float] = field(default_factory=list)
    hit_rate: list[float] = field(default_factory=list)
    swaps_per_token: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        med = lambda v: round(statistics.median(v), 2) if v else None  # noqa: E731
        pct = lambda q: round(float(_percentile(self.step_ms, q)), 2) if self.step_ms else None  # noqa: E731
        peak = max(self.peak_rss) if self.peak_rss else None
        return {"policy": self.policy, "budget_pct": self.budget_pct, "label": self.label,
                "max_dropped_mass": self.max_dropped_mass,
                "repacked_tensors": self.repacked_tensors, "experts_per_layer": self.experts_per_layer,
                "n_expert": self.n_expert, "decode_tok_s": med(self.decode_tok_s),
                "prefill_tok_s": med(self.prefill_tok_s), "prefill_long_tok_s": med(self.prefill_long_tok_s),
                "prefill_read_bytes": med(self.prefill_read_bytes), "ttft_ms": med(self.ttft_ms), "p50_ms": pct(50),
                "p99_ms": pct(99), "peak_rss": peak, "budget_bytes": self.budget_bytes,
                "within_budget": None if peak is None or self.budget_bytes is None else peak <= self.budget_bytes,
                "disk_bytes_per_token": med(self.disk_bytes_per_token), "hit_rate": med(self.hit_rate),
                "swaps_per_token": med(self.swaps_per_token), "rounds": len(self.decode_tok_s),
                "errors": self.errors}


def _percentile(v: list[float], q: float) -> float:
    s = sorted(v)
    i = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[i]


# one cell, in its own process ---------------------------------------------------------------
def _disk_read_bytes() -> int | None:
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))
    except (OSError, StopIteration, ValueError):
        return None


def _vm_hwm() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import psutil

        return psutil.Process().memory_info().rss


def _drop_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_speed_cell(cell: SpeedCell) -> dict[str, Any]:
    """Load the model as the cell says, serve one warm-up request, then measure one request."""
    import llama_cpp

    from .budget import estimate
    from .errors import SwapMoEError
    from .gguf_info import read_gguf
    from .runtime import SwapMoELlama

    info = read_gguf(cell.model)
    kw = dict(n_ctx=cell.n_ctx, n_batch=min(512, cell.n_ctx), n_threads=cell.threads,
              n_threads_batch=cell.threads, verbose=False, seed=1, flash_attn=True)
    full_bytes = estimate(info, n_ctx=cell.n_ctx, n_batch=kw["n_batch"]).total()  # what `full` needs
    if cell.policy == "plain":
        llm: Any = llama_cpp.Llama(cell.model, **kw)
    else:
        plan = None
        if cell.policy == "swapmoe":
            from .budget import parse_budget, plan_slots
            from .planner import make_plan
            from .profile import load_or_measure

            budget = parse_budget(cell.memory_budget)
            prof = load_or_measure(info, threads=cell.threads)
            # the S the runtime picks for this budget (as for static and exact), then F and Q for it
            slots = plan_slots(estimate(info, n_ctx=cell.n_ctx, n_batch=kw["n_batch"]), budget, None).slots
            plan = make_plan(info, prof, budget, n_ctx=cell.n_ctx, threads=cell.threads, experts_per_layer=slots)
        llm = SwapMoELlama(cell.model, policy=cell.policy, memory_budget=cell.memory_budget, plan=plan,
                           max_dropped_mass=cell.max_dropped_mass, **kw)
    ours = isinstance(llm, SwapMoELlama)
    try:
        # Teacher-forced: every cell decodes the same token stream (a text, one token per step), so
        # routing varies as it does on real text and all policies do identical work.
        from importlib import resources

        text = (resources.files("swapmoe_gguf") / "data" / "calibration.txt").read_text(encoding="utf-8")
        toks = llm.tokenize(text.encode())
        if len(toks) < PROMPT_TOKENS + cell.n_predict + 24:
            raise SwapMoEError(f"bench text has {len(toks)} tokens; -n {cell.n_predict} needs "
                               f"{PROMPT_TOKENS + cell.n_predict + 24}")
        long_prompt = toks[: min(LONG_PROMPT_TOKENS, cell.n_ctx - 8, len(toks) - 24)]
        prompt, follow = toks[:PROMPT_TOKENS], toks[PROMPT_TOKENS:PROMPT_TOKENS + cell.n_predict]
        llm.reset()  # a warm-up request first, as a server has had: another part of the text
        llm.eval(toks[-24:-8])
        for tok in toks[-8:]:
            llm.eval([tok])
        llm.reset()
        if cell.drop_cache:
            _drop_page_cache(cell.model)
        io_p = _disk_read_bytes()
        t0 = time.perf_counter()
        llm.eval(prompt)
        ttft = time.perf_counter() - t0  # the first token's logits are ready
        io0 = _disk_read_bytes()
        before = (llm.telemetry_.swaps, llm.telemetry_.hit_mass, llm.telemetry_.hit_count) if ours else None
        steps: list[float] = []
        for tok in follow[:-1]:
            t1 = time.perf_counter()
            llm.eval([tok])
            steps.append(time.perf_counter() - t1)
        io1 = _disk_read_bytes()
        long_s = None
        if cell.long_prompt:  # then a long prompt alone (prefill throughput), the file's pages dropped again
            llm.reset()
            if cell.drop_cache:
                _drop_page_cache(cell.model)
            t2 = time.perf_counter()
            llm.eval(long_prompt)
            long_s = time.perf_counter() - t2
        out: dict[str, Any] = {
            "decode_tok_s": len(steps) / sum(steps), "prefill_tok_s": len(prompt) / ttft, "ttft_ms": 1e3 * ttft,
            "prefill_long_tok_s": None if long_s is None else len(long_prompt) / long_s,
            "prefill_read_bytes": None if io_p is None or io0 is None else io0 - io_p,
            "step_ms": [1e3 * s for s in steps], "peak_rss": _vm_hwm(),
            "disk_bytes_per_token": None if io0 is None or io1 is None else (io1 - io0) / len(steps),
            "budget_bytes": full_bytes, "n_expert": info.n_expert, "experts_per_layer": info.n_expert}
        if ours:
            t = llm.telemetry_
            hits = t.hit_count - before[2]
            out |= {"budget_bytes": llm.budget_bytes or full_bytes, "experts_per_layer": llm.vmodel.slots,
                    "repacked_tensors": len(llm.vmodel.repacked),
                    "hit_rate": (t.hit_mass - before[1]) / hits if hits else (1.0 if cell.policy == "full" else None),
                    "swaps_per_token": (t.swaps - before[0]) / len(steps)}
        return out
    finally:
        llm.close()


def _run_in_child(cell: SpeedCell, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "swapmoe_gguf.benchmark", json.dumps(asdict(cell))]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {p.returncode}: {tail}"}
    return json.loads(lines[-1])  # a result, or {"error": ...} for bad input


def speed_cells(model: str, budgets: list[float], n_predict: int, threads: int, n_ctx: int,
                floors: tuple[float, ...] = ()) -> list[SpeedCell]:
    cells = [SpeedCell(model, p, 100.0, n_predict, threads, n_ctx) for p in ("full", "plain")]
    for b in budgets:
        if b < 100:
            cells += [SpeedCell(model, p, b, n_predict, threads, n_ctx) for p in SPEED_POLICIES]
            cells += [SpeedCell(model, "swapmoe", b, n_predict, threads, n_ctx, max_dropped_mass=t) for t in floors]
    return cells


def add_bounds(rows: list[dict], read_mb_s: float) -> list[dict]:
    """Per row, the bound it could reach on this machine: `full`'s time per token (compute) plus the
    bytes it had to read per token at the measured read bandwidth; and how far above it it runs."""
    full = next((r for r in rows if r["policy"] == "full" and r["decode_tok_s"]), None)
    out = []
    for r in rows:
        bound = ratio = None
        if full is not None and r["decode_tok_s"] and r["disk_bytes_per_token"] is not None and read_mb_s > 0:
            bound = 1e3 / full["decode_tok_s"] + r["disk_bytes_per_token"] / (read_mb_s * 1e6) * 1e3
            ratio = (1e3 / r["decode_tok_s"]) / bound
        out.append(r | {"bound_ms": None if bound is None else round(bound, 2),
                        "x_bound": None if ratio is None else round(ratio, 2)})
    return out


def run_speed(cells: list[SpeedCell], rounds: int, timeout: float = 900) -> list[SpeedResult]:
    """Every cell once per round, in order (interleaved), each in a fresh process."""
    results = {c: SpeedResult(c.policy, c.budget_pct, c.label, max_dropped_mass=c.max_dropped_mass) for c in cells}
    for r in range(rounds):
        for c in cells:
            log.info("round %d/%d: %s at %g%%", r + 1, rounds, c.policy, c.budget_pct)
            out = _run_in_child(c, timeout)
            res = results[c]
            if "error" in out:
                res.errors.append(out["error"])
                log.warning("%s at %g%%: %s", c.policy, c.budget_pct, out["error"])
                continue
            res.experts_per_layer, res.n_expert = out["experts_per_layer"], out["n_expert"]
            res.budget_bytes, res.repacked_tensors = out["budget_bytes"], out.get("repacked_tensors")
            for k in ("decode_tok_s", "prefill_tok_s", "prefill_long_tok_s", "prefill_read_bytes", "ttft_ms",
                      "peak_rss", "disk_bytes_per_token", "hit_rate", "swaps_per_token"):
                if out.get(k) is not None:
                    getattr(res, k).append(out[k])
            res.step_ms.extend(out["step_ms"])
    return list(results.values())


# quality on the trained model ------------------------------------------------------------------
def slots_for(pct: float, n_expert: int, top_k: int) -> int:
    return max(top_k, min(n_expert, round(pct / 100 * n_expert)))


def run_quality(model: str, text: "str | dict[str, str]", budgets: list[float], *, ctx: int, chunks: int,
                threads: int, floors: tuple[float, ...] = ()) -> list[dict]:
    from .evaluate import run_eval_cells
    from .gguf_info import read_gguf

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

    @classmethod
    def quick_options(cls, **kw: Any) -> "BenchOptions":
        return cls(**({"budgets": (100.0, 50.0), "n_predict": 16, "rounds": 1, "chunks": 2, "eval_ctx": 128,
                       "quick": True} | kw))


def synthetic_model(quick: bool) -> Path:
    """The synthetic speed model in the user cache (about 2.4 GiB; 210 MiB with --quick)."""
    from .converters.synthetic import GENERATOR_VERSION, SyntheticShape, write_synthetic_moe
    from .paths import cache_dir

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

    from .converters import convert
    from .converters.tiny_checkpoint import write_tiny_mixtral
    from .paths import cache_dir

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

    from . import __version__, bench_report
    from .budget import BudgetError
    from .demo import default_model, shipped_heldout
    from .evaluate import SWITCH_EVERY, read_texts
    from .gguf_info import read_gguf

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
        from .errors import LayoutError

        raise LayoutError(f"{speed_model}: not a swap-ready GGUF ({info.layout_problem()}); run `swapmoe convert`")
    from .profile import load_or_measure

    prof = load_or_measure(info, threads=threads)  # profile once (cached), before anything is timed
    cells = speed_cells(speed_model, sorted(o.budgets, reverse=True), o.n_predict, threads, o.n_ctx, o.floors)
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


def main_cell(argv: list[str]) -> int:
    """Child-process entry: run one speed cell, print its result as one JSON line."""
    from .errors import SwapMoEError

    cell = SpeedCell(**json.loads(argv[0]))
    try:
        print(json.dumps(run_speed_cell(cell)))
    except SwapMoEError as e:  # e.g. a budget below the minimum: reported in the table, not a traceback
        print(json.dumps({"error": str(e)}))
    return 0


if __name__ == "__main__":
    sys.exit(main_cell(sys.argv[1:]))
