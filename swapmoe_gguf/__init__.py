"""swapmoe-gguf: SwapMoE (Kong et al., ACL 2024) on llama.cpp GGUF models.

One subpackage per layer; data flows one way, and each layer imports only those below it (its
`__init__` says which; tests/test_architecture.py checks it):

    base         errors, atomic outputs, cache paths
    fileformat   GGUF metadata, split sets, norms                  (HF checkpoint or GGUF
    converters   -> swap-ready GGUF                                  -> converters -> file)
    store        one expert's bytes from disk
    llamacpp     slot model, router tap, routing spec, out-of-graph expert kernels
    residency    scheduler (Eq. 1), policies, budgets, telemetry
    planning     device profile, planner, calibration cache, floor tuning
    runtime      SwapMoELlama: where they meet
    serving      settings, streaming generator, engine, server/
    commands     cli, chat, demo, eval, bench, inspect

`from swapmoe_gguf import SwapMoELlama` loads the runtime (and llama.cpp) on first use.
"""
import os
from typing import Any

__version__ = "0.1.0"

# llama.cpp's CPU backend runs each graph in an OpenMP region; after it, libgomp's idle workers spin
# (300k iterations by default). With llama.cpp on every core the expert store's read thread can then
# starve: on 2 cores with 2 threads, the process at raised priority (nice -15), 1 of 25 requested swaps
# landed over 256 decode steps (3 runs; the scheduler silently became `static`); at normal priority
# 65-74 of 74-81. With 1000 spins: 73-80 of 74-82 either way, and the step as fast (within this VM's
# noise). OMP_WAIT_POLICY=passive also frees the reads but made each step 12x slower here. Set before
# llama.cpp is loaded (libgomp reads it once); a value the user set wins; importing llama_cpp before
# swapmoe_gguf leaves libgomp's default.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")


def __getattr__(name: str) -> Any:
    if name == "SwapMoELlama":  # lazily: the lower layers (converters, file format) need no llama.cpp
        from .runtime import SwapMoELlama

        return SwapMoELlama
    raise AttributeError(f"module 'swapmoe_gguf' has no attribute {name!r}")
