"""Conversion throughput and peak memory on a generated checkpoint large enough to matter.

    python bench/convert_bench.py [--layers 6] [--types f16,q8_0,q4_0,q4_k_m]
    python bench/convert_bench.py --vs-llamacpp [--hidden 2048 --ffn 5632 --layers 4]

The second form (issue 27) times `swapmoe convert HF_DIR --engine llamacpp` (llama.cpp's converter
classes streaming into the swap-ready writer, one pass) against llama.cpp's `convert_hf_to_gguf.py`
followed by `swapmoe convert` of its GGUF (the re-layout), on a random bf16 Mixtral of a few GiB,
with the peak RSS of each process tree (sampled every 20 ms: all RSS, and anonymous memory alone,
since the converters read safetensors through mmap, whose clean file pages count in RSS but
are page cache) and the peak extra disk.

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


_SPM_WRAPPER = r"""
import runpy, sys
conv = sys.argv[1]
sys.path[0:0] = [conv, conv + "/gguf-py"]
import conversion
_orig = conversion.get_model_class
def _patched(name, mmproj=False):
    cls = _orig(name, mmproj)
    cls.set_vocab = lambda self: self._set_vocab_sentencepiece()
    return cls
conversion.get_model_class = _patched
sys.argv = [conv + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _tree_peak(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """Run `cmd`; (seconds, peak RSS of its process tree, peak anonymous RSS of the tree)."""
    import os

    import psutil

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **(env or {})})
    peak = anon = 0
    while p.poll() is None:
        rss = an = 0
        try:
            procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for q in procs:
            try:
                rss += q.memory_info().rss
                with open(f"/proc/{q.pid}/status") as f:
                    an += next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon"))
            except (psutil.NoSuchProcess, FileNotFoundError, StopIteration, ProcessLookupError):
                pass
        peak, anon = max(peak, rss), max(anon, an)
        time.sleep(0.02)
    err = p.stderr.read() if p.stderr else ""
    if p.wait() != 0:
        raise SystemExit(f"{cmd[:4]} failed: {err[-2000:]}")
    return time.perf_counter() - t0, peak, anon


def vs_llamacpp(a: argparse.Namespace) -> None:
    import os
    import shutil

    from swapmoe_gguf.converters import tiny_checkpoint as tc
    from swapmoe_gguf.converters.llamacpp_source import converter_dir
    from swapmoe_gguf.converters.safetensors_io import Checkpoint

    repo = Path(__file__).resolve().parents[1]
    work = Path(a.workdir or tempfile.mkdtemp(prefix="swapmoe-convert-bench-"))
    ckpt = work / "hf"
    tc.write_byte_tokenizer = lambda d: 512  # the 512-token sentencepiece model below, read by both converters
    tc.write_tiny_mixtral(ckpt, hidden=a.hidden, ffn=a.ffn, layers=a.layers, experts=8, heads=16, kv_heads=8,
                          dtype=np.dtype(np.uint16), std=0.02)
    shutil.copy(repo / "tests" / "data" / "tok512.model", ckpt / "tokenizer.model")
    with Checkpoint(ckpt) as ck:
        src_bytes = sum(ref.nbytes for _, ref in ck.refs.values())
        largest = ck.largest_tensor_bytes
    conv = converter_dir()
    py, rows = sys.executable, []
    env = {"PYTHONPATH": ""}
    ours = work / "ours.gguf"
    dt, peak, anon = _tree_peak([py, "-m", "swapmoe_gguf", "convert", str(ckpt), "-o", str(ours), "--type", a.type,
                                 "--engine", "llamacpp", "--vocab", "sentencepiece", "--no-progress", "--force"], env)
    rows.append(("swapmoe convert --engine llamacpp (one pass)", dt, peak, anon, ours.stat().st_size))
    ours_size = ours.stat().st_size
    ours.unlink()
    theirs, relaid = work / "llamacpp.gguf", work / "relaid.gguf"
    dt1, peak1, anon1 = _tree_peak([py, "-c", _SPM_WRAPPER, str(conv), str(ckpt), "--outfile", str(theirs),
                                    "--outtype", a.type], {"PYTHONPATH": str(conv / "gguf-py")})
    dt2, peak2, anon2 = _tree_peak([py, "-m", "swapmoe_gguf", "convert", str(theirs), "-o", str(relaid),
                                    "--no-progress", "--force"], env)
    rows.append(("convert_hf_to_gguf.py, then swapmoe convert GGUF (two passes)", dt1 + dt2, max(peak1, peak2),
                 max(anon1, anon2), theirs.stat().st_size + relaid.stat().st_size))
    rows.append(("  of which convert_hf_to_gguf.py", dt1, peak1, anon1, theirs.stat().st_size))
    rows.append(("  of which the re-layout", dt2, peak2, anon2, relaid.stat().st_size))
    theirs.unlink()
    relaid.unlink()
    builtin = work / "builtin.gguf"
    dt, peak, anon = _tree_peak([py, "-m", "swapmoe_gguf", "convert", str(ckpt), "-o", str(builtin), "--type",
                                 a.type, "--engine", "builtin", "--no-progress", "--force"], env)
    rows.append(("swapmoe convert --engine builtin (Mixtral only)", dt, peak, anon, builtin.stat().st_size))
    builtin.unlink()
    shutil.rmtree(work, ignore_errors=True) if not a.workdir else None
    print(f"checkpoint: random bf16 Mixtral, {src_bytes / 2**30:.2f} GiB, largest tensor {largest / 2**20:.0f} MiB, "
          f"--type {a.type}; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| conversion | time (s) | peak RSS (MiB) | peak anonymous RSS (MiB) | disk written (GiB) |")
    print("|---|---|---|---|---|")
    for name, dt, peak, anon, disk in rows:
        print(f"| {name} | {dt:.1f} | {peak / 2**20:.0f} | {anon / 2**20:.0f} | {disk / 2**30:.2f} |")
    print(f"\noutput {ours_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    if "--vs-llamacpp" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--vs-llamacpp", action="store_true")
        ap.add_argument("--hidden", type=int, default=2048)
        ap.add_argument("--ffn", type=int, default=5632)
        ap.add_argument("--layers", type=int, default=4)
        ap.add_argument("--type", default="f16")
        ap.add_argument("--workdir", default=None)
        vs_llamacpp(ap.parse_args())
    else:
        main()
