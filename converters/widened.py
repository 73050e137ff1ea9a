"""The bench model: the trained default model with its experts widened by zeros to real expert sizes.

Quality needs trained routing, speed needs real expert bytes; this gives one model with both. Each
expert's FFN width goes from n_ff to `width`: gate and up get `width - n_ff` rows of zeros, down
gets as many columns of zeros. The extra hidden units are silu(0) * 0 = 0 and their down columns
add 0, so the output is the trained model's; attention, norms, router and embeddings are copied
unchanged (re-encoded at the output type), so the routing is the trained one. The expert norms
(`swapmoe.expert_norms`) are the source's: zeros add nothing to a Frobenius norm.

At Q8_0 the zero padding is whole zero blocks (d = 0, q = 0) appended to each row's real blocks,
so the non-zero blocks are exactly a Q8_0 encoding of the unwidened model (K-quants would need
rows that are multiples of 256; the hidden size of 192 is not). Padding is appended to the
encoded rows rather than encoded, so a 1 GiB model is written in seconds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFValueType

from ..base.atomic import atomic_output
from ..base.errors import ConvertError
from ..fileformat.constants import PAGE_ALIGNMENT, SwapKeys
from ..fileformat.info import GGUFInfo, dequantize
from ..fileformat.reader import read_gguf
from .layout import add_expert_keys, add_layout_keys, moe_layers_of
from .quant import OutType, encode, nbytes, out_type, tensor_type
from .writer import PlannedTensor, SwapReadyWriter

WIDENED_VERSION = 1  # part of cached file names: bump when the written bytes change
WIDEN_TYPES = ("f16", "q8_0")
# Keys the widened file sets itself.
_OWN = {"general.alignment", "general.architecture", "general.name", "general.file_type", SwapKeys.FORMAT_VERSION,
        SwapKeys.ALIGNMENT, SwapKeys.SLICES_ALIGNED, SwapKeys.MOE_LAYERS, SwapKeys.EXPERT_COUNT,
        SwapKeys.EXPERT_NORMS, SwapKeys.SOURCE}
WIDENED_KEY = "swapmoe.widened"  # str: "<source n_ff> -> <width>", marks a zero-padded bench model


def expert_width(info: GGUFInfo) -> int:
    """The experts' FFN width n_ff (rows of ffn_gate_exps)."""
    gate = next((t for t in info.tensors if t.is_expert and "ffn_gate_exps" in t.name), None)
    if gate is None:
        raise ConvertError(f"{info.path}: no ffn_gate_exps tensor; only gate/up/down experts can be widened")
    return gate.shape[1]


def expert_bytes(n_embd: int, width: int, type_name: str) -> int:
    """Bytes of one widened expert (gate, up and down)."""
    return 3 * nbytes((width, n_embd), out_type(type_name).base)


def check_width(info: GGUFInfo, width: int, type_name: str) -> OutType:
    out = out_type(type_name)
    if out.name not in WIDEN_TYPES:
        raise ConvertError(f"widened model: type {type_name!r} is not supported; expected one of {', '.join(WIDEN_TYPES)}")
    n_ff, n_embd = expert_width(info), info.params.n_embd
    block = GGML_QUANT_SIZES[out.base][0]
    if n_ff % block or n_embd % block:
        raise ConvertError(f"{info.path}: n_ff {n_ff} and n_embd {n_embd} must be multiples of {block} for {out.name}")
    slice_bytes = nbytes((width, n_embd), out.base)
    if width < n_ff or width % block or slice_bytes % PAGE_ALIGNMENT:
        step = next(w for w in range(block, 1 << 20, block) if nbytes((w, n_embd), out.base) % PAGE_ALIGNMENT == 0)
        raise ConvertError(f"widened model: width {width} must be >= the experts' {n_ff} and a multiple of {step} "
                           f"(page-aligned {out.name} expert slices)")
    return out


def _copy_kv(info: GGUFInfo, w: SwapReadyWriter, overrides: dict[str, tuple[object, GGUFValueType]]) -> None:
    for key, fld in info.reader.fields.items():
        if key.startswith("GGUF.") or key in _OWN or key in overrides:
            continue
        vtype = fld.types[0]
        if vtype == GGUFValueType.ARRAY:
            w.gw.add_key_value(key, info.get(key), vtype, fld.types[-1] if len(fld.types) > 1 else GGUFValueType.INT32)
        else:
            w.gw.add_key_value(key, info.get(key), vtype)
    for key, (value, vtype) in overrides.items():
        w.gw.add_key_value(key, value, vtype)


def _pad_rows(enc: np.ndarray, rows: int, pad_rows: int, pad_cols_bytes: int) -> np.ndarray:
    """Encoded [rows, row_bytes] data with zero rows appended and each row padded with zero bytes."""
    b = enc.view(np.uint8).reshape(rows, -1)
    return np.pad(b, ((0, pad_rows), (0, pad_cols_bytes)))


def widen(src: str | Path, dst: str | Path, width: int, type_name: str = "q8_0", *, force: bool = False,
          progress: bool | None = None) -> Path:
    """Write `src` (a swap-ready F16/F32 GGUF with gate/up/down experts) with experts of FFN `width`."""
    src, dst = Path(src), Path(dst)
    info = read_gguf(src)
    if info.layout_problem() or info.expert_norms is None:
        raise ConvertError(f"{src}: not a swap-ready GGUF with expert norms ({info.layout_problem() or 'no norms'})")
    out = check_width(info, width, type_name)
    n_ff, n_embd = expert_width(info), info.params.n_embd
    block, block_bytes = GGML_QUANT_SIZES[out.base]
    with atomic_output(dst, force) as tmp:
        w = SwapReadyWriter(tmp, info.arch, PAGE_ALIGNMENT)
        w.gw.add_name(f"{info.get('general.name', src.stem)}-w{width}")
        w.gw.add_file_type(int(out.ftype))
        _copy_kv(info, w, {f"{info.arch}.feed_forward_length": (width, GGUFValueType.UINT32),
                           WIDENED_KEY: (f"{n_ff} -> {width}", GGUFValueType.STRING)})
        fd = open(src, "rb")
        try:
            for t in info.tensors:
                w.add(_planned(t, fd, out, n_ff, width, n_embd, block, block_bytes))
            add_layout_keys(w)
            add_expert_keys(w, moe_layers_of(w.tensors), info.n_expert, f"widened:{src.name}", info.expert_norms)
            w.write(progress)
        finally:
            fd.close()
    return dst


def _read(fd, offset: int, n: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    fd.seek(offset)
    buf = np.frombuffer(fd.read(n), dtype=np.uint8)
    if buf.size != n:
        raise ConvertError(f"short read of {n} bytes at offset {offset} (file truncated?)")
    return buf


def _planned(t, fd, out: OutType, n_ff: int, width: int, n_embd: int, block: int,  # type: ignore[no-untyped-def]
             block_bytes: int) -> PlannedTensor:
    if not t.is_expert:
        qtype = tensor_type(t.name, t.shape, out)

        def produce_dense() -> Iterator[np.ndarray]:
            yield encode(dequantize(_read(fd, t.offset, t.nbytes), t.qtype, t.shape), qtype)
        return PlannedTensor(t.name, t.shape, qtype, nbytes(t.shape, qtype), produce_dense)

    down = "ffn_down_exps" in t.name
    if not down and "ffn_gate_exps" not in t.name and "ffn_up_exps" not in t.name:
        raise ConvertError(f"{t.name}: an expert tensor that is not gate/up/down cannot be widened")
    if t.shape[1:] != ((n_embd, n_ff) if down else (n_ff, n_embd)):
        raise ConvertError(f"{t.name}: per-expert shape {list(t.shape[1:])}, expected "
                           f"{[n_embd, n_ff] if down else [n_ff, n_embd]}")
    shape = (t.n_expert, n_embd, width) if down else (t.n_expert, width, n_embd)
    qtype = out.base
    step = t.expert_nbytes

    def produce() -> Iterator[np.ndarray]:
        for e in range(t.n_expert):
            x = dequantize(_read(fd, t.offset + e * step, step), t.qtype, t.shape[1:])  # [rows, cols]
            enc = encode(x, qtype)
            if down:   # [n_embd, n_ff] -> [n_embd, width]: zero columns (whole zero blocks) after each row
                yield _pad_rows(enc, n_embd, 0, (width - n_ff) // block * block_bytes)
            else:      # [n_ff, n_embd] -> [width, n_embd]: zero rows
                yield _pad_rows(enc, n_ff, width - n_ff, 0)
    return PlannedTensor(t.name, shape, qtype, nbytes(shape, qtype), produce, n_expert=t.n_expert)
