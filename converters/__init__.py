"""Conversion to the swap-ready GGUF layout (installed as `swapmoe_gguf.converters`).

    convert("hf_dir/", "model.gguf", "q8_0")      # Hugging Face checkpoint
    convert("downloaded.gguf", "model.gguf")      # re-layout, bytes unchanged

May import: base, fileformat.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..base.atomic import atomic_output
from ..base.errors import ConvertError
from ..fileformat.constants import DEFAULT_ALIGNMENT, PAGE_ALIGNMENT
from ..fileformat.reader import read_gguf
from .quant import out_type

log = logging.getLogger(__name__)

__all__ = ["convert", "ConvertResult"]


@dataclass(frozen=True)
class ConvertResult:
    output: Path
    source_kind: str          # "hf" or "gguf"
    arch: str
    seconds: float
    bytes_written: int
    slices_aligned: bool
    note: str | None = None   # why slices are not page-aligned, or "already swap-ready"
    written: bool = True


def convert(src: str | Path, dst: str | Path, type_name: str | None = None, *, force: bool = False,
            progress: bool | None = None, threads: int = 0) -> ConvertResult:
    src, dst = Path(src), Path(dst)
    t0 = time.perf_counter()
    if src.is_dir():
        return _convert_hf(src, dst, type_name or "f16", force, progress, threads, t0)
    if src.is_file():
        if type_name is not None:
            raise ConvertError(f"{src}: --type applies to Hugging Face checkpoints; a GGUF is re-laid out "
                               "with its tensors unchanged (requantize it with llama-quantize first)")
        return _convert_gguf(src, dst, force, progress, t0)
    raise ConvertError(f"{src}: no such file or directory")


def _convert_hf(src: Path, dst: Path, type_name: str, force: bool, progress: bool | None, threads: int,
                t0: float) -> ConvertResult:
    from .hf import plan_hf, write_hf
    from .quant import llama_quantize
    from .relayout import relayout

    out = out_type(type_name)
    plan = plan_hf(src, out)
    try:
        with atomic_output(dst, force) as tmp:
            if out.kquant:
                # llama.cpp's quantizer pads to 32 bytes whatever general.alignment says, so it gets
                # an unaligned F16 file and the result is re-laid out afterwards.
                f16 = tmp.with_name(tmp.name + ".f16")
                quant = tmp.with_name(tmp.name + ".quant")
                write_hf(plan, f16, out, DEFAULT_ALIGNMENT, final=False, progress=progress)
                llama_quantize(f16, quant, out, threads)
                f16.unlink()
                aligned = relayout(quant, tmp, read_gguf(quant), progress)
                info = read_gguf(tmp)
            else:
                aligned = bool(write_hf(plan, tmp, out, PAGE_ALIGNMENT, final=True, progress=progress))
                info = read_gguf(tmp)
            note = None if aligned else info.unaligned_reason()
            size = tmp.stat().st_size
    finally:
        plan.ckpt.close()
    if note:
        log.warning("%s", note)
    return ConvertResult(dst, "hf", plan.arch.arch_name, time.perf_counter() - t0, size, aligned, note)


def _convert_gguf(src: Path, dst: Path, force: bool, progress: bool | None, t0: float) -> ConvertResult:
    from .relayout import relayout

    info = read_gguf(src)
    if info.swap_ready and not force:
        return ConvertResult(src, "gguf", info.arch, time.perf_counter() - t0, 0, info.slices_aligned,
                             "already swap-ready; nothing written (use --force to rewrite)", written=False)
    with atomic_output(dst, force) as tmp:
        aligned = relayout(src, tmp, info, progress)
        note = None if aligned else read_gguf(tmp).unaligned_reason()
        size = tmp.stat().st_size
    if note:
        log.warning("%s", note)
    return ConvertResult(dst, "gguf", info.arch, time.perf_counter() - t0, size, aligned, note)

