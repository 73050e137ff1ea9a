"""The README's main-job line: `swapmoe demo` on the embedded default model, end to end."""
from __future__ import annotations

import re

from conftest import run_cli


def test_demo_runs_end_to_end(tmp_path):
    r = run_cli("demo", "--dir", tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "swap-ready:            yes, every expert slice page-aligned" in out
    assert "5 of 16 per layer" in out
    assert "--- swapmoe: 5 of 16 experts resident per layer ---" in out
    assert "--- static: 5 of 16 experts resident per layer ---" in out
    ppl = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| (full|swapmoe|static) \| \d+/16 \| ([\d.]+) \|",
                                                               out, re.M)}
    assert set(ppl) == {"full", "swapmoe", "static"}
    # learned routing: the full model is best, and dropping two thirds of the experts costs perplexity
    assert ppl["full"] < ppl["swapmoe"] and ppl["full"] < ppl["static"]
    assert ppl["full"] < 60  # the trained model, not noise (held-out perplexity ~38)
    again = run_cli("demo", "--dir", tmp_path, timeout=600)  # cached: no second conversion
    assert again.returncode == 0 and "converting" not in again.stdout + again.stderr
