"""Hugging Face checkpoint -> swap-ready GGUF through llama.cpp's own converter classes.

Every architecture `convert_hf_to_gguf.py` knows converts here, with its own tensor names,
hyper-parameters, permutes, expert merging and tokenizer code (`llamacpp_source.py` fetches it);
`llamacpp_child.py` runs it in a child process with our writer in place of its `GGUFWriter`
(`llamacpp_writer.py`), so tensors stream straight into the swap-ready file: no full-size GGUF in
between for f32/f16/bf16/q8_0 (the types llama.cpp's converter encodes itself, byte for byte as it
does). Other types (K-quants, q4_0, ...) go through llama.cpp's quantizer, which reads a GGUF: the
child writes an F16 intermediate, `llama_model_quantize` quantizes it, and `relayout` lays it out.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import ConvertError
from ..fileformat.reader import read_gguf
from .llamacpp_source import converter_dir
from .quant import OutType

log = logging.getLogger(__name__)

# Types llama.cpp's converter writes itself (`--outtype`); others go through its quantizer.
NATIVE = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class LlamaCppOptions:
    """Options of `convert_hf_to_gguf.py` that change the output, passed through."""

    no_mtp: bool = False             # --no-mtp: drop multi-token-prediction layers
    fuse_gate_up_exps: bool = False  # --fuse-gate-up-exps
    vocab: str = "auto"              # "sentencepiece": tokenizer.model whatever the class would read


def run_child(src: Path, dst: Path, outtype: str, opts: LlamaCppOptions, *, intermediate: bool,
              progress: bool | None) -> None:
    """llama.cpp's converter classes write `dst` (swap-ready unless `intermediate`)."""
    conv = converter_dir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NO_LOCAL_GGUF")}
    env["PYTHONPATH"] = os.pathsep.join([str(conv / "gguf-py"), str(conv)])
    with tempfile.NamedTemporaryFile(prefix="swapmoe-convert-", suffix=".err", delete=False) as ef:
        errfile = Path(ef.name)
    cmd = [sys.executable, "-m", "swapmoe_gguf.converters.llamacpp_child", str(conv), str(src), str(dst), outtype,
           str(errfile)]
    cmd += ["--intermediate"] * intermediate + ["--no-mtp"] * opts.no_mtp
    cmd += ["--fuse-gate-up-exps"] * opts.fuse_gate_up_exps + ["--vocab", opts.vocab]
    cmd += ["--progress"] * bool(progress if progress is not None else sys.stderr.isatty())
    level = logging.getLogger().getEffectiveLevel()
    cmd += ["-v"] * (2 if level <= logging.DEBUG else 1 if level <= logging.INFO else 0)
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        err = errfile.read_text().strip() if errfile.stat().st_size else ""
    finally:
        errfile.unlink(missing_ok=True)
    if proc.returncode != 0 or not dst.is_file():
        if not err:
            err = f"{src}: llama.cpp's converter exited with status {proc.returncode}" + (
                f" (signal {-proc.returncode}; out of memory?)" if proc.returncode < 0 else "")
        raise ConvertError(err)
    log.debug("child: %s", proc.stdout.strip())


def convert_llamacpp(src: Path, tmp: Path, out: OutType, opts: LlamaCppOptions, progress: bool | None,
                     threads: int, imatrix: Path | None = None) -> tuple[str, bool]:
    """Write the swap-ready file to `tmp`; returns (llama.cpp architecture, expert slices page-aligned)."""
    if out.name in NATIVE:
        run_child(src, tmp, out.name, opts, intermediate=False, progress=progress)
    else:
        from .quant import llama_quantize
        from .relayout import relayout

        f16 = tmp.with_name(tmp.name + ".f16")
        quant = tmp.with_name(tmp.name + ".quant")
        try:
            run_child(src, f16, "f16", opts, intermediate=True, progress=progress)
            llama_quantize(f16, quant, out, threads, imatrix)
            f16.unlink()
            relayout(quant, tmp, read_gguf(quant), progress)
        finally:
            f16.unlink(missing_ok=True)
            quant.unlink(missing_ok=True)
    info = read_gguf(tmp)
    return info.arch, info.slices_aligned
