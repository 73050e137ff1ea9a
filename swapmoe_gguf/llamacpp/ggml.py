"""ctypes bindings to the ggml/gguf functions llama-cpp-python ships but does not wrap.

They live in the `libggml-base` next to llama-cpp-python's `libllama`, opened under the soname
`libllama` links against (`shared_lib`): the wheel ships `libggml-base.so`, `.so.0` and `.so.0.25.3`
as three files, not links, and opening another name than the one already loaded maps a second ggml
with its own globals (a device registered in one is invisible to llama.cpp). The `ggml_tensor`
struct is mirrored for the fields the eval callback reads (ne, nb, src); its layout is
checked against `ggml_get_name`/`ggml_get_data` on first use, so a llama.cpp build with a
different layout fails loudly instead of reading garbage.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0


class GGMLTensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


class _GGMLInitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def shared_lib(libdir: Path, stem: str) -> ctypes.CDLL:
    """The ggml library `stem` ("libggml-base", "libggml", "libggml-cpu", "libggml-rpc") as libllama
    loaded it: the `.so.0` soname its DT_NEEDED names (the same file is then mapped once; glibc matches
    by inode), `.so` or `.dylib` where no soname file exists (macOS, other packagings)."""
    for name in (f"{stem}.so.0", f"{stem}.so", f"{stem}.dylib", f"{stem}.0.dylib"):
        if (libdir / name).exists():
            return ctypes.CDLL(str(libdir / name))
    raise OSError(f"{libdir}: no {stem}.so.0, {stem}.so or {stem}.dylib (llama-cpp-python's libraries)")


class GGML:
    """The bound library. One instance per process (see `ggml()`)."""

    def __init__(self) -> None:
        import llama_cpp

        self.libdir = libdir = Path(llama_cpp.__file__).parent / "lib"
        self.lib = lib = shared_lib(libdir, "libggml-base")
        sig = {
            "gguf_init_from_file": (ctypes.c_void_p, [ctypes.c_char_p, _GGUFInitParams]),
            "gguf_free": (None, [ctypes.c_void_p]),
            "gguf_set_val_u32": (None, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]),
            "gguf_set_arr_data": (None, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p,
                                         ctypes.c_size_t]),
            "gguf_find_key": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]),
            "ggml_get_name": (ctypes.c_void_p, [ctypes.c_void_p]),
            "ggml_get_data": (ctypes.c_void_p, [ctypes.c_void_p]),
            "ggml_nbytes": (ctypes.c_size_t, [ctypes.c_void_p]),
            "ggml_backend_tensor_set": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]),
            "ggml_backend_tensor_get": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]),
            "ggml_backend_buffer_is_host": (ctypes.c_bool, [ctypes.c_void_p]),
            "ggml_init": (ctypes.c_void_p, [_GGMLInitParams]),
            "ggml_free": (None, [ctypes.c_void_p]),
            "ggml_new_tensor": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                                  ctypes.POINTER(ctypes.c_int64)]),
            "ggml_set_name": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
            "gguf_add_tensor": (None, [ctypes.c_void_p, ctypes.c_void_p]),
            "gguf_find_tensor": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]),
            "ggml_op_desc": (ctypes.c_char_p, [ctypes.c_void_p]),
            # buffers (the CPU repack path, repack.py)
            "ggml_backend_buft_name": (ctypes.c_char_p, [ctypes.c_void_p]),
            "ggml_backend_buft_alloc_buffer": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
            "ggml_backend_buffer_free": (None, [ctypes.c_void_p]),
            "ggml_backend_buffer_get_base": (ctypes.c_void_p, [ctypes.c_void_p]),
            "ggml_backend_buffer_get_size": (ctypes.c_size_t, [ctypes.c_void_p]),
            "ggml_backend_buffer_get_type": (ctypes.c_void_p, [ctypes.c_void_p]),
            "ggml_backend_buffer_init_tensor": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]),
            "ggml_backend_tensor_alloc": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]),
        }
        for name, (res, args) in sig.items():
            f = getattr(lib, name)
            f.restype, f.argtypes = res, args
        self._checked = False

    @staticmethod
    def init_params(mem_size: int, no_alloc: bool = True) -> "_GGMLInitParams":
        return _GGMLInitParams(mem_size, None, no_alloc)

    def buft_name(self, buft: int) -> str:
        return (self.lib.ggml_backend_buft_name(buft) or b"").decode()

    # gguf ------------------------------------------------------------------------------
    def gguf_open_meta(self, path: str) -> int:
        """Metadata and tensor infos of a GGUF, no tensor data (caller frees with `gguf_free`)."""
        ctx = self.lib.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
        if not ctx:
            raise OSError(f"{path}: ggml could not read the GGUF metadata")
        return ctx

    def gguf_set_u32(self, ctx: int, key: str, value: int) -> None:
        self.lib.gguf_set_val_u32(ctx, key.encode(), value)

    def gguf_set_array(self, ctx: int, key: str, gguf_type: int, values: np.ndarray) -> None:
        """Replace an array value (`gguf_type`: GGUF's element type; `values` already of that width)."""
        values = np.ascontiguousarray(values)
        self.lib.gguf_set_arr_data(ctx, key.encode(), gguf_type, values.ctypes.data, values.size)

    def gguf_free(self, ctx: int) -> None:
        self.lib.gguf_free(ctx)

    def gguf_declare_tensor(self, ctx: int, name: str, ggml_type: int, shape: tuple[int, ...]) -> None:
        """Add a tensor info (name, type, shape in numpy order) to a metadata-only gguf context.

        llama.cpp builds a tensor missing from the metadata as F32; declaring it gives it a type."""
        tctx = self.lib.ggml_init(_GGMLInitParams(1 << 16, None, True))
        try:
            ne = (ctypes.c_int64 * len(shape))(*reversed(shape))
            t = self.lib.ggml_new_tensor(tctx, ggml_type, len(shape), ne)
            self.lib.ggml_set_name(t, name.encode())
            self.lib.gguf_add_tensor(ctx, t)  # copies the info
        finally:
            self.lib.ggml_free(tctx)

    # tensors -----------------------------------------------------------------------------
    def tensor(self, ptr: int) -> GGMLTensor:
        t = GGMLTensor.from_address(ptr)
        if not self._checked:
            name_off = self.lib.ggml_get_name(ptr) - ptr
            if name_off != GGMLTensor.name.offset or self.lib.ggml_get_data(ptr) != (t.data or None):
                raise RuntimeError(f"ggml_tensor layout mismatch (name at {name_off}, expected "
                                   f"{GGMLTensor.name.offset}); this llama.cpp build is not supported")
            self._checked = True
        return t

    def name(self, ptr: int) -> str:
        return ctypes.string_at(self.lib.ggml_get_name(ptr)).decode()

    def op_desc(self, ptr: int) -> str:
        """The node's operation: "MUL_MAT", "SOFT_MAX", ...; a unary op's own name ("SIGMOID")."""
        return (self.lib.ggml_op_desc(ptr) or b"").decode()

    def op_params_f32(self, ptr: int, n: int = 2) -> tuple[float, ...]:
        """The first `n` op parameters read as f32 (ggml_scale keeps its factor there)."""
        raw = np.array(list(self.tensor(ptr).op_params[:n]), dtype=np.int32)
        return tuple(float(v) for v in raw.view(np.float32))

    def nbytes(self, ptr: int) -> int:
        return int(self.lib.ggml_nbytes(ptr))

    def set(self, ptr: int, data: np.ndarray, offset: int = 0) -> None:
        """Copy `data`'s bytes into the tensor at byte `offset` (any backend buffer)."""
        data = np.ascontiguousarray(data)
        self.lib.ggml_backend_tensor_set(ptr, data.ctypes.data, offset, data.nbytes)

    def get_f32(self, ptr: int) -> np.ndarray:
        """A contiguous F32 tensor as numpy, numpy order ([ne1, ne0] for 2D)."""
        t = self.tensor(ptr)
        if t.type != GGML_TYPE_F32:
            raise TypeError(f"{t.name.decode()}: expected F32, got ggml type {t.type}")
        shape = [int(t.ne[i]) for i in range(GGML_MAX_DIMS)]
        out = np.empty(shape[::-1], dtype=np.float32)
        self.lib.ggml_backend_tensor_get(ptr, out.ctypes.data, 0, out.nbytes)
        return out


@functools.lru_cache(maxsize=1)
def ggml() -> GGML:
    return GGML()
