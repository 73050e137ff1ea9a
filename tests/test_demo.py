"""The README's main-job line: `swapmoe demo` end to end (checkpoint, convert, inspect, run)."""
from __future__ import annotations

from conftest import run_cli


def test_demo_runs_end_to_end(tmp_path):
    r = run_cli("demo", "--dir", tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "swap-ready:            yes, every expert slice page-aligned" in out
    assert "3 of 8 experts resident per layer" in out
    assert "router hit rate" in out and "peak RSS" in out
    # cached: a second run reuses the converted file
    again = run_cli("demo", "--dir", tmp_path)
    assert again.returncode == 0 and "converted to" not in again.stdout
