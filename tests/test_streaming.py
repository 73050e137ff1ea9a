"""Conversion streams: peak memory does not grow with the model, only with its largest tensor."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from swapmoe_gguf.converters.tiny_checkpoint import write_tiny_mixtral

# VmHWM (not ru_maxrss, which on Linux keeps the parent's RSS across fork+exec).
_PEAK = ("import sys\nfrom swapmoe_gguf.commands.cli import main\nrc = main(sys.argv[1:])\n"
         "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\nsys.exit(rc)\n")


def _peak_kb(src, out, qtype) -> int:
    r = subprocess.run([sys.executable, "-c", _PEAK, "convert", str(src), "-o", str(out), "--type", qtype,
                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1])


def test_peak_rss_independent_of_model_size(tmp_path):
    # Same tensor shapes (largest: one 1408 x 512 bf16 expert projection, 1.4 MB), 2 vs 8 layers:
    # about 40 MB vs 160 MB of weights.
    shape = dict(hidden=512, ffn=1408, experts=8, heads=8, kv_heads=4, dtype=np.dtype(np.uint16), std=0.02)
    small = write_tiny_mixtral(tmp_path / "small", layers=2, **shape)
    big = write_tiny_mixtral(tmp_path / "big", layers=8, **shape)
    for qtype in ("f16", "q8_0"):
        p_small = _peak_kb(small, tmp_path / f"s-{qtype}.gguf", qtype)
        p_big = _peak_kb(big, tmp_path / f"b-{qtype}.gguf", qtype)
        big_bytes = (tmp_path / f"b-{qtype}.gguf").stat().st_size
        small_bytes = (tmp_path / f"s-{qtype}.gguf").stat().st_size
        # Holding the model would add the 3x larger output's difference (>= 60 MB); streaming adds ~0.
        assert (p_big - p_small) * 1024 < 0.2 * (big_bytes - small_bytes), (qtype, p_small, p_big)
