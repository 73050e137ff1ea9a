"""The runtime: `SwapMoELlama`, where the layers meet (llama.py), how it enters llama-cpp-python's
`Llama` (hooks.py), where its tensors go: devices, overrides, the device budget (placement.py), and the
process-wide settings it needs (process.py).

May import: base, fileformat, store, llamacpp, residency, planning.
"""
from .llama import SwapMoELlama

__all__ = ["SwapMoELlama"]
