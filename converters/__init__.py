"""Conversion to the swap-ready GGUF layout (installed as `swapmoe_gguf.converters`).

    convert("hf_dir/", "model.gguf", "q8_0")      # Hugging Face checkpoint
    convert("downloaded.gguf", "model.gguf")      # re-layout, bytes unchanged
    convert("hf_dir/", "model.gguf", "q4_k_m", engine="llamacpp")  # llama.cpp's converter classes

May import: base, fileformat.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..base.atomic import atomic_output
from ..base.errors import ConvertError
from ..fileformat.constants import DEFAULT_ALIGNMENT, PAGE_ALIGNMENT
from ..fileformat.reader import read_gguf
from .quant import out_type

if TYPE_CHECKING:
    from .llamacpp_hf import LlamaCppOptions

log = logging.getLogger(__name__)

__all__ = ["convert", "ConvertResult", "ENGINES"]


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


ENGINES = ("auto", "llamacpp", "builtin")


def convert(src: str | Path, dst: str | Path, type_name: str | None = None, *, force: bool = False,
            progress: bool | None = None, threads: int = 0, engine: str = "auto",
            llamacpp: "LlamaCppOptions | None" = None, imatrix: str | Path | None = None) -> ConvertResult:
    """`engine` (Hugging Face checkpoints): "llamacpp" runs llama.cpp's own converter classes (every
    architecture it knows), "builtin" the hand-written ones of `archs.py` (5 architectures, no torch,
    no network), "auto" the built-in ones where they apply, llama.cpp's otherwise. `imatrix`: llama.cpp's
    importance matrix file, for the types its quantizer makes (not f32/f16/bf16/q8_0)."""
    src, dst = Path(src), Path(dst)
    t0 = time.perf_counter()
    if engine not in ENGINES:
        raise ConvertError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    if src.is_dir():
        out = out_type(type_name or "f16")
        if imatrix is not None:
            if out.name in ("f32", "f16", "bf16", "q8_0"):
                raise ConvertError(f"--imatrix applies to the types llama.cpp's quantizer makes, not {out.name}")
            from .imatrix import load_imatrix

            load_imatrix(Path(imatrix))  # a bad file is refused before the conversion, not after it
        elif out.needs_imatrix:
            raise ConvertError(f"--type {out.name} needs an importance matrix (--imatrix FILE, from llama-imatrix)")
        if _use_llamacpp(src, engine, llamacpp, out.name) or (imatrix is not None and not out.kquant):
            if engine == "builtin":
                raise ConvertError(f"--engine builtin cannot use --imatrix with --type {out.name}")
            return _convert_llamacpp(src, dst, out.name, force, progress, threads, llamacpp, t0, imatrix)
        return _convert_hf(src, dst, out.name, force, progress, threads, t0, imatrix)
    if src.is_file():
        if type_name is not None:
            raise ConvertError(f"{src}: --type applies to Hugging Face checkpoints; a GGUF is re-laid out "
                               "with its tensors unchanged (requantize it with llama-quantize first)")
        return _convert_gguf(src, dst, force, progress, t0)
    raise ConvertError(f"{src}: no such file or directory")


def _use_llamacpp(src: Path, engine: str, opts: "LlamaCppOptions | None", type_name: str) -> bool:
    """Whether llama.cpp's converter classes convert this checkpoint (see `convert`)."""
    if engine != "auto":
        return engine == "llamacpp"
    from . import archs as _archs  # noqa: F401  (registers the built-in architectures)
    from .registry import HFConfig, supported

    names = HFConfig.load(src).get("architectures")
    if not names or not isinstance(names, list):
        return False  # the built-in path says what is wrong with config.json
    builtin = any(n in supported() for n in names)
    return not builtin or (opts is not None and opts != type(opts)()) or not out_type(type_name).builtin


def _convert_llamacpp(src: Path, dst: Path, type_name: str, force: bool, progress: bool | None, threads: int,
                      opts: "LlamaCppOptions | None", t0: float, imatrix: str | Path | None = None) -> ConvertResult:
    from .llamacpp_hf import LlamaCppOptions, convert_llamacpp

    out = out_type(type_name)
    if not (src / "config.json").is_file():
        raise ConvertError(f"{src / 'config.json'}: missing (not a Hugging Face checkpoint directory?)")
    with atomic_output(dst, force) as tmp:
        arch, aligned = convert_llamacpp(src, tmp, out, opts or LlamaCppOptions(), progress, threads,
                                         Path(imatrix) if imatrix is not None else None)
        note = None if aligned else read_gguf(tmp).unaligned_reason()
        size = tmp.stat().st_size
    if note:
        log.warning("%s", note)
    return ConvertResult(dst, "hf", arch, time.perf_counter() - t0, size, aligned, note)


def _convert_hf(src: Path, dst: Path, type_name: str, force: bool, progress: bool | None, threads: int,
                t0: float, imatrix: str | Path | None = None) -> ConvertResult:
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
                llama_quantize(f16, quant, out, threads, Path(imatrix) if imatrix is not None else None)
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

