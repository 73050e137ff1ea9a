"""A llama.cpp RPC client in a process of its own (tests/test_devices.py runs it).

RPC servers stay registered in ggml for the life of a process, and llama.cpp's client aborts the
process when one dies; a child process per scenario keeps both away from the test session.
Writes its results (logits, tokens, telemetry) to --out as .npz; prints READY and waits for a line
on stdin when --hold is given (the test then measures the servers' memory).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from swapmoe_gguf.converters.default_model import default_model
from swapmoe_gguf.runtime import SwapMoELlama

PROMPT = b"The quick brown fox jumps over the lazy dog. Experts route tokens; the router picks"


def build(a: argparse.Namespace, **kw):  # type: ignore[no-untyped-def]
    dev = dict(rpc_servers=a.rpc, n_gpu_layers=a.ngl, tensor_split=a.tensor_split, vram_budget=a.vram_budget,
               cpu_moe=a.cpu_moe) if a.rpc else {}
    return SwapMoELlama(a.model or str(default_model()), n_ctx=a.ctx, n_threads=1, n_threads_batch=1,
                        verbose=False, **dev, **kw)


def scores(llm, tokens: list[int]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """[n_tokens, n_vocab] logits of every position of one prompt."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: llm.n_tokens], dtype=np.float32)


def greedy(llm, tokens: list[int], n: int) -> list[int]:  # type: ignore[no-untyped-def]
    llm.reset()
    out = []
    for tok in llm.generate(tokens, temp=0.0):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=("full", "swap", "policies", "generate", "tap", "rebudget", "cpu_misses"))
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--rpc", default=None)
    p.add_argument("--ngl", type=int, default=99)
    p.add_argument("--tensor-split", default=None)
    p.add_argument("--vram-budget", default=None)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--hold", action="store_true")
    p.add_argument("--cpu-moe", action="store_true")
    p.add_argument("--policy", default="full", help="of the `full` scenario (exact: S from --vram-budget)")
    a = p.parse_args()
    import swapmoe_gguf

    res: dict[str, object] = {"package": swapmoe_gguf.__file__}  # the tree under test (tests/test_devices.py checks)
    if a.scenario == "full":  # every position's logits of `full`
        llm = build(a, policy=a.policy, logits_all=True)
        res["slots"] = llm.vmodel.slots
        res["slot_buffer"] = llm.vmodel.slot_buffer(next(n for n in llm.vmodel.handles if "_exps" in n))
        res["logits"] = scores(llm, llm.tokenize(PROMPT, add_bos=True))
        tel = llm.telemetry()
        res["device_bytes"] = json.dumps(tel.device_bytes)
        res["vram_budget_bytes"] = tel.vram_budget_bytes or 0
        if a.hold:
            print("READY", flush=True)
            sys.stdin.readline()
        llm.close()
    elif a.scenario == "swap":  # swaps written through the device vs a fresh build with that resident set
        llm = build(a, policy="static", experts_per_layer=4, initial_experts=None, logits_all=True)
        toks = llm.tokenize(PROMPT, add_bos=True)
        vm = llm.vmodel
        n = vm.n_expert
        for layer in vm.moe_layers:  # replace every slot's expert by one not resident
            free = [e for e in range(n) if e not in vm.slot_map[layer]]
            for slot in range(2):
                vm.swap(layer, slot, free[slot])
        res["slot_buffer"] = vm.slot_buffer(next(iter(vm.handles)))
        resident = {l: list(v) for l, v in vm.slot_map.items()}
        res["swapped"] = scores(llm, toks)
        llm.close()
        fresh = build(a, policy="static", experts_per_layer=4, initial_experts=resident, logits_all=True)
        assert {l: list(v) for l, v in fresh.vmodel.slot_map.items()} == resident
        res["fresh"] = scores(fresh, toks)
        fresh.close()
    elif a.scenario == "policies":  # exact at S < n against full (greedy), swapmoe and static run
        full = build(a, policy="full", n_batch=1, n_ubatch=1, logits_all=True)
        toks = full.tokenize(PROMPT, add_bos=True)[:12]
        res["full_tokens"] = np.array(greedy(full, toks, 16))
        res["full_logits"] = scores(full, toks)
        full.close()
        exact = build(a, policy="exact", experts_per_layer=4, n_batch=1, n_ubatch=1, logits_all=True)
        res["exact_tokens"] = np.array(greedy(exact, toks, 16))
        res["exact_logits"] = scores(exact, toks)
        res["exact_swaps"] = exact.telemetry().swaps
        exact.close()
        for name in ("swapmoe", "static"):
            llm = build(a, policy=name, experts_per_layer=4)
            res[f"{name}_tokens"] = np.array(greedy(llm, toks, 16))
            res[f"{name}_swaps"] = llm.telemetry().swaps
            llm.close()
    elif a.scenario == "tap":  # swapmoe, teacher-forced: its swaps and logits (the router tap on this device)
        from swapmoe_gguf.residency.scheduler import SchedulerConfig

        llm = build(a, policy="swapmoe", experts_per_layer=4,
                    scheduler=SchedulerConfig(interval=4, quota=1, prior_weight=0.0))
        swaps: list[tuple[int, int, int]] = []
        request, before = llm.request_swap, llm._before_decode
        llm.request_swap = lambda l, s, e: (swaps.append((l, s, e)), request(l, s, e))[1]
        llm._before_decode = lambda: (llm.apply_pending(wait=True), before())[1]  # swaps not timing-dependent
        toks = llm.tokenize(PROMPT, add_bos=True)
        llm.eval(toks[:6])
        logits = []
        for t in toks[6:]:
            llm.eval([t])
            logits.append(np.array(llm.scores[llm.n_tokens - 1]))
        llm.score_pending()
        res["swaps"] = np.array(swaps)
        res["logits"] = np.stack(logits)
        res["scores"] = llm.policy.scheduler.scores.copy()
        res["redirected"] = llm.tap.redirected_inputs
        res["device_areas"] = len(llm.tap._cap.devices) if llm.tap._cap is not None else 0
        res["kernel_flushes"] = llm.tap.kernel_flushes
        llm.close()
    elif a.scenario == "rebudget":  # a live budget change keeps S within --vram-budget
        from swapmoe_gguf.residency.budget import BudgetError

        llm = build(a, policy="swapmoe", experts_per_layer=4)
        res["cap"] = llm.placement.device.max_slots(llm.vmodel.n_expert)
        res["after_host_100"] = llm.set_budget("100%")
        try:
            llm.set_budget(None, experts_per_layer=int(res["cap"]) + 1)
            res["refused"] = ""
        except BudgetError as e:
            res["refused"] = str(e)
        res["after_refusal"] = llm.vmodel.slots
        llm.close()
    elif a.scenario == "cpu_misses":  # exact on the device, misses computed on the CPU instead of uploaded
        full = build(a, policy="full", n_batch=1, n_ubatch=1)
        toks = full.tokenize(PROMPT, add_bos=True)[:12]
        res["full_tokens"] = np.array(greedy(full, toks, 16))
        full.close()
        for cpu in (0, 1):
            llm = build(a, policy="exact", experts_per_layer=4, n_batch=1, n_ubatch=1)
            llm.miss_cpu_tokens = cpu  # (what the profile measures: here both ways are run)
            res[f"tokens_{cpu}"] = np.array(greedy(llm, toks, 16))
            res[f"swaps_{cpu}"] = llm.telemetry().swaps
            res[f"streamed_{cpu}"] = llm.policy.streamed
            llm.close()
    elif a.scenario == "generate":  # long generation: the test kills the server in the middle
        llm = build(a, policy="swapmoe", experts_per_layer=4)
        toks = llm.tokenize(PROMPT, add_bos=True)
        for i, _ in zip(range(a.ctx - len(toks) - 1), llm.generate(toks, temp=0.0)):
            if i == 2:
                print("STARTED", flush=True)
        print("FINISHED", flush=True)
        llm.close()
    np.savez(a.out, **res)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
