"""The profiling-guided planner: S from the budget, F and Q from the device profile."""
from __future__ import annotations

import json
import os
import time
import pytest

from conftest import run_cli
from swapmoe_gguf.residency.budget import Budget, BudgetError
from swapmoe_gguf.converters import convert
from swapmoe_gguf.converters.tiny_checkpoint import write_tiny_mixtral
from swapmoe_gguf.fileformat.reader import read_gguf
from swapmoe_gguf.planning.planner import Plan, PlanError, make_plan
from swapmoe_gguf.planning.profile import DeviceProfile, model_fingerprint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    src = write_tiny_mixtral(root / "hf", hidden=256, ffn=512, layers=4, experts=8, heads=8, kv_heads=4)
    out = root / "m.gguf"
    convert(src, out, "q8_0", progress=False)
    return out


def _profile(info, read_mb_s: float, commit_ms: float = 0.05, decode_ms: float = 5.0, swap_ms: float = 0.0,
             tap_ms: float = 0.0) -> DeviceProfile:
    return DeviceProfile(1, str(info.path), model_fingerprint(info.path), "test", 2, 0, info.expert_bytes,
                         read_mb_s, commit_ms, {2: decode_ms, 4: decode_ms * 1.02}, 500.0, 0.0, swap_ms, tap_ms)


def test_measured_overheads_shape_the_plan(model):
    """Costly router scoring -> a scoring stride and a long enough F, and less room for swaps; a cheap
    tap -> every layer scored on every token; costly swaps -> fewer swaps; commits paced at the planned
    rate; scoring plus swaps within 5 % of decoding."""
    info = read_gguf(model)
    kw = dict(n_ctx=256, threads=2, experts_per_layer=4, baseline=50 << 20)
    cheap = make_plan(info, _profile(info, 2000.0), None, **kw)
    tap = make_plan(info, _profile(info, 2000.0, tap_ms=0.5), None, **kw)
    swap = make_plan(info, _profile(info, 2000.0, swap_ms=2.0), None, **kw)
    assert cheap.observe_every == 1 and tap.observe_every > 1
    assert tap.interval >= 8 * tap.observe_every
    assert 4 / tap.observe_every * 0.5 <= 0.05 * 5.0 + 1e-9          # staggered to within 5 % of a 5 ms step
    small = make_plan(info, _profile(info, 2000.0, tap_ms=0.025, swap_ms=2.0), None, **kw)  # 2 % scoring: not staggered
    assert small.observe_every == 1 and small.swaps_per_token < swap.swaps_per_token
    assert swap.swaps_per_token < cheap.swaps_per_token and swap.commit_share <= 0.03 + 1e-9
    for p, scoring in ((swap, 0.0), (small, 4 * 0.025 / 5.0)):
        assert scoring + p.commit_share <= max(0.03, scoring + 0.01) + 1e-9
    for p in (cheap, tap, swap):
        assert p.commit_rate == pytest.approx(min(1.0, p.quota * 4 / p.interval), abs=1e-4)
        assert p.scheduler.commit_rate == p.commit_rate and p.scheduler.observe_every == p.observe_every


def test_decode_time_is_not_extrapolated(model):
    info = read_gguf(model)
    prof = _profile(info, 500.0, decode_ms=5.0)
    assert prof.decode_ms_at(2) == 5.0 and prof.decode_ms_at(3) == pytest.approx(5.05)
    assert prof.decode_ms_at(8) == prof.decode_ms_at(4) == pytest.approx(5.1)


def test_slow_disk_raises_interval_and_lowers_quota(model):
    info = read_gguf(model)
    budget = Budget(nbytes=10 << 30)
    fast = make_plan(info, _profile(info, 2000.0), budget, n_ctx=256, threads=2, experts_per_layer=4, baseline=50 << 20)
    slow = make_plan(info, _profile(info, 20.0), budget, n_ctx=256, threads=2, experts_per_layer=4, baseline=50 << 20)
    assert fast.policy == slow.policy == "swapmoe"
    assert slow.interval > fast.interval or slow.quota < fast.quota
    assert slow.quota / slow.interval < fast.quota / fast.interval
    for p in (fast, slow):  # swaps stay hidden behind decoding
        assert p.io_share <= 0.5 and p.commit_share <= 0.05


def test_budget_below_minimum_and_everything_fits(model):
    info = read_gguf(model)
    prof = _profile(info, 500.0)
    with pytest.raises(BudgetError, match="below the minimum"):
        make_plan(info, prof, Budget(nbytes=1 << 20), n_ctx=256, threads=2, baseline=50 << 20)
    full = make_plan(info, prof, Budget(nbytes=10 << 30), n_ctx=256, threads=2, baseline=50 << 20)
    assert full.policy == "full" and full.experts_per_layer == 8
    assert any("everything fits" in r for r in full.reasons)


def test_plan_json_round_trip_and_model_check(model, tmp_path):
    info = read_gguf(model)
    plan = make_plan(info, _profile(info, 300.0), None, n_ctx=256, threads=2, experts_per_layer=3, baseline=50 << 20)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    again.check_model(model)
    other = tmp_path / "other.gguf"
    other.write_bytes(model.read_bytes())
    os.utime(other, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(PlanError, match="made for"):
        plan.check_model(other)
    with pytest.raises(PlanError, match="not a swapmoe plan"):
        Plan.from_json("[1, 2]")
    with pytest.raises(PlanError, match="not a swapmoe plan"):
        Plan.from_json(json.dumps({"version": 1, "model": "x"}))
    with pytest.raises(PlanError, match="plan format"):
        Plan.from_json(json.dumps({**json.loads(plan.to_json()), "version": 99}))


def test_changed_file_is_refused(model, tmp_path):
    import shutil

    from swapmoe_gguf.runtime import SwapMoELlama

    copy = tmp_path / "m.gguf"
    shutil.copy(model, copy)
    info = read_gguf(copy)
    plan = make_plan(info, _profile(info, 300.0), None, n_ctx=256, threads=2, experts_per_layer=3, baseline=50 << 20)
    rt = SwapMoELlama(str(copy), plan=plan, n_ctx=256, n_threads=2)
    assert rt.vmodel.slots == 3 and rt.policy.scheduler.config == plan.scheduler
    rt.close()
    with open(copy, "r+b") as f:  # touch the file: a different model now, as far as the plan knows
        f.seek(100)
        f.write(b"\0")
    with pytest.raises(PlanError, match="file changed"):
        SwapMoELlama(str(copy), plan=plan, n_ctx=256, n_threads=2)


def test_plan_cli_profiles_and_writes_json(model, tmp_path):
    out = tmp_path / "plan.json"
    env_cache = tmp_path / "cache"
    t0 = time.perf_counter()
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "swapmoe_gguf", "plan", str(model), "--memory-budget", "90%",
                        "-c", "256", "-t", "2", "-o", str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "XDG_CACHE_HOME": str(env_cache)})
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert elapsed < 60  # profiling + planning in under a minute on this machine
    for label in ("experts per layer (S):", "update interval (F):", "swap quota (Q):", "why:", "memory:"):
        assert label in r.stdout
    plan = Plan.load(out)
    assert plan.fingerprint == model_fingerprint(model)
    assert list((env_cache / "swapmoe-gguf" / "profiles").glob("*.json")), "profile not cached"
    bad = run_cli("plan", str(model), "--memory-budget", "1MiB")
    assert bad.returncode == 2 and "below the minimum" in bad.stderr


def test_floor_pick_follows_the_target():
    from swapmoe_gguf.base.errors import SwapMoEError
    from swapmoe_gguf.planning.floor_tuning import FloorPoint, parse_target, pick

    pts = [FloorPoint(1.0, 100.0, 0.30, 0.0), FloorPoint(0.5, 90.0, 0.10, 0.2), FloorPoint(0.2, 60.0, 0.02, 0.6),
           FloorPoint(0.1, 30.0, 0.005, 0.9)]
    assert pick(pts, parse_target("speed:0.7"))[0].tau == 0.5     # 0.2 runs at 0.6x: too slow
    assert pick(pts, parse_target("speed:0.25"))[0].tau == 0.1    # every point is fast enough: best quality
    assert pick(pts, parse_target("dropped:0.05"))[0].tau == 0.2  # the fastest with <= 5 % dropped
    chosen, why = pick(pts, parse_target("dropped:0.001"))
    assert chosen.tau == 0.1 and "no measured" in why
    for bad in ("fast", "speed:2", "dropped:x", "speed:0"):
        with pytest.raises(SwapMoEError, match="speed:X"):
            parse_target(bad)


def test_plan_picks_the_floor_by_measuring(model, tmp_path):
    """`swapmoe plan --floor`: each τ measured on this model at the plan's S; the plan carries the
    chosen τ and the runtime uses it."""
    import re

    from swapmoe_gguf.runtime import SwapMoELlama

    out = tmp_path / "plan.json"
    r = run_cli("plan", str(model), "--experts-per-layer", "3", "-c", "256", "-t", "2", "--floor", "dropped:0.05",
                "-o", str(out))
    assert r.returncode == 0, r.stderr
    measured = {float(t): (float(v), float(d), float(a)) for t, v, d, a in re.findall(
        r"measured: τ=(\S+)\s+(\S+) tok/s\s+dropped (\S+)\s+acted on (\d+)%", r.stdout)}
    assert sorted(measured) == [0.05, 0.1, 0.2, 0.3, 0.5, 1.0]
    assert measured[1.0][2] == 0 and measured[0.05][2] > 0          # the floor acts below τ = 1 ...
    assert measured[0.05][1] <= 0.05 < measured[1.0][1]              # ... and drops less
    plan = Plan.load(out)
    assert measured[plan.max_dropped_mass][1] <= 0.05                 # the fastest τ within the target
    assert all(measured[t][1] > 0.05 for t in measured if t > plan.max_dropped_mass)
    assert f"quality floor (τ):     {plan.max_dropped_mass:g}" in r.stdout
    llm = SwapMoELlama(str(model), plan=str(out), n_ctx=256, verbose=False)
    try:
        assert llm.max_dropped_mass == plan.max_dropped_mass
    finally:
        llm.close()
    assert run_cli("plan", str(model), "--floor", "quick").returncode == 2


def test_runtime_schedules_from_the_cached_profile(model):
    """scheduler="auto" (the CLI's, the server's and the demo's): F, Q, the scoring stride and the
    commit pacing the planner picks for the runtime's S from this device's cached profile; the
    scheduler's defaults where none is cached; any other string refused in one line."""
    from dataclasses import replace

    from swapmoe_gguf.base.errors import SwapMoEError
    from swapmoe_gguf.planning.planner import scheduler_for
    from swapmoe_gguf.planning.profile import PROFILE_VERSION, profile_path
    from swapmoe_gguf.residency.scheduler import SchedulerConfig
    from swapmoe_gguf.runtime import SwapMoELlama

    info = read_gguf(model)
    prof = replace(_profile(info, 300.0, swap_ms=0.8, tap_ms=0.2), version=PROFILE_VERSION)
    path = profile_path(info, 2, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = dict(experts_per_layer=4, n_ctx=64, n_threads=2, n_threads_batch=2, verbose=False)
    try:
        path.write_text(prof.to_json())
        want = scheduler_for(prof, 4, len(info.moe_layers))
        assert want != SchedulerConfig() and want.observe_every > 1  # (the test's profile moves every knob)
        llm = SwapMoELlama(str(model), policy="swapmoe", scheduler="auto", **kw)
        try:
            assert llm.policy.scheduler.config == want
            assert llm.tap.stride == want.observe_every and llm.commit_rate == want.commit_rate
            llm.eval([3, 5, 7])
            for t in range(12):
                llm.eval([t + 2])
            faster = replace(prof, swap_ms=0.05)  # (re-measured meanwhile: a budget change plans with it)
            path.write_text(faster.to_json())
            assert llm.set_budget(None, experts_per_layer=6) == 6  # planned again for the new S
            again = scheduler_for(faster, 6, len(info.moe_layers))
            assert again != want and llm.policy.scheduler.config == again and llm.tap.stride == again.observe_every
            llm.eval([3, 5, 7])
        finally:
            llm.close()
        path.unlink()
        llm = SwapMoELlama(str(model), policy="swapmoe", scheduler="auto", **kw)
        try:
            assert llm.policy.scheduler.config == SchedulerConfig()
        finally:
            llm.close()
    finally:
        path.unlink(missing_ok=True)
    with pytest.raises(SwapMoEError, match="expected a SchedulerConfig or 'auto'"):
        SwapMoELlama(str(model), policy="swapmoe", scheduler="fast", **kw)
