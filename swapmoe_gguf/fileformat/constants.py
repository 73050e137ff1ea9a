"""GGUF key names and layout constants of the swap-ready format, in one place.

Standard llama.cpp keys come from gguf-py's `gguf.Keys`; this module only adds the
`swapmoe.*` namespace written by the converter and read by inspect and the runtime.
"""
from __future__ import annotations

FORMAT_VERSION = 1

# Expert slices start on this boundary (the common page size; also a multiple of
# every larger page size's divisors we care about: 4 KiB pages on x86-64 and arm64 Linux).
PAGE_ALIGNMENT = 4096

# Alignment llama.cpp's own writer and quantizer use; intermediate files keep it.
DEFAULT_ALIGNMENT = 32

# Stacked expert tensors are named `blk.N.<kind>_exps.<suffix>`; this marks them.
EXPERT_TENSOR_MARK = "_exps."


class SwapKeys:
    """`swapmoe.*` metadata keys."""

    FORMAT_VERSION = "swapmoe.format_version"          # u32
    ALIGNMENT = "swapmoe.alignment"                    # u32: page size the slices were laid out for
    SLICES_ALIGNED = "swapmoe.expert_slices_aligned"   # bool: every expert slice starts on a page
    MOE_LAYERS = "swapmoe.moe_layers"                  # [i32]: block indices that have routed experts
    EXPERT_COUNT = "swapmoe.expert_count"              # u32: routed experts per MoE layer
    # [f32] n_moe_layers * n_expert, row-major by (moe layer, expert): ||E_i||, the Frobenius
    # norm of expert i's weights (gate, up, down together), used by the importance score (Eq. 1).
    EXPERT_NORMS = "swapmoe.expert_norms"
    SOURCE = "swapmoe.source"                          # str: "hf:<HF architecture>" or "gguf"


# Conversion output types accepted by `--type`, mapped to llama.cpp file types.
OUTPUT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "iq4_nl")
