"""Memory budgets: parsing, planning, refusal below the minimum, measured peak RSS within budget."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from swapmoe_gguf.residency.budget import Budget, BudgetError, estimate, parse_budget, plan_slots
from swapmoe_gguf.converters import convert
from swapmoe_gguf.converters.tiny_checkpoint import write_tiny_mixtral
from swapmoe_gguf.fileformat.reader import read_gguf


@pytest.mark.parametrize("text,expected", [
    ("3GiB", Budget(nbytes=3 << 30)), ("3G", Budget(nbytes=3 << 30)), ("3000MiB", Budget(nbytes=3000 << 20)),
    ("1.5GB", Budget(nbytes=1_500_000_000)), ("75%", Budget(percent=75.0)), (" 512 MiB ", Budget(nbytes=512 << 20)),
])
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "3XB", "0G", "-1G", "150%", "0%", "G3"])
def test_parse_budget_rejects(text):
    with pytest.raises(BudgetError, match="budget"):
        parse_budget(text)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("budget")
    # 8 experts x 4 layers of 512 x 1408 at Q8_0: 2.3 MiB per expert-layer, 73 MiB of experts.
    src = write_tiny_mixtral(root / "hf", hidden=512, ffn=1408, layers=4, experts=8, heads=8, kv_heads=4,
                             dtype=np.dtype(np.uint16), std=0.02)
    out = root / "m.gguf"
    convert(src, out, "q8_0", progress=False)
    return str(out)


def test_plan_slots(model):
    mem = estimate(read_gguf(model), n_ctx=256, n_batch=256, baseline=50 << 20)
    assert plan_slots(mem, None, None).slots == 8
    assert plan_slots(mem, None, 3).slots == 3
    assert plan_slots(mem, Budget(nbytes=mem.total(5) + 1), None).slots == 5
    assert plan_slots(mem, Budget(percent=100), None).slots == 8
    assert plan_slots(mem, Budget(nbytes=mem.total(5)), 4).slots == 4
    with pytest.raises(BudgetError, match=r"below the minimum .* = process .* \+ 2 experts x"):
        plan_slots(mem, Budget(nbytes=mem.total(2) - 1), None)
    with pytest.raises(BudgetError, match="admits at most 5"):
        plan_slots(mem, Budget(nbytes=mem.total(5) + 1), 6)
    with pytest.raises(BudgetError, match="between top-k=2 and n_expert=8"):
        plan_slots(mem, None, 1)


_GEN = """
import json, sys
from swapmoe_gguf.runtime import SwapMoELlama
rt = SwapMoELlama(sys.argv[1], memory_budget=sys.argv[2], n_ctx=256, n_batch=256, n_threads=2, seed=1)
out = rt.create_completion("the expert", max_tokens=48, temperature=0.0)
t = rt.telemetry()
hwm = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
print(json.dumps({"slots": t.slots, "budget": t.budget_bytes, "hwm": hwm, "peak": t.peak_rss_bytes,
                  "tokens": out["usage"]["completion_tokens"], "full": rt.memory.total(rt.memory.n_expert)}))
"""


def _generate(model: str, budget: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _GEN, model, budget], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})


@pytest.mark.parametrize("budget", ["75%", "90%"])
def test_generation_stays_within_budget(model, budget):
    r = _generate(model, budget)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert 2 <= res["slots"] < 8, res
    assert res["tokens"] > 0
    # the whole process's measured peak (VmHWM, interpreter included) is at or under the budget
    assert res["hwm"] <= res["budget"], res


def test_too_small_budget_names_the_minimum(model):
    r = _generate(model, "30MiB")
    assert r.returncode != 0
    assert "below the minimum" in r.stderr and "non-expert weights" in r.stderr and "KV cache" in r.stderr
