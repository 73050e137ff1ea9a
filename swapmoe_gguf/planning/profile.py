"""Device profile: what this machine does with this model, measured once and cached.

Measured: reading expert slices from the file with the page cache dropped for those ranges
(MB/s), committing an expert into a slot (`ggml_backend_tensor_set`), decode time per token at
two slot counts, prefill speed, and, by decoding in interleaved blocks, what scoring one layer's
router adds to a step (a graph split plus numpy) and what one asynchronous swap really adds
(commit, plus the read thread competing with llama.cpp's threads for cores and memory bandwidth).
Cached per model file and machine under the user cache directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..base.paths import cache_dir
from ..fileformat.info import GGUFInfo
from ..residency.protocols import Runtime, RuntimeFactory
from ..residency.scheduler import SchedulerConfig

log = logging.getLogger(__name__)
FLUSH_STEPS = 64  # decode steps the router tap gathers before it scores them (the runtime's capture room, F >= 64)
PROFILE_VERSION = 11  # bump when what is measured changes (7: scoring cost per layer, from steps scoring all;
                      # 8: decode steps scored in C, gathered and routed every few steps;
                      # 9: one expert computed on the CPU from RAM, 1 and 16 tokens: misses computed vs uploaded;
                      # 10: router inputs written by the graph into the tap's capture area, scored in one C call;
                      # 11: scoring timed by the runtime's hooks and flushes, on swapmoe's path (C kernel))


def model_fingerprint(path: str | os.PathLike[str]) -> str:
    """Identity of a model file: size, mtime and a hash of its first MiB (metadata and first tensors)."""
    p = Path(path)
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
    return f"{st.st_size}-{st.st_mtime_ns}-{h.hexdigest()[:16]}"


def machine_id() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.node()}-{cpu}-{os.cpu_count()}cpu"


@dataclass(frozen=True)
class DeviceProfile:
    version: int
    model: str
    fingerprint: str
    machine: str
    threads: int
    n_gpu_layers: int
    expert_bytes: int            # one expert of one layer, all its tensors
    read_mb_s: float             # expert reads, page cache dropped
    commit_ms: float             # one expert into a slot
    decode_ms: dict[int, float]  # slots -> ms per token (router tap off)
    prefill_tok_s: float
    seconds: float               # how long profiling took
    swap_ms: float = 0.0         # decode time one asynchronous swap adds, end to end (>= commit_ms)
    tap_ms: float = 0.0          # what scoring one MoE layer's router adds to a step (graph split + numpy),
                                 # measured on steps scoring every layer
    cpu_expert_ms: dict[int, float] | None = None  # tokens -> one expert computed with ggml's CPU kernels from
                                 # bytes in RAM (expert_compute.py, one thread); None: the FFN is not one it computes

    def miss_cpu_tokens(self) -> int:
        """Up to how many tokens per missing expert computing it on the CPU from RAM beats uploading it
        into a slot (the commit) for the graph: linear between the measured token counts. 0: always upload
        (or not measured)."""
        if not self.cpu_expert_ms or len(self.cpu_expert_ms) < 2:
            return 0
        (n0, c0), (n1, c1) = sorted(self.cpu_expert_ms.items())[:2]
        if c0 >= self.commit_ms:
            return 0
        slope = max(1e-9, (c1 - c0) / max(1, n1 - n0))
        return max(n0, int(n0 + (self.commit_ms - c0) / slope + 1e-6))  # (float rounding at the crossover)

    @property
    def swap_cost_ms(self) -> float:
        return max(self.swap_ms, self.commit_ms)

    @property
    def upload_mb_s(self) -> float:
        """RAM -> slot bandwidth (a commit: `ggml_backend_tensor_set` into the slot's buffer)."""
        return self.expert_bytes / (max(self.commit_ms, 1e-6) * 1e3) if self.expert_bytes else 0.0

    @property
    def read_ms(self) -> float:
        return self.expert_bytes / (self.read_mb_s * 1e6) * 1e3

    def decode_ms_at(self, slots: int) -> float:
        """Linear in the slot count between the measured points, flat outside them: compute is top-k,
        so S changes little, and extrapolating a noisy slope would not be a measurement."""
        pts = sorted((int(k), v) for k, v in self.decode_ms.items())
        if len(pts) == 1 or slots <= pts[0][0]:
            return pts[0][1]
        (s0, d0), (s1, d1) = pts[0], pts[-1]
        if slots >= s1:
            return d1
        return d0 + (d1 - d0) * (slots - s0) / max(1, s1 - s0)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "DeviceProfile":
        d = json.loads(text)
        d["decode_ms"] = {int(k): float(v) for k, v in d["decode_ms"].items()}
        if d.get("cpu_expert_ms"):
            d["cpu_expert_ms"] = {int(k): float(v) for k, v in d["cpu_expert_ms"].items()}
        return cls(**d)


def profile_path(info: GGUFInfo, threads: int, n_gpu_layers: int) -> Path:
    key = hashlib.sha256(f"{info.path.resolve()}|{model_fingerprint(info.path)}|{machine_id()}".encode()).hexdigest()[:20]
    where = ""
    if n_gpu_layers:  # offloaded: measured on these devices (an RPC server's endpoint names it)
        from ..llamacpp.devices import offload_devices

        names = "|".join(f"{d.name}={d.description}" for d in offload_devices())
        where = "-" + hashlib.sha256(names.encode()).hexdigest()[:8] if names else ""
    return cache_dir() / "profiles" / f"{key}-t{threads}-ngl{n_gpu_layers}{where}.json"


def time_swaps(vm, layers: int | None = None, experts: int | None = None) -> tuple[list[float], list[float], int]:  # type: ignore[no-untyped-def]
    """Cycle experts through slot 0 of a `VirtualExpertModel`: (read ms, commit ms, expert bytes).
    Each read is cold: the file is synced and the expert's pages are dropped first."""
    fd = vm.store.fd
    os.fsync(fd)  # dirty pages (a freshly converted file) cannot be dropped
    reads: list[float] = []
    commits: list[float] = []
    nbytes = 0
    for layer in vm.moe_layers[:layers]:
        for e in range(min(vm.n_expert, experts or vm.n_expert)):
            for t in vm.store.layers[layer]:
                start, end = t.expert_range(e)
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            staged = vm.store.read(layer, e)
            t1 = time.perf_counter()
            vm.commit(0, staged)
            t2 = time.perf_counter()
            vm.store.release(staged)
            reads.append(1e3 * (t1 - t0))
            commits.append(1e3 * (t2 - t1))
            nbytes = max(nbytes, sum(v.nbytes for v in staged.parts.values()))
    return reads, commits, nbytes


def time_cpu_expert(rt: Runtime, tokens: tuple[int, ...] = (1, 16), experts: int = 4,
                    repeats: int = 3) -> dict[int, float] | None:
    """ms to compute one expert of the first MoE layer on `tokens` tokens with ggml's CPU kernels
    (one thread, as the lossless path runs them beside llama.cpp's), from bytes already in RAM.
    None when that layer's FFN is not one expert_compute reproduces."""
    import numpy as np

    from ..llamacpp.expert_compute import ffn_spec, run_expert

    vm = rt.vmodel
    layer = vm.moe_layers[0]
    ffn = ffn_spec(rt.tap.nodes.get(layer, {}), vm.info.layer_expert_tensors(layer))
    if isinstance(ffn, str):
        log.info("profile: experts are not computed on the CPU here (%s)", ffn)
        return None
    rng = np.random.default_rng(0)
    out: dict[int, list[float]] = {n: [] for n in tokens}
    for e in range(min(experts, vm.n_expert)):
        staged = vm.store.read(layer, e)
        try:
            for n in tokens:
                x = (0.1 * rng.standard_normal((n, ffn.n_embd))).astype(np.float32)   # [n, n_embd]
                run_expert(ffn, staged, x, 1)  # warm: the weights in cache as a miss's would not be, once
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    run_expert(ffn, staged, x, 1)
                    out[n].append(1e3 * (time.perf_counter() - t0))
        finally:
            vm.store.release(staged)
    return {n: round(statistics.median(v), 4) for n, v in out.items()}


def _trimmed_mean(v: list[float]) -> float:
    """Mean without the slowest and fastest tenth: robust to this machine's spikes, yet sees costs
    that are not paid on every step (swaps)."""
    s = sorted(v)
    cut = len(s) // 10
    return statistics.mean(s[cut:len(s) - cut] or s)


def _interleaved_decode(rt: Runtime, tok: int, n_vocab: int, cycles: int = 3,
                        block: int = 8) -> tuple[list[float], list[float], int, float]:
    """Decode steps in interleaved blocks: plain (router tap off), tap on every MoE layer, and one
    swap requested per step (read in the background, committed between steps, as swapmoe does).
    Returns the plain and the swapping step times (seconds), the swaps committed, and what scoring
    adds to a step (seconds): the runtime's own hooks timed around each tapped step against a plain
    one's (a difference of whole steps is below this machine's noise), and each tap block's scoring
    of its router inputs spread over FLUSH_STEPS steps (the runtime scores once per that many)."""
    vm = rt.vmodel
    cold = [(l, e) for l in vm.moe_layers for e in range(vm.n_expert) if e not in vm.slot_map[l]]
    plain: list[float] = []
    swapping: list[float] = []
    swaps, i = 0, 0
    flushes: list[float] = []
    hooks = {"plain": 0.0, "tap": 0.0}
    for _ in range(cycles):
        for kind, out in (("plain", plain), ("tap", []), ("swap", swapping)):
            rt.tap.enabled = kind == "tap"
            # every layer scored on every step, and the cost divided by the layers (measure): one
            # layer's share is below this machine's step-to-step noise on a model of many layers
            # (48 layers: about 0.1 ms of a 65 ms step, which one-layer blocks measured as 2 ms)
            rt.tap.stride = 1
            before, sched = rt.telemetry_.swaps, rt.telemetry_.decode_sched_seconds
            for _ in range(block):
                if kind == "swap" and cold:
                    layer, e = cold[i % len(cold)]
                    i += 1
                    if e not in vm.slot_map[layer]:
                        rt.request_swap(layer, i % vm.slots, e)
                t0 = time.perf_counter()
                rt.eval([tok])
                out.append(time.perf_counter() - t0)
                tok = 1 + (tok * 31) % max(2, n_vocab - 1)
            if kind in hooks:
                hooks[kind] += rt.telemetry_.decode_sched_seconds - sched
            if kind == "tap":  # the block's router inputs scored now (else in the next block's first step)
                t0 = time.perf_counter()
                rt.score_pending()
                flushes.append(time.perf_counter() - t0)
            if kind == "swap":
                rt.apply_pending(wait=True)
                swaps += rt.telemetry_.swaps - before
    rt.tap.enabled, rt.tap.stride = False, 1
    # (the hooks' difference is of the order of this machine's step-to-step noise: never below 0)
    scoring = max(0.0, hooks["tap"] - hooks["plain"]) / (cycles * block) + statistics.median(flushes) / FLUSH_STEPS
    return plain, swapping, swaps, scoring


def measure(info: GGUFInfo, runtime: RuntimeFactory, *, threads: int, n_gpu_layers: int = 0,
            n_ctx: int = 512) -> DeviceProfile:
    """Time reads, commits, decode steps (plain, router-scored, swapping) and a prefill on runtimes
    that `runtime` builds (`runtime.SwapMoELlama`)."""
    t_start = time.perf_counter()
    k, n = info.params.n_expert_used, info.n_expert
    decode: dict[int, float] = {}
    prefill = 0.0
    read_ms: list[float] = []
    commit_ms: list[float] = []
    expert_bytes = 0
    swap_ms, tap_ms = 0.0, 0.0
    cpu_expert: dict[int, float] | None = None
    kw = dict(n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=threads, n_threads_batch=threads,
              n_gpu_layers=n_gpu_layers, verbose=False)
    for slots in sorted({k, min(n, 2 * k)}):
        # swapmoe that proposes nothing (Q = 0): its tap scores through the C kernel into a scheduler, as
        # when it runs; the swaps below are requested by hand. F = 256: no update falls due inside a
        # block (its scoring is timed apart, see _interleaved_decode)
        rt = runtime(str(info.path), experts_per_layer=slots, policy="swapmoe",
                     scheduler=SchedulerConfig(interval=256, quota=0, prior_weight=0.0),
                     initial_experts={l: list(range(slots)) for l in info.moe_layers}, **kw)
        try:
            prompt = [t % max(2, info.params.n_vocab - 1) + 1 for t in range(3, 3 + min(64, n_ctx // 4))]
            rt.reset()
            t0 = time.perf_counter()
            rt.eval(prompt)
            prefill = max(prefill, len(prompt) / (time.perf_counter() - t0))
            tok = prompt[-1]
            for _ in range(6):  # warm-up
                rt.eval([tok])
            if not read_ms:
                read_ms, commit_ms, expert_bytes = time_swaps(rt.vmodel, layers=4, experts=6)
                cpu_expert = time_cpu_expert(rt)
            plain, swapping, swaps, scoring = _interleaved_decode(rt, tok, info.params.n_vocab)
            decode[slots] = 1e3 * statistics.median(plain)
            base = _trimmed_mean(plain)
            tap_ms = max(tap_ms, 1e3 * scoring / len(info.moe_layers))  # per layer scored
            if swaps:
                swap_ms = max(swap_ms, 1e3 * (_trimmed_mean(swapping) - base) * len(swapping) / swaps)
        finally:
            rt.close()
    read = statistics.median(read_ms)
    return DeviceProfile(PROFILE_VERSION, str(info.path.resolve()), model_fingerprint(info.path), machine_id(),
                         threads, n_gpu_layers, expert_bytes, round(expert_bytes / (read / 1e3) / 1e6, 1),
                         round(statistics.median(commit_ms), 4), {s: round(v, 4) for s, v in decode.items()},
                         round(prefill, 1), round(time.perf_counter() - t_start, 2), round(swap_ms, 4),
                         round(tap_ms, 4), cpu_expert)


def cached_profile(info: GGUFInfo, *, threads: int, n_gpu_layers: int = 0) -> DeviceProfile | None:
    """The cached profile of this model on this machine, or None (nothing is measured)."""
    path = profile_path(info, threads, n_gpu_layers)
    try:
        prof = DeviceProfile.from_json(path.read_text())
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return prof if prof.version == PROFILE_VERSION and prof.fingerprint == model_fingerprint(info.path) else None


def load_or_measure(info: GGUFInfo, runtime: RuntimeFactory, *, threads: int, n_gpu_layers: int = 0,
                    refresh: bool = False) -> DeviceProfile:
    """The cached profile of this model on this machine, else `measure` (and cache) it."""
    path = profile_path(info, threads, n_gpu_layers)
    if path.is_file() and not refresh:
        try:
            prof = DeviceProfile.from_json(path.read_text())
            if prof.version == PROFILE_VERSION and prof.fingerprint == model_fingerprint(info.path):
                log.info("using cached device profile %s", path)
                return prof
        except (ValueError, TypeError, KeyError):
            log.info("ignoring unreadable profile cache %s", path)
    prof = measure(info, runtime, threads=threads, n_gpu_layers=n_gpu_layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(prof.to_json())
    os.replace(tmp, path)
    return prof
