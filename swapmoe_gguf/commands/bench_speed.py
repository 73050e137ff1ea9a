"""`swapmoe bench`'s speed cells: one policy at one budget, measured in a process of its own.

A cell loads the model as it says, serves one warm-up request, then times one request (teacher-
forced on the calibration text, so every policy does identical work): decode and prefill speed,
time to first token, peak RSS (the process's VmHWM), bytes read from disk, hit rate and swaps.
Cells run interleaved over rounds (`run_speed`), each in a fresh process (`python -m` this module).
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
    device: str = ""          # JSON of SwapMoELlama's placement arguments (n_gpu_layers, rpc_servers, ...)
    experts_per_layer: int = 0  # > 0: S experts per layer resident, no memory budget (budget_pct a share of experts)

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
    sched_us: list[float] = field(default_factory=list)
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
                "swaps_per_token": med(self.swaps_per_token), "sched_us": med(self.sched_us),
                "sched_share": (round(statistics.median(self.sched_us) / 1e3 / statistics.median(self.step_ms), 4)
                                if self.sched_us and self.step_ms else None),
                "rounds": len(self.decode_tok_s),
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

    from ..base.errors import SwapMoEError
    from ..fileformat.reader import read_gguf
    from ..residency.budget import estimate
    from ..runtime import SwapMoELlama

    info = read_gguf(cell.model)
    kw = dict(n_ctx=cell.n_ctx, n_batch=min(512, cell.n_ctx), n_threads=cell.threads,
              n_threads_batch=cell.threads, verbose=False, seed=1, flash_attn=True)
    full_bytes = estimate(info, n_ctx=cell.n_ctx, n_batch=kw["n_batch"]).total()  # what `full` needs
    dev = json.loads(cell.device) if cell.device else {}
    ngl = int(dev.get("n_gpu_layers", 0))
    if dev.get("rpc_servers"):  # registered before anything builds a model (the profile included)
        from ..llamacpp.devices import add_rpc_servers

        add_rpc_servers(dev["rpc_servers"])
    if cell.policy == "plain":
        # stock llama-cpp-python on the same layers and devices (no -ot/--cpu-moe: Llama has no such argument)
        from ..llamacpp.devices import parse_tensor_split

        split = parse_tensor_split(dev.get("tensor_split"))
        llm: Any = llama_cpp.Llama(cell.model, n_gpu_layers=ngl, tensor_split=split, **kw)
    else:
        plan = None
        if cell.policy == "swapmoe":
            from ..planning.planner import make_plan
            from ..planning.profile import load_or_measure
            from ..residency.budget import parse_budget, plan_slots

            budget = None if cell.experts_per_layer else parse_budget(cell.memory_budget)
            prof = load_or_measure(info, SwapMoELlama, threads=cell.threads, n_gpu_layers=ngl)
            # the S the runtime picks for this budget (as for static and exact), then F and Q for it
            slots = cell.experts_per_layer or plan_slots(estimate(info, n_ctx=cell.n_ctx, n_batch=kw["n_batch"]),
                                                         budget, None).slots
            plan = make_plan(info, prof, budget, n_ctx=cell.n_ctx, threads=cell.threads, experts_per_layer=slots)
        llm = SwapMoELlama(cell.model, policy=cell.policy, plan=plan, max_dropped_mass=cell.max_dropped_mass,
                           memory_budget=None if cell.experts_per_layer else cell.memory_budget,
                           experts_per_layer=cell.experts_per_layer or None, **dev, **kw)
    ours = isinstance(llm, SwapMoELlama)
    try:
        # Teacher-forced: every cell decodes the same token stream (a text, one token per step), so
        # routing varies as it does on real text and all policies do identical work.
        from ..planning.calib_cache import default_calibration_text

        text = default_calibration_text()
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
        if ours:
            llm.score_pending()  # the counters below start here
        before = (llm.telemetry_.swaps, llm.telemetry_.hit_mass, llm.telemetry_.hit_count,
                  llm.telemetry_.decode_sched_seconds) if ours else None
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
            llm.score_pending()
            t = llm.telemetry_
            hits = t.hit_count - before[2]
            # with S given (no budget): what the runtime's estimate says S needs, so peak RSS checks it
            need = llm.memory.total() if cell.experts_per_layer else full_bytes
            out |= {"budget_bytes": llm.budget_bytes or need, "experts_per_layer": llm.vmodel.slots,
                    "repacked_tensors": len(llm.vmodel.repacked),
                    "hit_rate": (t.hit_mass - before[1]) / hits if hits else (1.0 if cell.policy == "full" else None),
                    "swaps_per_token": (t.swaps - before[0]) / len(steps),
                    # the scheduler's own time per decode step (hooks around it, router inputs copied in C)
                    "sched_us": 1e6 * (t.decode_sched_seconds - before[3]) / len(steps)}
        return out
    finally:
        llm.close()


def _run_in_child(cell: SpeedCell, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "swapmoe_gguf.commands.bench_speed", json.dumps(asdict(cell))]
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
                floors: tuple[float, ...] = (), device: str = "", share_of_experts: bool = False) -> list[SpeedCell]:
    """`full` and plain at 100 %, then every policy (and swapmoe with each floor) at each budget below:
    a whole-process memory budget of that % of what `full` needs, or with `share_of_experts` that %
    of each layer's experts resident (S), with no memory budget."""
    from ..fileformat.reader import read_gguf

    cells = [SpeedCell(model, p, 100.0, n_predict, threads, n_ctx, device=device) for p in ("full", "plain")]
    info = read_gguf(model) if share_of_experts else None
    for b in budgets:
        if b < 100:
            s = 0
            if info is not None:
                k = info.params.n_expert_used
                s = max(k, min(info.n_expert, round(b / 100 * info.n_expert)))
            cells += [SpeedCell(model, p, b, n_predict, threads, n_ctx, device=device, experts_per_layer=s)
                      for p in SPEED_POLICIES]
            cells += [SpeedCell(model, "swapmoe", b, n_predict, threads, n_ctx, max_dropped_mass=t, device=device,
                                experts_per_layer=s) for t in floors]
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
                      "peak_rss", "disk_bytes_per_token", "hit_rate", "swaps_per_token", "sched_us"):
                if out.get(k) is not None:
                    getattr(res, k).append(out[k])
            res.step_ms.extend(out["step_ms"])
    return list(results.values())


def main_cell(argv: list[str]) -> int:
    """Child-process entry: run one speed cell, print its result as one JSON line."""
    from ..base.errors import SwapMoEError

    cell = SpeedCell(**json.loads(argv[0]))
    try:
        print(json.dumps(run_speed_cell(cell)))
    except SwapMoEError as e:  # e.g. a budget below the minimum: reported in the table, not a traceback
        print(json.dumps({"error": str(e)}))
    return 0


if __name__ == "__main__":
    sys.exit(main_cell(sys.argv[1:]))
