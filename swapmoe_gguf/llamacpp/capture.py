"""The eval filter's capture area: where decode steps' router inputs land (see _evalfilter.c).

`Filter` mirrors the C struct the filter reads; `Capture` owns the memory it writes: a host area
[n_slots, n_rows, slot_tokens, n_embd] (wrapped as a CPU backend buffer, so the graph can be pointed
at it) and, per device the filter meets a router input on, an area of the same layout in that
device's memory, read back once per flush. The router tap (router.py) drives both.
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging

import numpy as np

from .ggml import GGML_TYPE_F32, GGMLTensor, ggml, shared_lib

log = logging.getLogger(__name__)
PREFIX = b"ffn_moe_logits-"
_MAX_DEV = 8  # _evalfilter.c's MAX_DEV


class Filter(ctypes.Structure):
    """`struct swapmoe_filter` of _evalfilter.c."""

    _fields_ = [("name_offset", ctypes.c_size_t), ("prefix", ctypes.c_char_p), ("prefix_len", ctypes.c_size_t),
                ("forward", ctypes.c_void_p), ("forward_ud", ctypes.c_void_p),
                ("capture", ctypes.c_int32), ("cap_prefix", ctypes.c_char_p), ("cap_prefix_len", ctypes.c_size_t),
                ("src_offset", ctypes.c_size_t), ("type_offset", ctypes.c_size_t), ("ne_offset", ctypes.c_size_t),
                ("nb_offset", ctypes.c_size_t), ("tensor_get", ctypes.c_void_p), ("n_layer_map", ctypes.c_int32),
                ("row_of_layer", ctypes.c_void_p), ("want", ctypes.c_void_p), ("buf", ctypes.c_void_p),
                ("n_embd", ctypes.c_int64), ("slot_tokens", ctypes.c_int64), ("n_tok", ctypes.c_void_p),
                ("error", ctypes.c_int32), ("copy_ns", ctypes.c_int64), ("n_rows", ctypes.c_int32),
                ("slot", ctypes.c_int32), ("where", ctypes.c_void_p), ("redirect", ctypes.c_int32),
                ("buffer_offset", ctypes.c_size_t), ("op_offset", ctypes.c_size_t),
                ("view_src_offset", ctypes.c_size_t), ("view_offs_offset", ctypes.c_size_t),
                ("data_offset", ctypes.c_size_t), ("buffer_is_host", ctypes.c_void_p),
                ("buffer_get_type", ctypes.c_void_p), ("host_buffer", ctypes.c_void_p), ("n_dev", ctypes.c_int32),
                ("dev_type", ctypes.c_void_p * _MAX_DEV), ("dev_buffer", ctypes.c_void_p * _MAX_DEV),
                ("dev_base", ctypes.c_void_p * _MAX_DEV), ("missing_type", ctypes.c_void_p),
                ("max_moved", ctypes.c_int32), ("n_moved", ctypes.c_int32), ("moved", ctypes.c_void_p),
                ("max_views", ctypes.c_int32), ("n_views", ctypes.c_int32), ("views", ctypes.c_void_p),
                ("redirected", ctypes.c_int64), ("views_full", ctypes.c_int32)]


class Capture:
    """The capture area the C filter fills on decode steps (see _evalfilter.c): slot (step, layer) holds
    that layer's router inputs of that step. `buf` [n_slots, n_rows, slot_tokens, n_embd] on the host;
    where a layer runs on a device, an area of the same layout in that device's memory (`devices`),
    read at `flush`. `n_tok` [n_slots, n_rows] tokens in each slot, `where` [n_slots, n_rows] which area
    (0 host, 1 + d device d), `want` [n_rows] the layers to capture this step. Owned here, read and
    written by the C code through raw pointers."""

    def __init__(self, f: Filter, layers: list[int], n_embd: int, slot_tokens: int, n_slots: int,
                 redirect: bool = True):
        rows = np.full(max(layers) + 1, -1, dtype=np.int32)
        rows[layers] = np.arange(len(layers), dtype=np.int32)
        n = len(layers)
        self.row_of_layer = rows
        self.rows = np.arange(n)                                                     # [n_rows]
        self.want = np.zeros(n, dtype=np.uint8)                                      # [n_rows]
        self.n_tok = np.zeros((n_slots, n), dtype=np.int32)                          # [n_slots, n_rows]
        self.where = np.zeros((n_slots, n), dtype=np.int8)                           # [n_slots, n_rows]
        shape = (n_slots, n, slot_tokens, n_embd)
        raw = np.zeros(4 * int(np.prod(shape)) + 64, dtype=np.uint8)  # (ggml wants 32-byte aligned buffers)
        at = -raw.ctypes.data % 64
        self.buf = raw[at:at + 4 * int(np.prod(shape))].view(np.float32).reshape(shape)  # [n_slots, n_rows, tok, n_embd]
        self.n_slots, self.slot_tokens = n_slots, slot_tokens
        self.steps = 0  # decode calls captured since the last flush (the slots in use)
        self.single = True  # every one of those calls decoded one token
        self.want_all = False  # `want` holds all ones
        # the C filter's list of redirected tensors (3 pointers each) and of view nodes seen in a step
        self.moved = np.zeros(3 * (16384 + 64 * n), dtype=np.uintp)
        self.views = np.zeros(1 << 16, dtype=np.uintp)
        self.devices: list[tuple[int, int, int]] = []  # (buffer type, buffer, base) of each device area
        self._f = f
        g = ggml()
        f.cap_prefix, f.cap_prefix_len = PREFIX, len(PREFIX)
        f.src_offset, f.type_offset = GGMLTensor.src.offset, GGMLTensor.type.offset
        f.ne_offset, f.nb_offset = GGMLTensor.ne.offset, GGMLTensor.nb.offset
        f.buffer_offset, f.op_offset = GGMLTensor.buffer.offset, GGMLTensor.op.offset
        f.view_src_offset, f.view_offs_offset = GGMLTensor.view_src.offset, GGMLTensor.view_offs.offset
        f.data_offset = GGMLTensor.data.offset
        f.tensor_get = ctypes.cast(g.lib.ggml_backend_tensor_get, ctypes.c_void_p).value
        f.buffer_is_host = ctypes.cast(g.lib.ggml_backend_buffer_is_host, ctypes.c_void_p).value
        f.buffer_get_type = ctypes.cast(g.lib.ggml_backend_buffer_get_type, ctypes.c_void_p).value
        f.n_layer_map, f.row_of_layer = len(rows), rows.ctypes.data
        f.want, f.buf, f.n_tok, f.where = (self.want.ctypes.data, self.buf.ctypes.data, self.n_tok.ctypes.data,
                                           self.where.ctypes.data)
        f.n_embd, f.slot_tokens, f.n_rows = n_embd, slot_tokens, n
        f.max_moved, f.moved = len(self.moved) // 3, self.moved.ctypes.data
        f.max_views, f.views = len(self.views), self.views.ctypes.data
        self.host_buffer = 0
        if redirect:
            lib = g.lib if hasattr(g.lib, "ggml_backend_cpu_buffer_from_ptr") else shared_lib(g.libdir, "libggml-cpu")
            from_ptr = lib.ggml_backend_cpu_buffer_from_ptr
            from_ptr.restype, from_ptr.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]
            self.host_buffer = from_ptr(self.buf.ctypes.data, self.buf.nbytes) or 0
        f.host_buffer = self.host_buffer or None
        f.redirect = int(bool(self.host_buffer))

    def add_device(self, buft: int) -> None:
        """A capture area in the memory of buffer type `buft` (a device the filter met a router input on)."""
        g, f = ggml(), self._f
        if len(self.devices) >= _MAX_DEV:
            return
        buffer = g.lib.ggml_backend_buft_alloc_buffer(buft, self.buf.nbytes)
        if not buffer:
            log.warning("no room for the router tap's capture area on %s: copying router inputs there",
                        g.buft_name(buft))
            return
        base = g.lib.ggml_backend_buffer_get_base(buffer)
        d = len(self.devices)
        f.dev_type[d], f.dev_buffer[d], f.dev_base[d] = buft, buffer, base
        self.devices.append((buft, buffer, base))
        f.n_dev = len(self.devices)

    def read_devices(self, steps: int) -> None:
        """Bring the device areas' first `steps` slots into `buf` (one read per device)."""
        nbytes = steps * self.buf[0].nbytes
        for d, (_, buffer, base) in enumerate(self.devices):
            cells = self.where[:steps] == d + 1                                      # [steps, n_rows]
            if not cells.any():
                continue
            staging = np.empty_like(self.buf[:steps])
            t = GGMLTensor(type=GGML_TYPE_F32, buffer=buffer, data=base)  # the area's prefix as one F32 tensor
            t.ne[:] = (nbytes // 4, 1, 1, 1)
            t.nb[:] = (4, nbytes, nbytes, nbytes)
            ggml().lib.ggml_backend_tensor_get(ctypes.addressof(t), staging.ctypes.data, 0, nbytes)
            self.buf[:steps][cells] = staging[cells]

    def close(self) -> None:
        g = ggml()
        for _, buffer, _ in self.devices:
            g.lib.ggml_backend_buffer_free(buffer)
        self.devices = []
        self._f.n_dev = 0
        if self.host_buffer:
            g.lib.ggml_backend_buffer_free(self.host_buffer)  # (frees the wrapper, not numpy's memory)
            self.host_buffer = 0


def filter_lib() -> ctypes.CDLL | None:
    """The compiled C filter, or None when it was not built."""
    spec = importlib.util.find_spec("swapmoe_gguf.llamacpp._evalfilter")
    if spec is None or not spec.origin:
        log.warning("eval-callback filter not built; the router tap runs in Python for every graph node")
        return None
    lib = ctypes.CDLL(spec.origin)
    lib.swapmoe_filter_restore.argtypes, lib.swapmoe_filter_restore.restype = [ctypes.c_void_p], None
    return lib
