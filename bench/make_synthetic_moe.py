"""Write the large synthetic MoE used for speed, memory and I/O figures (never for quality).

    python bench/make_synthetic_moe.py -o bench/out/synthetic-moe.gguf [--layers 4] [--experts 128] ...

Defaults: Qwen3-30B-A3B-like experts (hidden 2048, 128 experts of 768, top-8), 4 layers, Q8_0:
about 2.6 GB, every expert slice page-aligned. `swapmoe bench` builds the same file itself.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import fields

from swapmoe_gguf.converters.synthetic import SyntheticShape, write_synthetic_moe
from swapmoe_gguf.commands.inspect import fmt_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True)
    for f in fields(SyntheticShape):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    shape = SyntheticShape(**{f.name: getattr(a, f.name) for f in fields(SyntheticShape)})
    t0 = time.perf_counter()
    path = write_synthetic_moe(a.output, shape, seed=a.seed, force=a.force)
    print(f"wrote {path} ({fmt_bytes(path.stat().st_size)}) in {time.perf_counter() - t0:.1f} s: {shape}")


if __name__ == "__main__":
    main()
