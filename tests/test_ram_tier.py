"""The host RAM tier: a bounded cache of experts' bytes below the slots (store/ram_tier.py), the
store reading through it, the runtime using it (swaps, `exact` misses), the budget counting it, the
planner splitting host and device budgets into slots and tier."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_cli
from test_devices import servers  # noqa: F401 - the RPC server fixture
from swapmoe_gguf.converters.synthetic import SyntheticShape, write_synthetic_moe
from swapmoe_gguf.fileformat.reader import read_gguf
from swapmoe_gguf.planning.tiers import MIN_GAIN, split
from swapmoe_gguf.residency.budget import Budget, BudgetError, MemoryPlan, estimate, parse_ram_tier, plan_slots
from swapmoe_gguf.runtime import SwapMoELlama
from swapmoe_gguf.store.expert_store import ExpertStore
from swapmoe_gguf.store.ram_tier import PAGE, RamTier, RamTierError

SMALL = SyntheticShape(layers=2, hidden=512, ffn=256, experts=16, top_k=4, heads=8, kv_heads=2)
SETTINGS = dict(n_ctx=64, n_threads=2, logits_all=True, verbose=False, flash_attn=True)
TOKENS = [1, 5, 9, 30, 2, 7, 8, 11, 40, 3]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return str(write_synthetic_moe(tmp_path_factory.mktemp("tier") / "s.gguf", SMALL, progress=False))


# the tier alone ---------------------------------------------------------------------------------
def _bytes(v: int, n: int = 100) -> np.ndarray:
    return np.full(n, v, dtype=np.uint8)


def test_lru_eviction_skips_pinned_blocks():
    t = RamTier(3 * PAGE, 100)
    assert t.n_blocks == 3 and t.block == PAGE
    for e in range(3):
        assert t.put(0, e, _bytes(e))
    block, view = t.get(0, 0)       # pinned, and now the most recently used
    assert np.array_equal(view, _bytes(0))
    assert t.put(0, 3, _bytes(3))   # evicts expert 1, the least recently used
    assert set(t.keys()) == {(0, 0), (0, 2), (0, 3)} and t.stats.evictions == 1
    t.get(0, 2), t.get(0, 3)        # everything pinned: nothing can go
    assert not t.put(0, 4, _bytes(4)) and t.stats.refused == 1
    t.unpin(block)
    assert t.put(0, 4, _bytes(4)) and (0, 0) not in t
    with pytest.raises(RamTierError, match="not handed out"):
        t.unpin(block)
    assert t.get(0, 1) is None and t.stats.misses == 1
    t.close()


def test_value_eviction_keeps_the_important_and_refuses_the_unimportant():
    t = RamTier(2 * PAGE, 100)
    value = {0: np.array([5.0, 1.0, 3.0, 0.5])}
    t.value = lambda layer: value[layer]
    t.put(0, 0, _bytes(0)), t.put(0, 1, _bytes(1))
    assert t.put(0, 2, _bytes(2))            # worth 3: evicts expert 1 (worth 1), not the older 0
    assert set(t.keys()) == {(0, 0), (0, 2)}
    assert not t.put(0, 3, _bytes(3))        # worth 0.5, less than everything cached
    assert set(t.keys()) == {(0, 0), (0, 2)}


def test_reserve_is_invisible_until_published_and_abort_frees():
    t = RamTier(PAGE, 100)
    block, buf = t.reserve(1, 7, 100)
    assert (1, 7) not in t and t.get(1, 7) is None
    assert t.reserve(1, 8, 100) is None      # the only block is being filled
    t.abort(block)
    block, buf = t.reserve(1, 8, 100)
    buf[:] = 9
    t.publish(block)
    assert (1, 8) in t and np.array_equal(t.get(1, 8)[1], _bytes(9))
    with pytest.raises(RamTierError, match="does not fit"):
        t.reserve(1, 9, PAGE + 1)
    with pytest.raises(RamTierError, match=">= 0"):
        RamTier(-1, 100)


def test_a_given_arena_is_used_and_released_once():
    """The path of a device's pinned host buffer: the tier lives in the caller's memory and frees it on close."""
    arena, released = np.zeros(2 * PAGE + 5, dtype=np.uint8), []
    t = RamTier(2 * PAGE, 100, arena=arena, release=lambda: released.append(1), where="test (pinned)")
    t.put(3, 1, _bytes(7))
    block, view = t.get(3, 1)
    assert np.shares_memory(view, arena) and arena[block * PAGE] == 7
    t.unpin(block)
    t.close()
    t.close()
    assert released == [1] and len(t) == 0
    with pytest.raises(RamTierError, match="arena is"):
        RamTier(2 * PAGE, 100, arena=np.zeros(PAGE, dtype=np.uint8))


def test_host_devices_have_no_pinned_buffer_type():
    """CPU (and RPC) devices offer no host buffer type: the tier is ordinary memory there."""
    from swapmoe_gguf.llamacpp.devices import list_devices
    from swapmoe_gguf.llamacpp.host_buffer import allocate, host_buffer_type

    cpu = [d for d in list_devices() if d.is_host]
    assert cpu and all(host_buffer_type(d) is None for d in cpu)
    assert allocate(1 << 20, cpu) is None


@pytest.mark.parametrize("text,expected", [("0", Budget(nbytes=0)), ("off", Budget(nbytes=0)),
                                           ("512MiB", Budget(nbytes=512 << 20)), ("25%", Budget(percent=25.0)),
                                           (1 << 20, Budget(nbytes=1 << 20))])
def test_parse_ram_tier(text, expected):
    assert parse_ram_tier(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1G", "150%", "3XB"])
def test_parse_ram_tier_rejects_in_one_line(text):
    with pytest.raises(BudgetError, match=r"^--ram-tier .*expected a size"):
        parse_ram_tier(text)


# the store reading through it --------------------------------------------------------------------
def test_store_hits_return_the_disk_bytes_without_reading(synth):
    info = read_gguf(synth)
    store = ExpertStore(info, staging_buffers=2, reserved=2)
    tier = RamTier(4 * store.max_expert_nbytes + 4 * PAGE, store.max_expert_nbytes)
    try:
        disk = {}
        for e in (3, 5):
            s = store.read(1, e)
            disk[e] = {k: v.copy() for k, v in s.parts.items()}
            store.release(s)
        store.attach_tier(tier)
        s = store.read(1, 3)                             # a miss: from disk, copied into the tier
        store.release(s)
        assert (1, 3) in tier and store.stats.reads == 3
        fut = store.submit(1, 3)                         # a hit: done at once, no disk read
        assert fut.done()
        hit = fut.result()
        assert hit.tier_block >= 0 and store.stats.reads == 3 and store.stats.tier_hits == 1
        assert all(np.array_equal(hit.parts[k], disk[3][k]) for k in disk[3])
        store.release(hit)                               # unpins; no staging buffer given back twice
        assert store._free.qsize() == 2
        store.warm([(1, 5), (0, 2)])
        assert store.wait_warm(30) and store.stats.warm_reads == 2
        stream = store.stream(1, [5, 3])
        got = list(stream)
        stream.close()
        assert store.stats.reads == 3 and store.stats.tier_hits == 3  # warm reads are not swap reads
        for staged, e in zip(got, (5, 3)):
            assert all(np.array_equal(staged.parts[k], disk[e][k]) for k in disk[e])
            store.release(staged)
    finally:
        store.close()
        tier.close()


# the runtime ---------------------------------------------------------------------------------------
def _logits(rt, tokens) -> np.ndarray:
    rt.reset()
    rt.eval(tokens)
    return np.array(rt.scores[: len(tokens)])


def test_swaps_from_the_tier_equal_swaps_from_disk_and_read_no_disk(synth):
    init = {l: list(range(8)) for l in read_gguf(synth).moe_layers}
    plain = SwapMoELlama(synth, experts_per_layer=8, policy="static", initial_experts=init, **SETTINGS)
    tiered = SwapMoELlama(synth, experts_per_layer=8, policy="static", initial_experts=init, ram_tier="100%",
                          **SETTINGS)
    try:
        assert tiered.ram_tier is not None and tiered.memory.ram_tier > 0 and plain.ram_tier is None
        tiered.warm_tier(wait=True)
        assert len(tiered.ram_tier) == 2 * 16    # room for all: those outside the slots, then those in them
        reads0 = tiered.vmodel.store.stats.reads
        for rt in (plain, tiered):
            rt.request_swap(0, 1, 12)
            rt.request_swap(1, 3, 9)
            rt.vmodel.swap(0, 5, 15)
            assert rt.apply_pending(wait=True) == 2
        assert plain.vmodel.slot_map == tiered.vmodel.slot_map
        assert tiered.vmodel.store.stats.reads == reads0             # all three from RAM
        t = tiered.telemetry()
        assert t.ram_tier_experts == 32 and t.ram_tier_bytes == tiered.ram_tier.capacity and t.tier_hits >= 3
        assert tiered.vmodel.store.stats.tier_hits >= 3 and plain.vmodel.store.stats.reads == 3
        assert np.array_equal(_logits(plain, TOKENS), _logits(tiered, TOKENS))  # bit for bit
    finally:
        plain.close()
        tiered.close()


@pytest.mark.parametrize("policy", ["exact", "swapmoe"])
def test_logits_with_the_tier_equal_logits_without(synth, policy):
    """`exact` (prompts' missing experts computed from the tier's bytes, decode steps loading them) and
    `swapmoe` (swaps committed at the same steps on both): the same experts, the same logits."""
    kw = dict(experts_per_layer=8, policy=policy, initial_experts={l: list(range(8)) for l in (0, 1)}, **SETTINGS)
    plain, tiered = SwapMoELlama(synth, **kw), SwapMoELlama(synth, ram_tier="100%", **kw)
    try:
        tiered.warm_tier(wait=True)
        reads0 = tiered.vmodel.store.stats.reads
        outs = []
        for rt in (plain, tiered):
            rt.reset()
            rows = []
            rt.eval(TOKENS)                     # a prompt: more tokens than S // k
            rows.append(np.array(rt.scores[len(TOKENS) - 1]))
            tok = int(np.argmax(rows[-1]))
            for _ in range(6):
                rt.apply_pending(wait=True)     # the same commits at the same steps on both sides
                rt.eval([tok])
                rows.append(np.array(rt.scores[rt.n_tokens - 1]))
                tok = int(np.argmax(rows[-1]))
            outs.append(np.stack(rows))
        assert np.array_equal(outs[0], outs[1])
        assert plain.vmodel.slot_map == tiered.vmodel.slot_map
        st = tiered.vmodel.store.stats
        assert st.reads == reads0 and st.tier_hits > 0           # decoding never read the disk
        assert plain.vmodel.store.stats.reads > 0
    finally:
        plain.close()
        tiered.close()


_GEN = """
import json, sys
from swapmoe_gguf.fileformat.reader import read_gguf
from swapmoe_gguf.residency.budget import estimate
from swapmoe_gguf.runtime import SwapMoELlama  # (llama.cpp loaded: part of the baseline measured next)
tier = int(sys.argv[2])
# what 8 slots and the tier cost as the runtime estimates them (exact: streamed prompts)
mem = estimate(read_gguf(sys.argv[1]), n_ctx=64, n_batch=64, streams=True, ram_tier=tier, capture_tokens=65)
rt = SwapMoELlama(sys.argv[1], memory_budget=str(mem.total(8)), ram_tier=tier, policy="exact", n_ctx=64, n_batch=64,
                  n_threads=2, seed=1)
rt.warm_tier(wait=True)
out = rt.create_completion("the expert", max_tokens=24, temperature=0.0)
hwm = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
print(json.dumps({"slots": rt.memory.slots, "budget": rt.budget_bytes, "hwm": hwm, "tier": rt.memory.ram_tier,
                  "held": len(rt.ram_tier), "blocks": rt.ram_tier.n_blocks, "reads": rt.vmodel.store.stats.reads}))
"""


def test_rss_stays_within_the_budget_with_the_tier_filled(synth):
    info = read_gguf(synth)
    tier = 8 * estimate(info, n_ctx=64, n_batch=64, baseline=0).per_slot  # half of each layer's experts
    r = subprocess.run([sys.executable, "-c", _GEN, synth, str(tier)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["tier"] == tier and res["held"] == res["blocks"] > 0, res   # the tier filled
    assert 4 <= res["slots"] < 16, res
    assert res["hwm"] <= res["budget"], f"peak RSS {res['hwm']} over budget {res['budget']}"


def test_a_tier_that_leaves_no_room_for_top_k_is_refused(synth):
    with pytest.raises(BudgetError, match=r"below the minimum .*RAM tier"):
        SwapMoELlama(synth, memory_budget="60%", ram_tier="90%", **SETTINGS)


def test_bad_ram_tier_flag_is_one_line(synth):
    r = run_cli("chat", "-m", synth, "--ram-tier", "lots", "-p", "hi")
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("swapmoe: error: ") and "--ram-tier" in lines[0] and "'lots'" in lines[0]


# the planner's split (pure Python) ----------------------------------------------------------------
def _mem(slots: int = 8, n: int = 16) -> MemoryPlan:
    return MemoryPlan(baseline=100 << 20, non_expert=50 << 20, rows=1 << 20, kv_cache=8 << 20, compute=20 << 20,
                      staging=4 << 20, per_slot=10 << 20, slots=slots, n_expert=n, top_k=2)


def test_split_host_slots_get_the_host_budget():
    t = split(_mem(), host_limit=400 << 20, device_slots=None, read_mb_s=500, upload_mb_s=10000)
    assert (t.slots, t.ram_tier) == (8, 0) and "slots are in host memory" in t.reasons[0]


def test_split_device_bound_slots_leave_the_host_rest_to_the_tier():
    mem = _mem(slots=16)
    limit = mem.total(4) + 5 * mem.per_slot + (3 << 20)  # 5 experts per layer (and change) beside S=4
    t = split(mem, host_limit=limit, device_slots=4, read_mb_s=500, upload_mb_s=10000)
    assert (t.slots, t.ram_tier, t.tier_experts) == (4, 5 * mem.per_slot, 5)
    assert t.hit_share == pytest.approx(5 / 12)
    assert "the device budget admits S=4" in t.reasons[0] and "21.0x faster" in t.reasons[0]
    # capped by the experts outside the slots; without a host budget, by the free memory given
    big = split(mem, host_limit=10 << 30, device_slots=4, read_mb_s=500, upload_mb_s=10000)
    assert big.ram_tier == 12 * mem.per_slot and big.hit_share == 1.0
    free = split(mem, host_limit=None, device_slots=4, read_mb_s=500, upload_mb_s=10000, host_free=25 << 20)
    assert free.ram_tier == 2 * mem.per_slot and "no --memory-budget" in free.reasons[0]
    unmeasured = split(mem, host_limit=limit, device_slots=4, read_mb_s=0.0, upload_mb_s=0.0)
    assert unmeasured.ram_tier == t.ram_tier and "not measured" in unmeasured.reasons[0]


def test_split_refuses_a_tier_that_does_not_pay():
    slow_upload = 500 * (MIN_GAIN - 1) * 0.5  # RAM -> device slower than disk -> RAM: a distant RPC server
    t = split(_mem(slots=16), host_limit=10 << 30, device_slots=4, read_mb_s=500, upload_mb_s=slow_upload)
    assert t.ram_tier == 0 and "no RAM tier" in t.reasons[0]


def test_split_explicit_tier_is_kept_and_capped():
    t = split(_mem(slots=16), host_limit=None, device_slots=10, read_mb_s=500, upload_mb_s=100, ram_tier=1 << 30)
    assert t.ram_tier == 6 * (10 << 20) and "capped" in t.reasons[0]
    t = split(_mem(), host_limit=None, device_slots=None, read_mb_s=500, upload_mb_s=100, ram_tier=30 << 20)
    assert (t.slots, t.ram_tier, t.tier_experts) == (8, 30 << 20, 3)


def test_an_explicit_tier_comes_out_of_the_budget_before_the_slots():
    mem = _mem(slots=16)
    budget = Budget(nbytes=mem.total(8))
    assert plan_slots(mem, budget, None).slots == 8
    from dataclasses import replace

    assert plan_slots(replace(mem, ram_tier=3 * mem.per_slot), budget, None).slots == 5
    assert replace(mem, ram_tier=7).full == mem.full  # a percentage budget is of the tier-less total


def test_plan_splits_the_budgets_and_says_why(synth):
    from swapmoe_gguf.planning.planner import Plan, make_plan, render
    from swapmoe_gguf.planning.profile import DeviceProfile, model_fingerprint

    info = read_gguf(synth)
    prof = DeviceProfile(1, str(info.path), model_fingerprint(info.path), "test", 2, 99, info.expert_bytes // 2,
                         200.0, 0.02, {4: 5.0, 8: 5.1}, 500.0, 0.0, 0.0, 0.0)
    kw = dict(n_ctx=64, threads=2, baseline=50 << 20)
    mem = estimate(info, n_ctx=64, n_batch=64, baseline=50 << 20)
    budget = Budget(nbytes=mem.total(16))
    host = make_plan(info, prof, budget, **kw)                       # slots in host memory: no tier
    dev = make_plan(info, prof, budget, device_slots=6, **kw)        # the device bounds S: the host rest is the tier
    assert host.ram_tier_bytes == 0 and host.experts_per_layer == 16
    assert dev.experts_per_layer == 6 and dev.ram_tier_bytes == 10 * mem.per_slot
    text = render(dev)
    assert "RAM tier:" in text and "the device budget admits S=6" in text and "faster than from disk" in text
    assert Plan.from_json(dev.to_json()) == dev
    # the tier spares the read thread: more swaps fit the same share of decoding
    none = make_plan(info, prof, budget, device_slots=6, ram_tier=0, **kw)
    assert none.ram_tier_bytes == 0 and dev.swaps_per_token >= none.swaps_per_token and dev.io_share < none.io_share
    explicit = make_plan(info, prof, budget, ram_tier="25%", **kw)  # asked for: it comes out of the host budget
    assert explicit.ram_tier_bytes == 4 * mem.per_slot and explicit.experts_per_layer == 12


_RPC = """
import json, sys
import numpy as np
from swapmoe_gguf.converters.default_model import default_model
from swapmoe_gguf.runtime import SwapMoELlama
tier = None if sys.argv[2] == "auto" else sys.argv[2]
rt = SwapMoELlama(str(default_model()), rpc_servers=sys.argv[1], n_gpu_layers=99, vram_budget="48MiB",
                  memory_budget="100%", ram_tier=tier, policy="exact", n_ctx=256, n_threads=1, n_threads_batch=1,
                  verbose=False)
rt.warm_tier(wait=True)
reads = rt.vmodel.store.stats.reads
rt.reset()
toks = rt.tokenize(b"The quick brown fox jumps over the lazy dog. Experts route tokens")
rt.eval(toks)
rows = [np.array(rt.scores[rt.n_tokens - 1])]
for _ in range(8):
    rt.eval([int(np.argmax(rows[-1]))])
    rows.append(np.array(rt.scores[rt.n_tokens - 1]))
t = rt.ram_tier
print(json.dumps({"slots": rt.memory.slots, "tier": rt.memory.ram_tier, "where": t.where if t else None,
                  "held": len(t) if t else 0, "disk_reads": rt.vmodel.store.stats.reads - reads,
                  "hits": rt.vmodel.store.stats.tier_hits, "logits": np.stack(rows).tolist()}))
"""


def test_device_bound_slots_get_a_ram_tier_by_default(servers):
    """An RPC device whose --vram-budget bounds S: the host memory the budget leaves becomes the RAM tier
    (in ordinary host memory: RPC has no pinned host buffer type), `exact` reads no disk after warm-up,
    and its logits equal those without a tier."""
    srv = servers()
    out = {}
    for tier in ("auto", "0"):
        r = subprocess.run([sys.executable, "-c", _RPC, srv.endpoint, tier], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        out[tier] = json.loads(r.stdout.strip().splitlines()[-1])
    auto, none = out["auto"], out["0"]
    assert 4 <= auto["slots"] == none["slots"] < 32
    assert auto["tier"] > 0 and auto["where"] == "host (numpy)" and auto["held"] > 0 and none["tier"] == 0
    assert auto["disk_reads"] == 0 and auto["hits"] > 0 and none["disk_reads"] > 0
    assert np.array_equal(np.array(auto["logits"]), np.array(none["logits"]))


def test_a_budget_change_keeps_the_tier(synth):
    rt = SwapMoELlama(synth, experts_per_layer=8, policy="swapmoe", initial_experts={l: list(range(8)) for l in (0, 1)},
                      ram_tier="50%", **SETTINGS)
    try:
        tier = rt.ram_tier
        rt.warm_tier(wait=True)
        assert len(tier) == tier.n_blocks == 16
        assert rt.set_budget(None, experts_per_layer=6) == 6
        assert rt.ram_tier is tier and rt.vmodel.store.tier is tier
        rt.vmodel.store.wait_warm(30)
        reads = rt.vmodel.store.stats.reads
        outside = [e for e in range(16) if e not in rt.vmodel.slot_map[0] and (0, e) in tier][0]
        rt.request_swap(0, 0, outside)
        assert rt.apply_pending(wait=True) == 1 and rt.vmodel.store.stats.reads == reads
        assert rt.memory.ram_tier == 8 * rt.memory.per_slot
    finally:
        rt.close()


def test_profile_says_when_a_miss_is_faster_on_the_cpu(synth):
    """The profile's CPU-from-RAM time of one expert (measured on a real runtime) against the upload."""
    from dataclasses import replace

    from swapmoe_gguf.planning.planner import make_plan
    from swapmoe_gguf.planning.profile import DeviceProfile, model_fingerprint, time_cpu_expert

    rt = SwapMoELlama(synth, experts_per_layer=8, policy="static", initial_experts={l: list(range(8)) for l in (0, 1)},
                      **SETTINGS)
    try:
        cpu = time_cpu_expert(rt, tokens=(1, 16), experts=2, repeats=2)
    finally:
        rt.close()
    assert set(cpu) == {1, 16} and 0 < cpu[1] and 0 < cpu[16]
    info = read_gguf(synth)
    prof = DeviceProfile(9, str(info.path), model_fingerprint(info.path), "test", 2, 99, info.expert_bytes // 2,
                         200.0, 1.0, {4: 5.0}, 500.0, 0.0, 0.0, 0.0, {1: 0.2, 16: 0.8})
    assert prof.miss_cpu_tokens() == 21                     # 0.2 + 0.04 / token reaches the 1 ms upload at 21
    assert replace(prof, commit_ms=0.1).miss_cpu_tokens() == 0
    assert DeviceProfile.from_json(prof.to_json()) == prof
    plan = make_plan(info, prof, None, n_ctx=64, threads=2, baseline=50 << 20, device_slots=6)
    assert plan.miss_cpu_tokens == 21 and any("faster on the CPU" in r for r in plan.reasons)
