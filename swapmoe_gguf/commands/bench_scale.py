"""`swapmoe bench --scale`: the scenario the project exists for, a model bigger than this machine's RAM.

A Qwen3-30B-A3B-sized synthetic MoE (48 layers x 128 experts of 768, hidden 2048, top-8, Q8_0,
about 29 GiB) is written once into the cache (the free disk is checked first). Then, each in its own
process and with the file's pages dropped before the measured request: stock llama-cpp-python
(mmap: the lossless anchor, paging through the page cache) and `exact`, `swapmoe`, `static` at a
memory budget of about a third of the file (8 GiB by default).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..base.atomic import atomic_output
from ..base.errors import SwapMoEError
from .bench_speed import SpeedCell, run_speed
from .benchmark import machine

SCALE_LAYERS = 48
TARGETS = (("swapmoe", "static", 0.95), ("swapmoe", "plain", 25.0), ("exact", "plain", 8.0))


def scale_model() -> Path:
    from ..base.paths import cache_dir
    from ..converters.synthetic import GENERATOR_VERSION, SyntheticShape, write_synthetic_moe

    shape = SyntheticShape(layers=SCALE_LAYERS)
    path = cache_dir() / "synthetic" / (f"synthetic-moe-v{GENERATOR_VERSION}-{shape.layers}x{shape.experts}x"
                                        f"{shape.ffn}x{shape.hidden}.gguf")
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    need = shape.file_bytes() + (1 << 30)
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise SwapMoEError(f"bench --scale writes a {shape.file_bytes() / 2 ** 30:.1f} GiB model into {path.parent}, "
                           f"which has {free / 2 ** 30:.1f} GiB free (needs {need / 2 ** 30:.1f} GiB)")
    print(f"bench --scale: writing the {shape.file_bytes() / 2 ** 30:.1f} GiB model once to {path} "
          f"(kept for later runs; delete it to free the space)", file=sys.stderr)
    write_synthetic_moe(path, shape)
    return path


def run_scale(out_dir: Path, budget: str = "8GiB", n_predict: int = 16, threads: int = 2,
              rounds: int = 1) -> dict[str, Path]:
    from datetime import datetime, timezone

    from ..fileformat.reader import read_gguf
    from ..planning.profile import load_or_measure
    from ..residency.budget import parse_budget
    from ..runtime import SwapMoELlama

    parse_budget(budget)  # a bad budget fails before 29 GiB are written
    model = scale_model()
    info = read_gguf(model)
    load_or_measure(info, SwapMoELlama, threads=threads)  # the device profile swapmoe's plan needs, before anything is timed
    n_ctx = 256
    # (no long prompt: stock prefills about 4 tokens/s here)
    cells = [SpeedCell(str(model), "plain", 100.0, n_predict, threads, n_ctx, long_prompt=False)]
    cells += [SpeedCell(str(model), p, 0.0, n_predict, threads, n_ctx, budget=budget, long_prompt=False)
              for p in ("exact", "swapmoe", "static")]
    t0 = time.perf_counter()
    rows = [r.summary() for r in run_speed(cells, rounds, timeout=3600)]
    for r, c in zip(rows, cells):
        r["budget"] = c.budget or "none (mmap)"
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "model": f"{model.name} ({info.total_bytes / 2 ** 30:.1f} GiB, {len(info.moe_layers)} layers x "
                     f"{info.n_expert} experts, top-{info.params.n_expert_used})",
            "threads": threads, "n_predict": n_predict, "rounds": rounds,
            "seconds": round(time.perf_counter() - t0, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"table": out_dir / "scale.md", "json": out_dir / "scale.json"}
    with atomic_output(paths["table"], force=True) as tmp:
        tmp.write_text(render(meta, rows))
    with atomic_output(paths["json"], force=True) as tmp:
        tmp.write_text(json.dumps({"meta": meta, "rows": rows, "targets": targets(rows)}, indent=2))
    return paths


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["policy"]: r for r in rows}
    out = []
    for a, b, want in TARGETS:
        x, y = (by.get(a) or {}).get("decode_tok_s"), (by.get(b) or {}).get("decode_tok_s")
        ratio = round(x / y, 2) if x and y else None
        out.append({"what": f"{a} decode >= {want:g}x {'stock' if b == 'plain' else b}", "ratio": ratio,
                    "met": None if ratio is None else ratio >= want})
    return out


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    mib = lambda b: f"{b / 2 ** 20:,.0f}" if b else "-"  # noqa: E731
    stock = next((r["decode_tok_s"] for r in rows if r["policy"] == "plain"), None)
    lines = [f"# Bigger than RAM: `swapmoe bench --scale` ({meta['date']})", "",
             f"{meta['model']} on {meta['machine']}; {meta['threads']} threads, {meta['n_predict']} decode steps "
             f"after a 64-token prompt, the file's pages dropped first; {meta['rounds']} round(s), "
             f"{meta['seconds']:.0f} s.", "",
             "| policy | budget | S | decode tok/s | x stock | prefill tok/s | p50 ms/token | peak RSS MiB | "
             "disk MiB/token |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "stock llama-cpp-python (mmap)" if r["policy"] == "plain" else r["policy"]
        x = f"{r['decode_tok_s'] / stock:.1f}x" if r["decode_tok_s"] and stock else "-"
        s = f"{r['experts_per_layer']} of {r['n_expert']}" if r.get("experts_per_layer") else "-"
        dpt = f"{r['disk_bytes_per_token'] / 2 ** 20:,.0f}" if r.get("disk_bytes_per_token") is not None else "-"
        lines.append(f"| {name} | {r['budget']} | {s} | {r['decode_tok_s'] or '-'} | {x} | {r['prefill_tok_s'] or '-'} "
                     f"| {r['p50_ms'] or '-'} | {mib(r['peak_rss'])} | {dpt} |"
                     + (f" error: {r['errors'][0]}" if r["errors"] else ""))
    lines += ["", "Targets:"] + [f"- {t['what']}: {t['ratio'] if t['ratio'] is not None else '-'}x "
                                  f"({'met' if t['met'] else 'missed' if t['met'] is not None else 'not measured'})"
                                  for t in targets(rows)]
    return "\n".join(lines) + "\n"


