"""Conversion throughput and peak memory on a generated checkpoint large enough to matter.

    python bench/convert_bench.py [--layers 6] [--types f16,q8_0,q4_0,q4_k_m]

Builds a random bf16 Mixtral-shaped checkpoint (hidden 1024, experts 8 x 2816, a few hundred
MB), converts it once per output type, each in a fresh process, and reports MB of source
weights per second and the converter's peak RSS (VmHWM) against the import-only baseline
and the largest single tensor. Prints a markdown table and writes bench/out/convert_bench.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

# VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec and would include the parent's RSS at fork.
_PEAK = ("import sys\n"
         "from swapmoe_gguf.commands.cli import main\n"
         "import swapmoe_gguf.converters.hf, swapmoe_gguf.converters.relayout\n"
         "rc = main(sys.argv[1:]) if len(sys.argv) > 1 else 0\n"
         "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]\n"
         "print('PEAK_KB', hwm)\n"
         "sys.exit(rc)\n")


def _run(args: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _PEAK, *args], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"conversion failed: {r.stderr.strip()}")
    kb = int(next(l for l in r.stdout.splitlines() if l.startswith("PEAK_KB")).split()[1])
    return dt, kb * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--types", default="f16,q8_0,q4_0,q4_k_m")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=str(Path(__file__).parent / "out" / "convert_bench.json"))
    a = ap.parse_args()
    from swapmoe_gguf.converters.safetensors_io import Checkpoint
    from swapmoe_gguf.converters.tiny_checkpoint import write_tiny_mixtral

    work = Path(a.workdir or tempfile.mkdtemp(prefix="swapmoe-convert-bench-"))
    ckpt = work / "hf"
    write_tiny_mixtral(ckpt, hidden=1024, ffn=2816, layers=a.layers, experts=8, heads=16, kv_heads=8,
                       dtype=np.dtype(np.uint16), std=0.02)
    with Checkpoint(ckpt) as ck:
        src_bytes = sum(ref.nbytes for _, ref in ck.refs.values())
        largest = ck.largest_tensor_bytes
    _, base = _run([])
    rows = []
    for t in a.types.split(","):
        out = work / f"out-{t}.gguf"
        out.unlink(missing_ok=True)
        dt, peak = _run(["convert", str(ckpt), "-o", str(out), "--type", t, "--no-progress"])
        rows.append({"type": t, "seconds": round(dt, 2), "src_MB_per_s": round(src_bytes / dt / 1e6, 1),
                     "out_MB": round(out.stat().st_size / 1e6, 1), "peak_rss_MB": round(peak / 1e6, 1),
                     "over_baseline_MB": round((peak - base) / 1e6, 1),
                     "over_baseline_x_largest": round((peak - base) / largest, 2)})
        out.unlink()
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {platform.processor() or '?'}",
            "cpus": __import__("os").cpu_count(), "source_MB": round(src_bytes / 1e6, 1),
            "largest_tensor_MB": round(largest / 1e6, 2), "baseline_rss_MB": round(base / 1e6, 1)}
    print(f"source checkpoint: {meta['source_MB']} MB bf16, largest tensor {meta['largest_tensor_MB']} MB, "
          f"import baseline RSS {meta['baseline_rss_MB']} MB ({meta['cpus']} CPUs, {meta['date']})\n")
    print("| type | time (s) | source MB/s | output MB | peak RSS MB | over baseline MB | over baseline / largest tensor |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['seconds']} | {r['src_MB_per_s']} | {r['out_MB']} | {r['peak_rss_MB']} | "
              f"{r['over_baseline_MB']} | {r['over_baseline_x_largest']} |")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
