"""The `swapmoe` command line. Libraries raise; this module configures logging, prints and exits.

Any `SwapMoEError` (bad input) becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Sequence

from ..base.errors import SwapMoEError
from ..serving.settings import (SWITCH_EVERY, add_device_args, add_model_args, add_sampling_args, add_server_args,
                                device_kwargs, dropped_mass, ram_tier)

log = logging.getLogger("swapmoe_gguf")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise SwapMoEError(f"{self.prog}: {message}")


def _cmd_convert(a: argparse.Namespace) -> int:
    from ..converters import convert
    from ..converters.llamacpp_hf import LlamaCppOptions
    from .inspect import fmt_bytes

    opts = LlamaCppOptions(no_mtp=a.no_mtp, fuse_gate_up_exps=a.fuse_gate_up_exps, vocab=a.vocab)
    r = convert(a.src, a.output, a.type, force=a.force, progress=None if a.progress else False, threads=a.threads,
                engine=a.engine, llamacpp=opts, imatrix=a.imatrix)
    if not r.written:
        print(f"{a.src}: {r.note}")
        return 0
    align = "expert slices page-aligned" if r.slices_aligned else "tensor starts page-aligned (see warning)"
    print(f"wrote {r.output} ({r.arch}, {fmt_bytes(r.bytes_written)}) in {r.seconds:.1f} s; {align}")
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from ..fileformat.reader import read_gguf
    from .inspect import render, summary

    from .devices import device_rows, render_devices

    s = summary(read_gguf(a.model, partial=True))  # a split GGUF with shards missing: say which
    s["devices"] = device_rows()
    print(json.dumps(s, indent=2) if a.json else render(s) + "\n" + render_devices(s["devices"]))
    return 0


def _cmd_rpc_server(a: argparse.Namespace) -> int:
    from .devices import run_rpc_server

    return run_rpc_server(host=a.host, port=a.port, threads=a.threads, cache=a.cache, devices_csv=a.device)


def _cmd_plan(a: argparse.Namespace) -> int:
    import os

    from ..fileformat.reader import read_gguf
    from ..planning.planner import make_plan, render
    from ..planning.profile import load_or_measure
    from ..residency.budget import parse_budget

    import psutil

    from ..runtime import SwapMoELlama  # loads llama.cpp: part of the baseline a run will have

    baseline = psutil.Process().memory_info().rss  # before profiling builds (and frees) models
    info = read_gguf(a.model)
    if info.run_problem():  # not swap-ready is fine: the runtime reads such a GGUF in place
        from ..base.errors import LayoutError

        raise LayoutError(f"{a.model}: cannot run this GGUF ({info.run_problem()})")
    budget = parse_budget(a.memory_budget) if a.memory_budget else None
    if a.floor:
        from ..planning.floor_tuning import parse_target

        parse_target(a.floor)  # a bad target is refused before anything is measured
    threads = a.threads or max(1, (os.cpu_count() or 2) // 2)
    from .devices import device_rows, register_rpc, render_devices

    register_rpc(a.rpc)  # before profiling: its models offload to them with -ngl
    print(render_devices(device_rows()) + "\n")
    prof = load_or_measure(info, SwapMoELlama, threads=threads, n_gpu_layers=a.n_gpu_layers,
                           refresh=a.reprofile)
    device_slots = None
    if a.vram_budget:  # S as the device budget bounds it; the host budget then pays the RAM tier
        from ..llamacpp.devices import offload_devices
        from ..planning.planner import device_slots_for
        from ..residency.budget import estimate, plan_slots

        offload = offload_devices()
        if not offload or a.n_gpu_layers == 0:
            raise SwapMoEError("plan: --vram-budget: nothing is offloaded (no GPU or RPC device, or -ngl 0)")
        mem = plan_slots(estimate(info, n_ctx=a.ctx_size, n_batch=min(a.ctx_size, 512), baseline=baseline), budget,
                         a.experts_per_layer)
        device_slots = device_slots_for(info, mem, n_gpu_layers=a.n_gpu_layers, vram_budget=parse_budget(a.vram_budget),
                                        total_device=sum(d.total for d in offload),
                                        experts_per_layer=a.experts_per_layer)
    plan = make_plan(info, prof, budget, n_ctx=a.ctx_size, threads=threads, experts_per_layer=a.experts_per_layer,
                     baseline=baseline, device_slots=device_slots, ram_tier=a.ram_tier)
    if a.floor and plan.policy == "swapmoe":
        from ..planning import floor_tuning

        target = floor_tuning.parse_target(a.floor)
        points = floor_tuning.measure(a.model, plan.experts_per_layer, SwapMoELlama, threads=threads,
                                      n_ctx=min(a.ctx_size, 512))
        plan = floor_tuning.apply(plan, *floor_tuning.pick(points, target), points)
    print(render(plan))
    if a.output:
        from pathlib import Path

        from ..base.atomic import atomic_output

        with atomic_output(Path(a.output), force=True) as tmp:
            tmp.write_text(plan.to_json())
        print(f"\nwrote {a.output} (use it with --plan)")
    return 0


def _cmd_chat(a: argparse.Namespace) -> int:
    from ..serving.settings import model_settings, sampling_settings
    from .chat import run_chat

    return run_chat(model_settings(a), sampling_settings(a), prompt=a.prompt, system=a.system, raw=a.raw)


def _cmd_serve(a: argparse.Namespace) -> int:
    import uvicorn  # noqa: F401  (imported before the model: part of the measured baseline)

    from ..serving.server import serve
    from ..serving.settings import model_settings, sampling_settings, server_settings

    ss = server_settings(a)
    ms = model_settings(a)
    load = lambda: ms.load(n_seq_max=ss.parallel, kv_unified=a.kv_unified, swa_full=a.swa_full)  # noqa: E731
    llm = load()
    try:
        serve(llm, ss, sampling_settings(a), loader=load)
    finally:
        llm.close()
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    import os

    from ..converters.default_model import default_model, shipped_heldout
    from .evaluate import read_texts, render, run_eval

    if a.switch_every < 1:
        raise SwapMoEError(f"eval: --switch-every must be at least 1, got {a.switch_every}")
    texts = read_texts(a.text or [str(p) for p in shipped_heldout()])
    policies = a.policy or ["swapmoe", "static"]
    if a.max_dropped_mass and "swapmoe" not in policies:
        raise SwapMoEError("eval: --max-dropped-mass is a floor for swapmoe; add --policy swapmoe")
    res = run_eval(a.model or str(default_model()), texts, policies=policies, experts_per_layer=a.experts_per_layer,
                   memory_budget=a.memory_budget, ctx=a.ctx_size, chunks=a.chunks,
                   threads=a.threads or max(1, (os.cpu_count() or 2) // 2),
                   floors=tuple(a.max_dropped_mass or ()), switch_every=a.switch_every,
                   device=device_kwargs(a))
    print(render(res))
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    from .benchmark import BenchOptions, run_bench

    if a.scale:
        import os
        from pathlib import Path

        from .bench_scale import run_scale

        paths = run_scale(Path(a.output or "swapmoe-bench"), budget=a.scale_budget, n_predict=a.n_predict or 16,
                          threads=a.threads or max(1, (os.cpu_count() or 2) // 2), rounds=a.rounds or 1)
        print(paths["table"].read_text())
        return 0

    try:
        budgets = tuple(float(x.strip().rstrip("%")) for x in a.budgets.split(",")) if a.budgets else None
    except ValueError:
        raise SwapMoEError(f"bench: --budgets takes percentages like 100,75,50,25; got {a.budgets!r}") from None
    types = None
    if a.types is not None:
        from ..converters.quant import out_type

        types = tuple(out_type(t.strip()).name for t in a.types.split(",") if t.strip())  # unknown: QuantError
    floors = None
    if a.floors is not None:
        try:
            floors = tuple(dropped_mass(t.strip()) for t in a.floors.split(",") if t.strip())
        except argparse.ArgumentTypeError as e:
            raise SwapMoEError(f"bench: --floors: {e}") from None
    kw = {k: v for k, v in dict(out_dir=a.output, speed_model=a.model, quality_model=a.quality_model, text=a.text,
                                budgets=budgets, n_predict=a.n_predict, rounds=a.rounds, threads=a.threads,
                                chunks=a.chunks, types=types, floors=floors,
                                worst_case=a.worst_case).items() if v is not None}
    dev = device_kwargs(a)
    if dev["n_gpu_layers"] or dev["rpc_servers"]:  # the speed cells' placement; quality stays on the CPU
        kw["device"] = json.dumps(dev)
    opts = BenchOptions.quick_options(**kw) if a.quick else BenchOptions(**kw)
    if opts.n_predict < 2 or opts.rounds < 1 or opts.chunks < 1:
        raise SwapMoEError("bench: need -n >= 2, --rounds >= 1 and --chunks >= 1")
    paths = run_bench(opts)
    print(paths["table"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(a.dir, force=a.force, memory_budget=a.memory_budget)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="swapmoe", description="SwapMoE: Mixture-of-Experts GGUF models under a memory budget")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("convert", help="HF checkpoint or GGUF -> swap-ready GGUF")
    c.add_argument("src", help="Hugging Face checkpoint directory, or an existing .gguf to re-lay out")
    c.add_argument("-o", "--output", required=True, help="output .gguf path")
    c.add_argument("--type", default=None, metavar="TYPE",
                   help="llama.cpp's names: f32, f16 (default), bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s/m/l, "
                        "q2_k_s, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k, iq4_nl, iq4_xs, iq3_s, iq3_m; with --imatrix "
                        "also iq1_s, iq1_m, iq2_xxs, iq2_xs, iq2_s, iq2_m, iq3_xxs, iq3_xs (HF checkpoints only)")
    c.add_argument("--engine", choices=("auto", "llamacpp", "builtin"), default="auto",
                   help="HF checkpoints: llama.cpp's converter classes (every architecture it knows; needs torch, "
                        "fetched once with pip), the built-in one (Mixtral, Qwen2/3-MoE, OLMoE, Granite-MoE), or "
                        "auto (built-in where it applies)")
    c.add_argument("--imatrix", metavar="FILE", default=None,
                   help="llama.cpp's importance matrix (llama-imatrix's GGUF or legacy .dat) for its quantizer; "
                        "required by iq1_s/iq1_m/iq2_*/iq3_xxs/iq3_xs")
    c.add_argument("--no-mtp", action="store_true", help="drop multi-token-prediction layers (llama.cpp's --no-mtp)")
    c.add_argument("--fuse-gate-up-exps", action="store_true", help="one gate+up expert tensor per layer")
    c.add_argument("--vocab", choices=("auto", "sentencepiece"), default="auto",
                   help="sentencepiece: tokenizer.model whatever the architecture's own tokenizer code reads")
    c.add_argument("--force", action="store_true", help="overwrite an existing output")
    c.add_argument("-t", "--threads", type=int, default=0, help="threads for llama.cpp's K-quantizer")
    c.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    c.set_defaults(func=_cmd_convert)

    i = sub.add_parser("inspect", help="describe a GGUF and whether it is swap-ready")
    i.add_argument("model", help=".gguf file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_cmd_inspect)

    pl = sub.add_parser("plan", help="profile this device and plan S, F, Q for a memory budget")
    pl.add_argument("model", help=".gguf: swap-ready, as downloaded, or the first shard of a split set")
    pl.add_argument("--memory-budget", default=None, help="e.g. 4GiB, 4G, 3000MiB, 75%%")
    pl.add_argument("--experts-per-layer", type=int, default=None, help="S directly (top-k <= S <= n_expert)")
    pl.add_argument("-c", "--ctx-size", type=int, default=4096, help="context length the plan is for")
    pl.add_argument("-t", "--threads", type=int, default=0, help="threads (default: half the CPUs)")
    pl.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers on the GPU")
    add_device_args(pl, placement=False)
    pl.add_argument("--vram-budget", default=None, metavar="SIZE|%",
                    help="device memory for the model (with -ngl): S is what it admits, the host budget's rest the "
                         "RAM tier")
    pl.add_argument("--ram-tier", type=ram_tier, default=None, metavar="SIZE|%|0",
                    help="host RAM for experts not in slots (default: split from the measured bandwidths)")
    pl.add_argument("-o", "--output", default=None, help="write the plan as JSON")
    pl.add_argument("--reprofile", action="store_true", help="measure again instead of using the cached profile")
    pl.add_argument("--floor", default=None, metavar="TARGET",
                    help="pick swapmoe's quality floor τ by measuring each τ here: speed:0.7 (the best quality "
                         "at >= 0.7x plain swapmoe's speed) or dropped:0.05 (the fastest τ routing at most 5 %% of "
                         "the full model's expert weight elsewhere)")
    pl.set_defaults(func=_cmd_plan)

    r = sub.add_parser("rpc-server", help="serve this machine's ggml device to llama.cpp clients (`--rpc`), "
                       "as llama.cpp's rpc-server; RPC has no authentication")
    r.add_argument("-H", "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    r.add_argument("-p", "--port", type=int, default=50052, help="port (default 50052)")
    r.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (default: half the CPUs)")
    r.add_argument("-d", "--device", default=None, help="devices to serve, comma-separated (default: the GPUs, "
                   "else the CPU)")
    r.add_argument("-c", "--cache", action="store_true",
                   help="cache tensors sent to this server in llama.cpp's cache folder ($LLAMA_CACHE/rpc)")
    r.set_defaults(func=_cmd_rpc_server)

    ch = sub.add_parser("chat", help="chat with a model under a memory budget (or one answer with -p)")
    add_model_args(ch)
    add_sampling_args(ch)
    ch.add_argument("-p", "--prompt", default=None, help="answer this prompt and exit (stdin works too)")
    ch.add_argument("-sys", "--system", default=None, help="system message")
    ch.add_argument("--raw", "-no-cnv", dest="raw", action="store_true",
                    help="complete the prompt as plain text, no chat template; print only the generated text")
    ch.set_defaults(func=_cmd_chat)

    sv = sub.add_parser("serve", help="llama-server-compatible HTTP API under a memory budget")
    add_model_args(sv)
    add_sampling_args(sv)
    add_server_args(sv)
    sv.set_defaults(func=_cmd_serve)

    ev = sub.add_parser("eval", help="perplexity, KL and top-1 agreement against the full model")
    ev.add_argument("-m", "--model", default=None, help=".gguf, swap-ready or as downloaded (default: the embedded default model)")
    ev.add_argument("--text", action="append", default=None,
                    help="plain-text file to evaluate on; repeat for a mixed-domain request stream, one domain per "
                    "file (default: the embedded model's held-out text of each of its four domains)")
    ev.add_argument("--switch-every", type=int, default=SWITCH_EVERY,
                    help="a mixed stream changes domain every this many requests (chunks)")
    ev.add_argument("--policy", action="append", choices=("swapmoe", "static", "exact", "full"),
                    help="policy to evaluate (repeatable; default swapmoe and static); full is the reference")
    ev.add_argument("--memory-budget", default=None)
    ev.add_argument("--max-dropped-mass", type=dropped_mass, action="append", metavar="TAU",
                    help="also evaluate swapmoe with this quality floor (repeatable: one row each)")
    ev.add_argument("--experts-per-layer", type=int, default=None)
    ev.add_argument("-c", "--ctx-size", type=int, default=256, help="tokens per chunk (one request)")
    ev.add_argument("--chunks", type=int, default=16)
    ev.add_argument("-t", "--threads", type=int, default=0)
    ev.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers offloaded to the devices")
    add_device_args(ev)
    ev.set_defaults(func=_cmd_eval)

    b = sub.add_parser("bench", help="full/static/exact/swapmoe side by side: speed, memory and quality")
    b.add_argument("-m", "--model", default=None,
                   help="swap-ready .gguf for speed, memory and quality (default: the bench model, the embedded "
                        "default model with its experts widened by zeros to 4.8 MiB each, built in the cache)")
    b.add_argument("--quality-model", default=None, help="another model for quality (default: the -m model)")
    b.add_argument("--worst-case", action=argparse.BooleanOptionalAction, default=None,
                   help="also the speed cells on a 2.4 GiB synthetic model of random routing, the worst case "
                        "(default: on; off with --quick)")
    b.add_argument("--text", default=None, help="text for quality (default: the default model's held-out mixed-domain stream)")
    b.add_argument("--budgets", default=None, help="percentages: the share of each layer's experts resident (default 100,75,50,25)")
    b.add_argument("-n", "--n-predict", type=int, default=None, help="tokens decoded per measured request")
    b.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    b.add_argument("--chunks", type=int, default=None, help="evaluation chunks for quality (default 12)")
    b.add_argument("-t", "--threads", type=int, default=None)
    b.add_argument("--types", default=None, help="quant types for the stock-speed rows, `full` vs plain "
                   "llama-cpp-python (default q4_k_m; '' for none)")
    b.add_argument("--floors", default=None, help="swapmoe quality floors (--max-dropped-mass) measured beside "
                   "plain swapmoe at each budget (default 0.3; '' for none)")
    b.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="speed cells: layers on the devices")
    add_device_args(b)
    b.add_argument("-o", "--output", default=None, help="directory for bench.md, bench.json, bench.png")
    b.add_argument("--quick", action="store_true", help="a small bench model, 2 budgets, 1 round, no worst case: a smoke run")
    b.add_argument("--scale", action="store_true",
                   help="bigger than RAM: a 48-layer, ~29 GiB synthetic MoE (written once into the cache, free disk "
                        "checked first): stock llama-cpp-python (mmap) vs exact, swapmoe, static at --scale-budget")
    b.add_argument("--scale-budget", default="8GiB", help="the memory budget of the --scale run (default 8GiB)")
    b.set_defaults(func=_cmd_bench)

    d = sub.add_parser("demo", help="the embedded multi-domain model (converted once): full, swapmoe and static "
                       "(pruned) on the same prompts under one memory budget, and their quality on a held-out "
                       "mixed-domain request stream")
    d.add_argument("--memory-budget", default=None,
                   help="bytes (e.g. 120MiB) or %% of what `full` needs (default: half of the experts resident)")
    d.add_argument("--dir", default=None, help="work directory (default: user cache)")
    d.add_argument("--force", action="store_true", help="rebuild even if cached")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(argv)
        logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(a.verbose, 2)],
                            format="swapmoe: %(levelname)s: %(message)s")
        if a.command is None:
            build_parser().print_help()
            return 2
        func: Callable[[argparse.Namespace], int] = a.func
        return func(a)
    except SwapMoEError as e:
        print(f"swapmoe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("swapmoe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
