"""CPU weight repacking under Virtual Experts (ggml-cpu's `CPU_REPACK` buffer type).

Stock llama.cpp moves Q4_0, Q4_K, IQ4_NL, Q8_0 (and other) matrix weights into the CPU_REPACK buffer
type, whose `set_tensor` rearranges rows into interleaved blocks for faster kernels (2x on Q4_0 here).
`llama_model_init_from_user` turns that off, so the slot model places the same weights there itself,
with `tensor_buft_overrides` naming each tensor ggml would repack, and writes slots like this:

* ggml decides: a tensor is repacked when ggml-cpu gives a one-expert [ne0, ne1] tensor of its type a
  repack layout (`tensor->extra` after init in a CPU_REPACK buffer), as its loader does (and the ops
  are matrix products: token embeddings are looked up by row and stay plain);
* the repack buffer accepts whole-tensor writes only, so a slot is written by repacking the expert's
  raw bytes in a one-expert scratch tensor of the same type and shape in a CPU_REPACK buffer (ggml's
  own code, never a layout re-implemented here) and copying the result into the slot's byte range of
  the host buffer. ggml repacks groups of 4 or 8 consecutive rows and an expert has a multiple of that
  many rows (else no layout is chosen), so a slot's repacked bytes depend on that expert alone
  (tests/test_repack.py checks this against a whole-tensor repack for every type).

Only for a CPU-only model: GPU backends keep their own buffers (nothing changes there).
"""
from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass

import numpy as np

from .ggml import GGMLTensor, ggml, shared_lib

log = logging.getLogger(__name__)

_DEV_CPU = 0  # GGML_BACKEND_DEVICE_TYPE_CPU
# Tensors ggml uses with other ops than matrix products (stock llama.cpp keeps them plain).
_NOT_MATMUL = ("token_embd.", "per_layer_token_embd.", "pos_embd.", "token_types.")


class BuftOverride(ctypes.Structure):
    """llama.h's llama_model_tensor_buft_override (llama-cpp-python's binding names a wrong field type)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@functools.lru_cache(maxsize=1)
def repack_buft() -> int | None:
    """The CPU device's CPU_REPACK buffer type, or None where this ggml build has none."""
    g = ggml()
    lib = shared_lib(g.libdir, "libggml")
    lib.ggml_backend_dev_by_type.restype, lib.ggml_backend_dev_by_type.argtypes = ctypes.c_void_p, [ctypes.c_int]
    lib.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    lib.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    dev = lib.ggml_backend_dev_by_type(_DEV_CPU)
    if not dev:
        return None
    fn = lib.ggml_backend_reg_get_proc_address(lib.ggml_backend_dev_backend_reg(dev), b"ggml_backend_dev_get_extra_bufts")
    if not fn:
        return None
    bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)(dev)
    i = 0
    while bufts and bufts[i]:
        if g.buft_name(bufts[i]) == "CPU_REPACK":
            return int(bufts[i])
        i += 1
    return None


def _has_layout(buft: int, qtype: int, ne0: int, ne1: int) -> bool:
    """Does ggml-cpu have a repack layout for a [ne0, ne1] tensor of `qtype` on this CPU? Asked the way
    its buffer does it (init_tensor sets `extra`), on a tensor with no data."""
    g = ggml()
    ctx = g.lib.ggml_init(g.init_params(1 << 12, no_alloc=True))
    buf = g.lib.ggml_backend_buft_alloc_buffer(buft, 64)
    try:
        t = g.lib.ggml_new_tensor(ctx, qtype, 2, (ctypes.c_int64 * 2)(ne0, ne1))
        g.lib.ggml_backend_buffer_init_tensor(buf, t)  # reads type and shape only
        return bool(GGMLTensor.from_address(t).extra)
    finally:
        g.lib.ggml_backend_buffer_free(buf)
        g.lib.ggml_free(ctx)


class _Scratch:
    """One 2-D tensor [ne0, ne1] of a type in its own CPU_REPACK buffer: repacks one expert's bytes."""

    def __init__(self, buft: int, qtype: int, ne0: int, ne1: int):
        g = ggml()
        self.ctx = g.lib.ggml_init(g.init_params(1 << 12, no_alloc=True))
        ne = (ctypes.c_int64 * 2)(ne0, ne1)
        self.t = g.lib.ggml_new_tensor(self.ctx, qtype, 2, ne)
        self.nbytes = g.nbytes(self.t)
        self.buf = g.lib.ggml_backend_buft_alloc_buffer(buft, self.nbytes + 64)
        if not self.buf:
            raise MemoryError(f"cannot allocate a {self.nbytes}-byte repack scratch buffer")
        g.lib.ggml_backend_tensor_alloc(self.buf, self.t, g.lib.ggml_backend_buffer_get_base(self.buf))

    def repack(self, raw: np.ndarray) -> int:
        """Repack `raw` (one expert, plain layout); returns the address of the repacked bytes."""
        ggml().set(self.t, raw)  # whole tensor, offset 0: the repack buffer's set_tensor repacks
        return int(GGMLTensor.from_address(self.t).data)

    def close(self) -> None:
        g = ggml()
        if self.buf:
            g.lib.ggml_backend_buffer_free(self.buf)
            self.buf = None
        if self.ctx:
            g.lib.ggml_free(self.ctx)
            self.ctx = None


@dataclass(frozen=True)
class RepackPlan:
    """Which tensors the slot model places in CPU_REPACK, and the ctypes array llama.cpp reads."""

    names: tuple[str, ...]
    overrides: ctypes.Array | None  # BuftOverride[len + 1], NULL-terminated; alive as long as the model
    patterns: tuple[bytes, ...] = ()  # the regex strings `overrides` points to (kept alive with it)


class Repacker:
    """Decides what to repack (asking ggml) and writes repacked expert slots."""

    def __init__(self) -> None:
        self.buft = repack_buft()
        self._scratch: dict[tuple[int, int, int], _Scratch] = {}
        self._layout: dict[tuple[int, int, int], bool] = {}

    @property
    def available(self) -> bool:
        return self.buft is not None

    def scratch(self, qtype: int, ne0: int, ne1: int) -> _Scratch:
        key = (qtype, ne0, ne1)
        s = self._scratch.get(key)
        if s is None:
            s = self._scratch[key] = _Scratch(self.buft, qtype, ne0, ne1)  # type: ignore[arg-type]
        return s

    def wants(self, name: str, qtype: int, shape: tuple[int, ...]) -> bool:
        """Would ggml-cpu repack this weight? `shape` in numpy order ([n_expert,] ne1, ne0)."""
        if self.buft is None or len(shape) not in (2, 3) or name.startswith(_NOT_MATMUL) or qtype in (0, 1, 30):
            return False  # F32, F16, BF16 are never repacked
        key = (qtype, shape[-1], shape[-2])
        if key not in self._layout:
            self._layout[key] = _has_layout(self.buft, *key)  # type: ignore[arg-type]
        return self._layout[key]

    def plan(self, tensors: list[tuple[str, int, tuple[int, ...]]]) -> RepackPlan:
        """tensors: (name, ggml type, numpy shape of what llama.cpp creates, one slot's worth for experts)."""
        names = tuple(n for n, q, s in tensors if self.wants(n, q, s))
        if not names:
            return RepackPlan((), None)
        patterns = tuple(f"^{n.replace('.', '[.]')}$".encode() for n in names)
        arr = (BuftOverride * (len(names) + 1))()
        for i, p in enumerate(patterns):
            arr[i].pattern, arr[i].buft = p, self.buft
        return RepackPlan(names, arr, patterns)

    def write_slot(self, tptr: int, slot_offset: int, raw: np.ndarray, qtype: int, ne0: int, ne1: int) -> None:
        """Write one expert (raw, plain layout, [ne1 rows of ne0]) into a repacked tensor at `slot_offset`."""
        s = self.scratch(qtype, ne0, ne1)
        if raw.nbytes != s.nbytes:
            raise ValueError(f"repack: {raw.nbytes} bytes for a {s.nbytes}-byte expert")
        src = s.repack(raw)
        dst = int(GGMLTensor.from_address(tptr).data) + slot_offset
        ctypes.memmove(dst, src, s.nbytes)  # a CPU_REPACK buffer is plain host memory

    @property
    def scratch_bytes(self) -> int:
        return sum(s.nbytes for s in self._scratch.values())

    def close(self) -> None:
        for s in self._scratch.values():
            s.close()
        self._scratch.clear()


def is_repack_tensor(tptr: int, buft: int | None) -> bool:
    """Is the tensor in a CPU_REPACK buffer?"""
    if buft is None:
        return False
    buf = GGMLTensor.from_address(tptr).buffer
    return bool(buf) and ggml().lib.ggml_backend_buffer_get_type(buf) == buft
