"""The `swapmoe.*` metadata shared by both conversion paths: layout flags and expert norms."""
from __future__ import annotations

import numpy as np
from gguf import GGUFValueType

from ..fileformat.constants import FORMAT_VERSION, PAGE_ALIGNMENT, SwapKeys
from ..fileformat.info import block_of
from .writer import PlannedTensor, SwapReadyWriter


def moe_layers_of(tensors: list[PlannedTensor]) -> list[int]:
    return sorted({b for t in tensors if t.is_expert and (b := block_of(t.name)) is not None})


def add_expert_keys(w: SwapReadyWriter, moe_layers: list[int], n_expert: int, source: str,
                    norms: np.ndarray | None) -> None:
    """Keys both the final file and K-quant intermediates carry. Without `norms`, a zero array
    is reserved for `SwapReadyWriter.patch` to fill once the experts have been streamed."""
    gw = w.gw
    gw.add_key_value(SwapKeys.MOE_LAYERS, moe_layers, GGUFValueType.ARRAY, GGUFValueType.INT32)
    gw.add_uint32(SwapKeys.EXPERT_COUNT, n_expert)
    gw.add_string(SwapKeys.SOURCE, source)
    if norms is None:
        w.reserve_f32_array(SwapKeys.EXPERT_NORMS, len(moe_layers) * n_expert)
    else:
        gw.add_key_value(SwapKeys.EXPERT_NORMS, [float(x) for x in norms.ravel()], GGUFValueType.ARRAY,
                         GGUFValueType.FLOAT32)


def add_layout_keys(w: SwapReadyWriter) -> bool:
    """Layout keys of a final swap-ready file; returns whether every expert slice is page-aligned."""
    aligned = all(t.expert_nbytes % PAGE_ALIGNMENT == 0 for t in w.tensors if t.is_expert)
    w.gw.add_uint32(SwapKeys.FORMAT_VERSION, FORMAT_VERSION)
    w.gw.add_uint32(SwapKeys.ALIGNMENT, w.alignment)
    w.gw.add_bool(SwapKeys.SLICES_ALIGNED, aligned and w.alignment % PAGE_ALIGNMENT == 0)
    return aligned

