"""Exception classes. Each names the offending file or value, the expected and the actual.

The CLI turns any `SwapMoEError` into one line on stderr and exit code 2; anything else is a bug.
"""
from __future__ import annotations


class SwapMoEError(Exception):
    """Base class of every user-facing error (bad input, bad file, impossible request)."""


class ConvertError(SwapMoEError):
    """A checkpoint cannot be converted (missing file, unsupported architecture, bad shape)."""


class UnsupportedArchitectureError(ConvertError):
    pass


class NotMoEError(ConvertError):
    """The model has no routed experts, so there is nothing to swap."""


class CheckpointFormatError(ConvertError):
    """A safetensors file or index is malformed or truncated."""


class GGUFFormatError(SwapMoEError):
    """A GGUF file is malformed, truncated or lacks keys we need."""


class QuantError(SwapMoEError):
    """A tensor cannot be quantized to the requested type."""


class LayoutError(SwapMoEError):
    """A GGUF does not have (or cannot get) the swap-ready layout."""


class OutputExistsError(SwapMoEError):
    pass


class ContextFull(SwapMoEError):
    """llama_decode found no room in the KV cache for the batch (its return code 1)."""
