"""Calibration: each expert's importance per token over a calibration text (Eq. 1, no decay), for
`static`'s fixed set and `swapmoe`'s starting set and prior. Read in windows of CALIB_CHUNK tokens;
bounded in time on large models (windows spread over the text, `calibration_windows`).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ..llamacpp.router import RouterBatch
from .policies import FixedPolicy, observe
from .protocols import Runtime
from .scheduler import ImportanceScheduler, SchedulerConfig

log = logging.getLogger(__name__)


class _Collector(FixedPolicy):
    observes = True

    def __init__(self, scheduler: ImportanceScheduler):
        self.scheduler = scheduler

    def on_router(self, rt: Runtime, batch: RouterBatch) -> None:
        observe(self.scheduler, batch)


CALIB_CHUNK = 256  # tokens per calibration window: fixed, so the result does not depend on n_ctx or slots
# What a first start may spend calibrating: the whole text (~10k tokens) takes about a second on a small
# model but 16 minutes on a 48-layer 29 GiB one on 2 cores, where a few hundred tokens spread over the
# text already rank the experts every domain needs
CALIB_SECONDS = 20.0
CALIB_PROBE = 32  # tokens timed first to know whether the whole text fits CALIB_SECONDS


def calib_chunk(rt: Runtime) -> int:
    return max(1, min(CALIB_CHUNK, rt.n_ctx_seq(), len(rt.input_ids)) - 1)


def calibration_windows(n_tokens: int, chunk: int, budget_tokens: int) -> list[tuple[int, int]]:
    """(start, end) token windows to calibrate on: the whole text in windows of `chunk`, in order, when
    `budget_tokens` covers it; else windows spread evenly over the text (a mixed text's every domain
    is sampled, not only its first), each of at least CALIB_PROBE tokens, summing to about the budget."""
    if budget_tokens >= n_tokens:
        return [(i, min(i + chunk, n_tokens)) for i in range(0, n_tokens, chunk)]
    w = max(min(CALIB_PROBE, chunk), min(chunk, budget_tokens // 4))
    m = max(1, budget_tokens // w)
    return [(int(s), int(s) + w) for s in np.linspace(0, max(0, n_tokens - w), m).round()]


def calibrate(rt: Runtime, tokens: list[int], seconds: float = CALIB_SECONDS) -> np.ndarray:
    """Importance per token over a calibration text (Eq. 1, no decay), read in windows of CALIB_CHUNK
    tokens; when the whole text would take more than `seconds` (timed on a short probe), fewer
    windows spread over it (`calibration_windows`). A progress bar on a terminal when it will take a
    while. [n_moe_layer, n_expert]"""
    import sys

    from tqdm import tqdm

    vm = rt.vmodel

    def collector() -> ImportanceScheduler:
        return ImportanceScheduler(vm.moe_layers, vm.n_expert, vm.top_k, vm.info.expert_norms,  # type: ignore[arg-type]
                                   SchedulerConfig(decay=1.0 - 1e-9, interval=1 << 30, quota=0))

    sched = collector()
    saved, enabled = rt.policy, rt.tap.enabled
    chunk, used = calib_chunk(rt), 0
    bar = None
    try:
        rt.tap.enabled = True
        rt.policy = _Collector(collector())  # the probe only times: its scores are dropped
        t0 = time.perf_counter()
        rt.reset()
        probe = tokens[:min(CALIB_PROBE, chunk)]
        rt.eval(probe)
        rate = len(probe) / max(time.perf_counter() - t0, 1e-9)                          # tokens / s
        windows = calibration_windows(len(tokens), chunk, int(rate * seconds))
        total = sum(e - s for s, e in windows)
        if total / rate > 3.0:  # long work: show it
            bar = tqdm(total=total, unit="tok", desc="calibrating", disable=not sys.stderr.isatty(), leave=False)
        rt.policy = _Collector(sched)
        t0 = time.perf_counter()
        for s, e in windows:
            rt.reset()
            rt.eval(tokens[s:e])
            used += e - s
            if bar is not None:
                bar.update(e - s)
            if time.perf_counter() - t0 > 2 * seconds and used < total:  # the probe misjudged: stop
                break
        if used < len(tokens):
            log.info("calibrated on %d of %d tokens in %d windows spread over the text (%.0f s budget)", used,
                     len(tokens), len(windows), seconds)
    finally:
        if bar is not None:
            bar.close()
        rt.policy, rt.tap.enabled = saved, enabled
        rt.reset()
    return sched.scores / max(1, used)


def ranking(rates: np.ndarray, layers: list[int]) -> dict[int, list[int]]:
    """Every layer's experts, most important first. rates: [n_layer, n_expert]"""
    return {l: [int(e) for e in np.argsort(-rates[i], kind="stable")] for i, l in enumerate(layers)}
