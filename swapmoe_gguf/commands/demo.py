"""`swapmoe demo`: the main job on the embedded default model, end to end, nothing downloaded.

The shipped checkpoint (`data/multidomain-moe`: a 32-expert, top-4 Mixtral-architecture model
trained from scratch on Shakespeare, encyclopedic English, Python and C by
bench/train_default_moe.py) is converted once into the user cache. Then, under one memory budget
(default: half of the experts resident), two requests on different topics are answered greedily
by `full`, `swapmoe` and `static` (the pruned model) one after the other, each with what it kept
resident, its hit rate, swaps and speed; and the held-out mixed-domain request stream is scored
against the full model (perplexity and KL, overall and per domain), swapmoe also with a quality floor;
last, swapmoe's decode speed against static's, both loaded, in alternating blocks. swapmoe's F and Q
are the planner's for this device (a profile measured once, in about a second).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..converters.default_model import default_model, shipped_heldout
from ..residency.budget import fmt
from .inspect import render, summary

if TYPE_CHECKING:
    from ..runtime import SwapMoELlama

# Two requests, two topics: the second finds swapmoe's experts chosen for the first.
PROMPTS = (("shakespeare", "ROMEO.\nBut soft, what light through yonder window breaks?\n"),
           ("python", "def read_config(path):\n    \"\"\"Read a JSON configuration file.\"\"\"\n"))
N_TOKENS = 40
FLOOR = 0.3  # the eval's quality-floor row (--max-dropped-mass)
POLICIES = ("full", "swapmoe", "static")


def _one_line(text: str, width: int = 96) -> str:
    flat = text.replace("\n", "\u23ce ")
    return flat if len(flat) <= width else flat[: width - 1] + "\u2026"


def _agreement(llm: "SwapMoELlama", prompt: list[int], ref: list[int]) -> int:
    """At how many positions of `ref` (full's greedy answer to `prompt`) this model's greedy choice is
    full's, fed `ref` one token at a time (a decode step each, so the scheduler acts as it would)."""
    import numpy as np

    from .evaluate import last_logits

    llm.reset()
    llm.eval(prompt)
    hits = 0
    for tok in ref:
        hits += int(np.argmax(last_logits(llm)) == tok)
        llm.eval([tok])
    return hits


def _interleaved_speed(gguf: str, slots: int, kw: dict, rounds: int = 8, n: int = 32) -> dict[str, float]:
    """Greedy decode tok/s of swapmoe and static, both loaded, in alternating short blocks (each
    `n` tokens after each of the two prompts), median over `rounds`: the tables' speed columns time
    each policy once, one after the other, which a busy or noisy machine skews."""
    import statistics

    from ..runtime import SwapMoELlama
    from .evaluate import greedy_decode_seconds

    llms = {p: SwapMoELlama(gguf, policy=p, experts_per_layer=slots, scheduler="auto", **kw)
            for p in ("swapmoe", "static")}
    try:
        speed: dict[str, list[float]] = {p: [] for p in llms}
        for _ in range(rounds):
            for policy, llm in llms.items():
                secs = greedy_decode_seconds(llm, [prompt for _, prompt in PROMPTS], n)
                speed[policy].append(len(PROMPTS) * n / secs)
        return {p: statistics.median(v) for p, v in speed.items()}
    finally:
        for llm in llms.values():
            llm.close()


def run_demo(directory: str | None, force: bool = False, memory_budget: str | None = None) -> int:
    from ..fileformat.reader import read_gguf
    from ..planning.profile import load_or_measure
    from ..runtime import SwapMoELlama
    from .evaluate import read_texts, run_eval
    from .evaluate import render as render_eval

    gguf = default_model(Path(directory) if directory else None, force)
    info = read_gguf(gguf)
    print(render(summary(info)))
    n = info.n_expert
    threads = min(4, os.cpu_count() or 1)
    kw = dict(n_ctx=512, n_threads=threads, n_threads_batch=threads, seed=1, verbose=False)
    # Default: half of the experts; a --memory-budget (bytes or % of what `full` needs) picks S for
    # swapmoe, and static gets the same S (each model measures the process anew: the interpreter has
    # grown a little by then, and pruning must not be compared at a smaller S).
    size: dict = dict(memory_budget=memory_budget) if memory_budget else dict(experts_per_layer=n // 2)
    texts: dict[str, list[int]] = {}
    pieces: dict[str, str] = {}
    agree: dict[str, int] = {}
    stats = []
    slots = n
    # swapmoe's F and Q come from the planner: this device's profile (measured once, in about a second
    # on this model, and cached), as `swapmoe chat` and `serve` take them
    load_or_measure(info, SwapMoELlama, threads=threads)
    for policy in POLICIES:
        llm = SwapMoELlama(str(gguf), policy=policy, **(size if policy != "full" else {}), scheduler="auto", **kw)
        try:
            mem = llm.memory
            if policy == "swapmoe":
                slots = llm.vmodel.slots
                size = dict(experts_per_layer=slots)
                print(f"\nmemory budget {memory_budget or '(default) half of the experts'}: {slots} of {n} experts "
                      f"per layer resident, {fmt(slots * mem.per_slot)} of {fmt(n * mem.per_slot)} of expert weights; "
                      f"the process plans {fmt(mem.total())} = {100 * mem.total() / mem.total(n):.0f}% of the "
                      f"{fmt(mem.total(n))} `full` needs;\nthe rest is fixed: {mem.parts(0).rsplit(' + ', 1)[0]}")
                cfg = llm.policy.scheduler.config  # type: ignore[attr-defined]
                print(f"swapmoe's scheduler, planned from this device's profile: up to {cfg.quota} swap(s) per layer "
                      f"every {cfg.interval} tokens (F={cfg.interval}, Q={cfg.quota}; `swapmoe plan` says why)")
            first_layer = llm.vmodel.moe_layers[0]
            sets = []
            for domain, prompt in PROMPTS:
                toks = llm.tokenize(prompt.encode(), add_bos=True)
                llm.reset()
                out = []
                for tok in llm.generate(toks, temp=0.0):
                    out.append(tok)
                    if len(out) == N_TOKENS:
                        break
                texts[f"{policy}/{domain}"] = out
                pieces[f"{policy}/{domain}"] = llm.detokenize(out).decode("utf-8", errors="replace")
                if policy != "full":
                    agree[f"{policy}/{domain}"] = _agreement(llm, toks, texts[f"full/{domain}"])
                sets.append(sorted(llm.vmodel.slot_map[first_layer]))
            llm.score_pending()
            t = llm.telemetry()
            stats.append((policy, t, sets, first_layer, mem))
        finally:
            llm.close()
            del llm  # before the next model measures the process's baseline
    for domain, prompt in PROMPTS:
        print(f"\n=== a {domain} request, greedy, {N_TOKENS} tokens: {_one_line(prompt, 70)}")
        ref = texts[f"full/{domain}"]
        for policy in POLICIES:
            key = f"{policy}/{domain}"
            tag = "" if policy == "full" else f"  [{agree[key]}/{len(ref)}]"
            print(f"{policy:>8} | {_one_line(pieces[key])}{tag}")
    print(f"\n[n/{N_TOKENS}]: positions of full's answer where this model's own next-token choice is full's "
          "(fed full's answer token by token, right after its own answer)")
    print("\n| policy | experts/layer | expert weights resident | hit rate | swaps | decode tok/s | peak RSS |"
          "\n|---|---|---|---|---|---|---|")
    for policy, t, _, _, mem in stats:
        hit = f"{t.hit_rate:.1%}" if t.hit_rate is not None else "-"
        print(f"| {policy} | {t.slots}/{n} | {fmt(t.slots * mem.per_slot)} | {hit} | {t.swaps} | "
              f"{t.decode_tokens / max(t.decode_seconds, 1e-9):.0f} | {fmt(t.peak_rss_bytes)} |")
    for policy, _, sets, layer, _ in stats[1:]:
        print(f"{policy} resident in layer {layer} after each request: " + " -> ".join(map(str, sets)))
    stream = read_texts([str(p) for p in shipped_heldout()])
    print(f"\nheld-out request stream ({', '.join(stream)}; never trained on), switching topic every 2 requests; "
          "each 256-token request: first half prompt, second half decoded step by step and scored against `full`:\n")
    print(render_eval(run_eval(str(gguf), stream, policies=["swapmoe", "static"], experts_per_layer=slots,
                               memory_budget=None, ctx=256, chunks=8, threads=threads, switch_every=2,
                               floors=(FLOOR,))))
    print(f"\nswapmoe (floor {FLOOR:g}): the quality knob (--max-dropped-mass): where a token's experts not resident "
          f"carry more than {FLOOR:.0%} of its routing weight, they are loaded before its layer runs (0: lossless)")
    sp = _interleaved_speed(str(gguf), slots, kw)
    print(f"\ndecode speed, both models loaded, greedy, in alternating blocks (median of 8): swapmoe "
          f"{sp['swapmoe']:.0f} tok/s, static {sp['static']:.0f} tok/s: {sp['swapmoe'] / sp['static']:.2f}x")
    return 0

