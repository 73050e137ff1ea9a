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
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "SwapMoELlama":  # lazily: the lower layers (converters, file format) need no llama.cpp
        from .runtime import SwapMoELlama

        return SwapMoELlama
    raise AttributeError(f"module 'swapmoe_gguf' has no attribute {name!r}")
