"""Policies on the real runtime: exact == full, static never swaps, swapmoe swaps asynchronously."""
from __future__ import annotations

import os

import numpy as np
import pytest

from swapmoe_gguf.converters import convert
from swapmoe_gguf.runtime import SwapMoELlama

KW = dict(n_ctx=256, n_threads=2, verbose=False, seed=1)


@pytest.fixture(scope="module")
def models(hf_models, stories_moe, tmp_path_factory):
    root = tmp_path_factory.mktemp("pol")
    out = {"stories": root / "stories.gguf", "qwen3moe": root / "q3.gguf", "mixtral": root / "mx.gguf",
           "olmoe": root / "ol.gguf"}
    convert(stories_moe, out["stories"], progress=False)
    convert(hf_models["qwen3moe"], out["qwen3moe"], "f32", progress=False)
    convert(hf_models["mixtral"], out["mixtral"], "f32", progress=False)
    convert(hf_models["olmoe"], out["olmoe"], "f32", progress=False)  # gates not renormalised after top-k
    return out


def _greedy(llm, prompt: list[int], n: int = 24) -> list[int]:
    llm.reset()
    out = []
    for tok in llm.generate(prompt, temp=0.0):
        out.append(tok)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("name,prompt", [("stories", [1, 365, 211, 263, 93]), ("qwen3moe", [5, 17, 42, 99, 7]),
                                         ("mixtral", [3, 8, 120, 44]), ("olmoe", [12, 30, 77, 5])])
def test_exact_equals_full(models, name, prompt):
    path = str(models[name])
    # same micro-batching on both sides (exact decodes one token at a time)
    full = SwapMoELlama(path, policy="full", n_batch=1, n_ubatch=1, **KW)
    exact = SwapMoELlama(path, policy="exact", experts_per_layer=2, **KW)
    try:
        assert exact.policy_name == "exact" and exact.vmodel.slots == 2
        assert _greedy(exact, prompt) == _greedy(full, prompt)
        t = exact.telemetry()
        if name != "stories":  # copy4x2's router still picks experts; its experts are identical copies
            assert t.swaps > 0 and t.hit_rate < 1.0
        assert t.io_blocked_seconds > 0 or t.swaps == 0
    finally:
        exact.close()
        full.close()


def test_static_never_swaps_and_equals_fixed_build(models):
    path = str(models["qwen3moe"])
    st = SwapMoELlama(path, policy="static", experts_per_layer=2, logits_all=True, **KW)
    try:
        chosen = {l: list(v) for l, v in st.vmodel.slot_map.items()}
        _greedy(st, [5, 17, 42], 32)
        assert st.telemetry().swaps == 0 and not st.pending
        assert st.vmodel.slot_map == chosen
        fixed = SwapMoELlama(path, policy="static", experts_per_layer=2, initial_experts=chosen, logits_all=True, **KW)
        try:
            for llm in (st, fixed):
                llm.reset()
                llm.eval([5, 17, 42, 99])
            assert np.array_equal(np.array(st.scores[:4]), np.array(fixed.scores[:4]))
        finally:
            fixed.close()
    finally:
        st.close()


def test_static_calibration_is_cached_per_model_text_and_slots(models, tmp_path, monkeypatch):
    from swapmoe_gguf.planning import calib_cache
    from swapmoe_gguf.residency import calibration

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = str(models["qwen3moe"])
    calls = []
    real = calibration.calibrate
    # the whole text every time (not windows sized by how fast a loaded machine runs the probe)
    monkeypatch.setattr("swapmoe_gguf.runtime.llama.calibrate", lambda *a: calls.append(1) or real(*a, seconds=1e9))
    sets = []
    for _ in range(2):
        st = SwapMoELlama(path, policy="static", experts_per_layer=2, **KW)
        sets.append((st.static_rank, {l: list(v) for l, v in st.vmodel.slot_map.items()}))
        info, chunk = st.vmodel.info, calibration.calib_chunk(st)
        st.close()
    assert len(calls) == 1 and sets[0] == sets[1]  # the second build read the cache
    cached = calib_cache.calib_path(info, calib_cache.default_calibration_text(), 2, chunk)
    assert cached.is_file()
    cached.write_text("{not json")  # a damaged cache is ignored and rewritten
    st = SwapMoELlama(path, policy="static", experts_per_layer=2, **KW)
    try:
        assert len(calls) == 2 and st.static_rank == sets[0][0]
    finally:
        st.close()
    st = SwapMoELlama(path, policy="static", experts_per_layer=3, **KW)  # another S: calibrated anew
    st.close()
    assert len(calls) == 3


def test_swapmoe_swaps_between_decodes_and_tracks_the_router(models):
    path = str(models["mixtral"])
    from swapmoe_gguf.residency.scheduler import SchedulerConfig

    rt = SwapMoELlama(path, experts_per_layer=2, scheduler=SchedulerConfig(decay=0.8, interval=2, quota=1, margin=1.05),
                      initial_experts={0: [0, 1], 1: [0, 1]}, **KW)
    try:
        assert rt.policy_name == "swapmoe"
        # The read thread runs below decoding's priority and this model decodes 40 tokens in a few ms:
        # on 2 busy cores a request can end before any read was scheduled (1 run in 10 here), so
        # requests are repeated (scheduler state carries over) until a swap has landed, 5 at most.
        for _ in range(5):
            _greedy(rt, [3, 8, 120, 44, 9, 10, 11], 40)
            if rt.telemetry().swaps:
                break
        t = rt.telemetry()
        assert t.swaps > 0 and t.swap_failures == 0
        assert t.io_blocked_seconds == 0.0  # decoding never waited for a read
        rt.apply_pending(wait=True)
        sched = rt.policy.scheduler
        assert sched.stats.updates > 0
        # Reads land asynchronously (the read thread runs at a lower priority than decoding), so the
        # last proposals may still be in flight: finish the updates the scores call for, through the
        # runtime's own swap path, then the resident set is the scheduler's top-S (or within its margin).
        for _ in range(4):
            for sw in sched.propose(rt.vmodel.slot_map):
                rt.request_swap(sw.layer, sw.slot, sw.expert)
            rt.apply_pending(wait=True)
        for layer, slots in rt.vmodel.slot_map.items():
            s = sched.scores[sched.index[layer]]
            best = sorted(np.argsort(-s)[:2].tolist())
            assert sorted(slots) == best or min(s[slots]) * 1.05 >= s[best].min() * 0.5
    finally:
        rt.close()


def test_budget_that_fits_everything_runs_full(models):
    rt = SwapMoELlama(str(models["qwen3moe"]), memory_budget="100%", **KW)
    try:
        assert rt.policy_name == "full" and rt.vmodel.slots == rt.vmodel.n_expert
    finally:
        rt.close()


def test_set_budget_rebuilds_with_new_slot_count(models):
    from swapmoe_gguf.residency.budget import BudgetError

    path = str(models["mixtral"])
    rt = SwapMoELlama(path, experts_per_layer=2, logits_all=True, **KW)
    try:
        _greedy(rt, [3, 8, 120, 44], 8)
        ranked = {l: rt._ranked(l) for l in rt.vmodel.moe_layers}
        grow = rt.memory.total(3)
        assert rt.set_budget(f"{grow + 1}B") == 3
        assert rt.vmodel.slots == 3 and rt.policy_name == "swapmoe"
        for l, order in ranked.items():  # the most important experts were kept
            assert set(order[:3]) == set(rt.vmodel.slot_map[l])
        out = _greedy(rt, [3, 8, 120, 44], 8)
        assert len(out) == 8
        assert rt.set_budget("100%") == 4 and rt.policy_name == "full"
        # the same tokens as a model built with every expert
        full = SwapMoELlama(path, policy="full", logits_all=True, **KW)
        try:
            for llm in (rt, full):
                llm.reset()
                llm.eval([3, 8, 120, 44])
            assert np.array_equal(np.array(rt.scores[:4]), np.array(full.scores[:4]))
        finally:
            full.close()
        assert rt.set_budget(None, experts_per_layer=2) == 2 and rt.policy_name == "swapmoe"
        with pytest.raises(BudgetError, match="below the minimum"):
            rt.set_budget("1MiB")
        assert rt.vmodel.slots == 2  # a refused change leaves the model as it was
    finally:
        rt.close()


def test_exact_survives_a_budget_round_trip(models):
    path = str(models["olmoe"])
    rt = SwapMoELlama(path, policy="exact", memory_budget="100%", **KW)
    full = SwapMoELlama(path, policy="full", n_batch=1, n_ubatch=1, **KW)
    try:
        assert rt.policy_name == "full"
        assert rt.set_budget(None, experts_per_layer=2) == 2 and rt.policy_name == "exact"
        assert _greedy(rt, [12, 30, 77, 5]) == _greedy(full, [12, 30, 77, 5])
        assert rt.telemetry().swaps > 0
    finally:
        rt.close()
        full.close()


def _swapmoe_trace(path: str, capture: bool, cfg, prompts: list[list[int]], n: int = 20):  # type: ignore[no-untyped-def]
    """swapmoe over teacher-forced decode steps, finished reads committed before every step (so swaps
    do not depend on I/O timing): (swap sequence, last logits of every step, scores, hit rate)."""
    llm = SwapMoELlama(path, policy="swapmoe", experts_per_layer=4, scheduler=cfg, **KW)
    try:
        if not capture:
            llm.tap.capture_tokens = 0  # the tap's Python path, every step
        swaps = []
        request, before = llm.request_swap, llm._before_decode
        llm.request_swap = lambda l, s, e: (swaps.append((l, s, e)), request(l, s, e))[1]
        llm._before_decode = lambda: (llm.apply_pending(wait=True), before())[1]
        logits = []
        for p in prompts:
            llm.reset()
            llm.eval(p)
            for i in range(n):
                llm.eval([p[i % len(p)]])
                logits.append(np.array(llm.scores[llm.n_tokens - 1]))
        llm.score_pending()
        captured = llm.tap.captured_steps
        return swaps, np.stack(logits), llm.policy.scheduler.scores.copy(), llm.telemetry().hit_rate, captured
    finally:
        llm.close()


@pytest.mark.parametrize("observe_every", [1, 3])
def test_decode_steps_scored_in_c_equal_python(tiny_gguf, observe_every):
    """Decode steps whose router inputs the C filter gathers (scored every F steps, and, with a
    scoring stride, layer by layer on different steps) give the swaps, logits and hit rate of the
    Python path that scores every step; scores agree to float rounding."""
    from swapmoe_gguf.residency.scheduler import SchedulerConfig

    cfg = SchedulerConfig(interval=4, quota=1, observe_every=observe_every, prior_weight=0.0)
    prompts = [[5, 17, 42, 99, 7], [3, 8, 120, 44, 61, 2]]
    c = _swapmoe_trace(tiny_gguf, True, cfg, prompts)
    py = _swapmoe_trace(tiny_gguf, False, cfg, prompts)
    assert c[4] > 0 and py[4] == 0
    assert c[0] == py[0] and len(c[0]) > 0
    assert np.array_equal(c[1], py[1])
    assert np.allclose(c[2], py[2], rtol=1e-5, atol=1e-12)
    assert c[3] == pytest.approx(py[3], rel=1e-6)  # (the weights it sums agree to float rounding)


_LAND = r"""
import os, sys, numpy as np
from swapmoe_gguf.converters.default_model import default_model
from swapmoe_gguf.runtime import SwapMoELlama
n = os.cpu_count() or 1
llm = SwapMoELlama(str(default_model()), policy="swapmoe", experts_per_layer=16, n_ctx=512, n_threads=n,
                   n_threads_batch=n, verbose=False)
requested = []
orig = llm.request_swap
llm.request_swap = lambda l, s, e: (requested.append(1), orig(l, s, e))[1]
for text in (b"ROMEO.\nBut soft, what light", b"def read_config(path):\n", b"KING HENRY.\nOnce more", b"class Cache:\n"):
    llm.reset()
    llm.eval(llm.tokenize(text, add_bos=True))
    for _ in range(64):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
print(len(requested), llm.telemetry().swaps, os.environ.get("GOMP_SPINCOUNT"))
"""


def test_swaps_land_when_llama_uses_every_core():
    """With llama.cpp's threads on every core, the expert store's read thread still gets CPU (libgomp's
    idle spinning is bounded when swapmoe_gguf is imported first): the swaps the scheduler asks for
    are committed while decoding. The child runs at raised priority where it can, where libgomp's
    default starved the reads (1 of 25 landed over 256 steps on 2 cores)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    nice = ["nice", "-n", "-15"] if os.geteuid() == 0 else []  # (raising priority needs root)
    r = subprocess.run([*nice, sys.executable, "-c", _LAND], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    requested, committed, spin = r.stdout.split()
    assert spin == "1000"
    assert int(requested) >= 8 and int(committed) >= int(requested) // 2, r.stdout
