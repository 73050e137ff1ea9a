"""Importance matrices (`--imatrix FILE`) for llama.cpp's quantizer, read as `llama-quantize` reads them.

Both of llama.cpp's formats: the GGUF one `llama-imatrix` writes now (tensors `<name>.in_sum2`
[n_mat * ne0] and `<name>.counts` [n_mat], F32, keys `imatrix.*`), and the legacy binary `.dat`
(int32 entry count; per entry: name, ncall, nval, nval floats; optionally the chunk count and the
dataset name). Values are normalised as `llama-quantize` does (sums / count per matrix, 1 where a
matrix was never used; legacy sums / ncall) and handed to `llama_model_quantize` through its
`llama_model_imatrix_data` array, which llama.cpp uses for the tensors it knows by name.
"""
from __future__ import annotations

import ctypes
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..base.errors import QuantError

log = logging.getLogger(__name__)

_SUMS, _COUNTS = ".in_sum2", ".counts"
_REQUIRED_KEYS = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")


def load_imatrix(path: Path) -> dict[str, np.ndarray]:
    """tensor name -> its importance values (float32, flat), from either format."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise QuantError(f"{path}: cannot read the importance matrix ({e.strerror or e})") from None
    data = _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
    if not data:
        raise QuantError(f"{path}: no importance matrix entries")
    for name, v in data.items():
        if not np.isfinite(v).all():
            raise QuantError(f"{path}: entry {name!r} has non-finite values")
    return data


def _load_gguf(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001  -- gguf-py raises anything on a damaged file
        raise QuantError(f"{path}: not a readable GGUF importance matrix ({type(e).__name__}: {e})") from None
    missing = [k for k in _REQUIRED_KEYS if k not in reader.fields]
    if missing:
        raise QuantError(f"{path}: missing importance matrix metadata {missing[0]} (not written by llama-imatrix?)")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        for suffix, into in ((_SUMS, sums), (_COUNTS, counts)):
            if t.name.endswith(suffix):
                if t.tensor_type.name != "F32":
                    raise QuantError(f"{path}: {t.name} is {t.tensor_type.name}, expected F32")
                into[t.name[: -len(suffix)]] = np.asarray(t.data, dtype=np.float32).ravel()
    if set(sums) != set(counts):
        odd = sorted(set(sums) ^ set(counts))[0]
        raise QuantError(f"{path}: {odd} has sums without counts or counts without sums")
    out = {}
    for name, s in sums.items():
        c = np.rint(counts[name]).astype(np.float32)
        if c.size == 0 or s.size % c.size:
            raise QuantError(f"{path}: {name}: {s.size} sums do not split into {c.size} matrices")
        per = s.reshape(c.size, -1)
        out[name] = np.where(c[:, None] > 0, per / np.where(c > 0, c, 1)[:, None], 1.0).astype(np.float32).ravel()
    return out


def _load_legacy(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(raw):
            raise QuantError(f"{path}: not an importance matrix (neither GGUF nor llama.cpp's legacy format): "
                             f"truncated at byte {pos}")
        v = struct.unpack_from(fmt, raw, pos)
        pos += n
        return v[0] if len(v) == 1 else v

    n_entries = take("<i")
    if n_entries < 1 or n_entries > 1 << 24:
        raise QuantError(f"{path}: not an importance matrix (neither GGUF nor llama.cpp's legacy format)")
    out = {}
    for _ in range(n_entries):
        length = take("<i")
        if not 0 < length < 1 << 16:
            raise QuantError(f"{path}: damaged legacy importance matrix (a name of {length} bytes)")
        name = take(f"<{length}s").decode("utf-8", "replace")
        ncall, nval = take("<i"), take("<i")
        if nval < 1:
            raise QuantError(f"{path}: damaged legacy importance matrix ({name}: {nval} values)")
        if pos + 4 * nval > len(raw):
            raise QuantError(f"{path}: damaged legacy importance matrix ({name}: truncated)")
        vals = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        out[name] = vals / ncall if ncall > 0 else vals
    return out


def imatrix_param(data: dict[str, np.ndarray]) -> tuple[Any, list[Any]]:
    """(pointer for `llama_model_quantize_params.imatrix`, objects to keep alive until it returns)."""
    import llama_cpp

    entry = llama_cpp.llama_model_imatrix_data
    arr = (entry * (len(data) + 1))()  # NULL-name terminated
    keep: list[Any] = [arr]
    for i, (name, v) in enumerate(data.items()):
        buf = np.ascontiguousarray(v, dtype=np.float32)
        nb = name.encode()
        keep += [buf, nb]
        arr[i].name = nb
        arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = buf.size
    return ctypes.cast(arr, ctypes.POINTER(entry)), keep
