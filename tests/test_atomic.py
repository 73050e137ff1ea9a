"""Conversion is atomic: killed midway, it leaves no output; the next run cleans up after it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import run_cli
from swapmoe_gguf.converters.tiny_checkpoint import write_tiny_mixtral


def test_sigkill_leaves_no_output_and_next_run_cleans(tmp_path):
    src = write_tiny_mixtral(tmp_path / "hf", hidden=512, ffn=1408, layers=8, experts=8, heads=8, kv_heads=4,
                             dtype=np.dtype(np.uint16), std=0.02)
    out = tmp_path / "out.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "swapmoe_gguf", "convert", str(src), "-o", str(out),
                             "--type", "q4_0", "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    partial = []
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [p for p in tmp_path.glob(".out.gguf.swapmoe-*.partial") if p.stat().st_size > 1 << 20]
        if partial:
            break
        time.sleep(0.01)
    assert partial and proc.poll() is None, "conversion finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert list(tmp_path.glob(".out.gguf.swapmoe-*")), "expected the killed run's temporary"
    r = run_cli("convert", src, "-o", out, "--type", "f16")
    assert r.returncode == 0, r.stderr
    assert out.is_file()
    assert not list(tmp_path.glob(".out.gguf.swapmoe-*")), "stale temporary not removed"
