"""Output types: which ggml type each tensor gets, and the encoders.

F32/F16/BF16/Q8_0/Q4_0 are encoded here with gguf-py's numpy quantizers while streaming. K-quants
(Q4_K_M, Q5_K_M, Q6_K) go through llama.cpp's own quantizer (`llama_model_quantize`), which picks
its per-tensor mixture; the converter then re-lays the result out (see `convert.py`).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, LlamaFileType as FT, quants

from ..base.errors import QuantError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutType:
    name: str
    ftype: FT            # recorded as general.file_type
    base: Q              # type of the large 2D weights when encoded here
    kquant: bool = False  # True: encode at `base` (F16), then llama.cpp quantizes to `ftype`
    builtin: bool = True  # the hand-written converter writes it too (else only through llama.cpp's classes)
    needs_imatrix: bool = False  # llama.cpp's quantizer refuses it without an importance matrix


OUT_TYPES: dict[str, OutType] = {t.name: t for t in (
    OutType("f32", FT.ALL_F32, Q.F32),
    OutType("f16", FT.MOSTLY_F16, Q.F16),
    OutType("bf16", FT.MOSTLY_BF16, Q.BF16),
    OutType("q8_0", FT.MOSTLY_Q8_0, Q.Q8_0),
    OutType("q4_0", FT.MOSTLY_Q4_0, Q.Q4_0),
    OutType("q4_k_m", FT.MOSTLY_Q4_K_M, Q.F16, kquant=True),
    OutType("q5_k_m", FT.MOSTLY_Q5_K_M, Q.F16, kquant=True),
    OutType("q6_k", FT.MOSTLY_Q6_K, Q.F16, kquant=True),
    OutType("iq4_nl", FT.MOSTLY_IQ4_NL, Q.F16, kquant=True),  # llama.cpp's quantizer; no importance matrix needed
    # more of llama-quantize's names (those that need no importance matrix), through its quantizer
    *(OutType(n, ft, Q.F16, kquant=True, builtin=False) for n, ft in (
        ("q4_1", FT.MOSTLY_Q4_1), ("q5_0", FT.MOSTLY_Q5_0), ("q5_1", FT.MOSTLY_Q5_1), ("q2_k", FT.MOSTLY_Q2_K),
        ("q3_k_s", FT.MOSTLY_Q3_K_S), ("q3_k_m", FT.MOSTLY_Q3_K_M), ("q3_k_l", FT.MOSTLY_Q3_K_L),
        ("q4_k_s", FT.MOSTLY_Q4_K_S), ("q5_k_s", FT.MOSTLY_Q5_K_S), ("iq4_xs", FT.MOSTLY_IQ4_XS),
        ("q2_k_s", FT.MOSTLY_Q2_K_S), ("iq3_s", FT.MOSTLY_IQ3_S), ("iq3_m", FT.MOSTLY_IQ3_M))),
    # those that need one (--imatrix)
    *(OutType(n, ft, Q.F16, kquant=True, builtin=False, needs_imatrix=True) for n, ft in (
        ("iq1_s", FT.MOSTLY_IQ1_S), ("iq1_m", FT.MOSTLY_IQ1_M), ("iq2_xxs", FT.MOSTLY_IQ2_XXS),
        ("iq2_xs", FT.MOSTLY_IQ2_XS), ("iq2_s", FT.MOSTLY_IQ2_S), ("iq2_m", FT.MOSTLY_IQ2_M),
        ("iq3_xxs", FT.MOSTLY_IQ3_XXS), ("iq3_xs", FT.MOSTLY_IQ3_XS))),
)}


def out_type(name: str) -> OutType:
    try:
        return OUT_TYPES[name.lower()]
    except KeyError:
        raise QuantError(f"unknown --type {name!r}; expected one of {', '.join(OUT_TYPES)}") from None


def tensor_type(gguf_name: str, shape: tuple[int, ...], out: OutType) -> Q:
    """ggml type of one output tensor (shape in numpy order, innermost last)."""
    # Norms, biases, scales and routers stay F32: tiny, and the scheduler reads the router in numpy.
    if len(shape) == 1 or not gguf_name.endswith(".weight") or ".ffn_gate_inp" in gguf_name:
        return Q.F32
    qtype = out.base
    # Keep embeddings and the output head at 8 bits when the body goes to 4 (as llama-quantize does).
    if qtype == Q.Q4_0 and gguf_name in ("token_embd.weight", "output.weight"):
        qtype = Q.Q8_0
    block, _ = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        log.info("%s: row of %d is not a multiple of %d, keeping F16", gguf_name, shape[-1], block)
        return Q.F16
    return qtype


def nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    if n % block:
        raise QuantError(f"{n} elements are not a multiple of the {qtype.name} block of {block}")
    return n // block * size


def encode(data: np.ndarray, qtype: Q) -> np.ndarray:
    """Encode float data (any float dtype) as `qtype`; returns the bytes to write as an array."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    try:
        return quants.quantize(data, qtype)
    except quants.QuantError as e:  # pragma: no cover - only for types gguf-py cannot encode
        raise QuantError(f"cannot encode {qtype.name} in numpy: {e}") from None


def llama_quantize(src: Path, dst: Path, out: OutType, threads: int = 0, imatrix: Path | None = None) -> None:
    """Quantize a GGUF with llama.cpp's quantizer (K-quant mixtures), with an importance matrix if given."""
    import llama_cpp  # heavy import: only when a K-quant is asked for

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(out.ftype)
    params.nthread = threads
    keep: list = []
    if imatrix is not None:
        from .imatrix import imatrix_param, load_imatrix

        params.imatrix, keep = imatrix_param(load_imatrix(imatrix))
    # llama.cpp reports every tensor (and each K-quant fallback) on stderr; keep it for -v.
    with tempfile.TemporaryFile() as cap:
        saved = os.dup(2)
        os.dup2(cap.fileno(), 2)
        try:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        cap.seek(0)
        text = cap.read().decode("utf-8", "replace")
    fallbacks = sum("falling back" in line for line in text.splitlines())
    log.info("llama.cpp quantizer output:\n%s", text)
    if fallbacks:
        log.info("%d tensor(s) had rows not divisible by 256 and got llama.cpp's fallback type", fallbacks)
    if rc != 0:
        raise QuantError(f"llama.cpp's quantizer failed on {src} for --type {out.name} (return code {rc})")
    del keep  # the importance matrix arrays lived until llama.cpp returned
