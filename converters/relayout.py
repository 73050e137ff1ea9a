"""Existing llama.cpp GGUF -> swap-ready GGUF, every tensor byte unchanged.

Only the placement changes (page-aligned data, tensor order kept) and the `swapmoe.*` keys are
added. Tensor bytes are copied with `pread` in bounded chunks, so memory stays small. A split GGUF
(llama.cpp's `gguf-split` shards, read whole by `read_gguf` from its first shard) becomes one file:
tensors in shard order, the `split.*` keys dropped.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGUFValueType

from ..base.errors import LayoutError, NotMoEError
from ..fileformat.constants import PAGE_ALIGNMENT, SwapKeys
from ..fileformat.info import GGUFInfo, dequantize
from ..fileformat.info import block_of
from ..fileformat.norms import ExpertNorms, counts_for_norm
from ..fileformat.splits import SPLIT_KEYS
from .layout import add_expert_keys, add_layout_keys, moe_layers_of
from .writer import PlannedTensor, SwapReadyWriter

log = logging.getLogger(__name__)

_CHUNK = 64 << 20
# Keys the new file sets itself.
# `split.*`: a split GGUF becomes one file.
_DROP = {"general.alignment", "general.architecture", SwapKeys.FORMAT_VERSION, SwapKeys.ALIGNMENT, SwapKeys.SLICES_ALIGNED,
         SwapKeys.MOE_LAYERS, SwapKeys.EXPERT_COUNT, SwapKeys.EXPERT_NORMS, SwapKeys.SOURCE, *SPLIT_KEYS}


def _pread(fd: int, offset: int, n: int) -> np.ndarray:
    buf = np.empty(n, dtype=np.uint8)
    if n and os.preadv(fd, [buf], offset) != n:
        raise LayoutError(f"short read of {n} bytes at offset {offset} (file truncated?)")
    return buf


def _copy_kv(info: GGUFInfo, w: SwapReadyWriter) -> None:
    for key, fld in info.reader.fields.items():
        if key.startswith("GGUF.") or key in _DROP:
            continue
        vtype = fld.types[0]
        value = info.get(key)  # decoded, or a GGUFFormatError naming the key
        if vtype == GGUFValueType.ARRAY:
            sub = fld.types[-1] if len(fld.types) > 1 else GGUFValueType.INT32
            w.gw.add_key_value(key, value, vtype, sub)
        else:
            w.gw.add_key_value(key, value, vtype)


def relayout(src: Path, dst: Path, info: GGUFInfo, progress: bool | None) -> bool:
    """Write `src` with the swap-ready layout to `dst`; returns whether expert slices are page-aligned."""
    if info.n_expert < 2:
        raise NotMoEError(f"{src}: {info.arch} model without routed experts (expert_count={info.n_expert}); nothing to swap")
    w = SwapReadyWriter(dst, info.arch, PAGE_ALIGNMENT)
    _copy_kv(info, w)
    fds: list[int] = []
    try:
        for path in info.paths:  # `src` and, for a split GGUF, its other shards (TensorEntry.file)
            fds.append(os.open(path, os.O_RDONLY))
        moe = info.moe_layers
        reuse = info.expert_norms is not None
        norms = ExpertNorms(moe, info.n_expert)
        for t in info.tensors:
            n_expert = info.n_expert if t.is_expert else 0

            def produce(t=t, n_expert=n_expert) -> Iterator[np.ndarray]:
                fd = fds[t.file]
                if n_expert:
                    step = t.nbytes // n_expert
                    for e in range(n_expert):
                        raw = _pread(fd, t.offset + e * step, step)
                        if not reuse and counts_for_norm(t.name):
                            norms.add(block_of(t.name), e, dequantize(raw, t.qtype, t.shape[1:]))  # type: ignore[arg-type]
                        yield raw
                else:
                    for off in range(0, t.nbytes, _CHUNK):
                        yield _pread(fd, t.offset + off, min(_CHUNK, t.nbytes - off))

            w.add(PlannedTensor(t.name, t.shape, t.qtype, t.nbytes, produce, n_expert=n_expert))
        aligned = add_layout_keys(w)
        add_expert_keys(w, moe_layers_of(w.tensors), info.n_expert, str(info.get(SwapKeys.SOURCE, "gguf")),
                        info.expert_norms)
        w.write(progress)
        if not reuse:
            w.patch(SwapKeys.EXPERT_NORMS, norms.values())
    finally:
        for fd in fds:
            os.close(fd)
    return aligned
