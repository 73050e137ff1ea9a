"""Walk a GGUF header with every count and length checked against the file size, before gguf-py's
reader trusts them: a hostile count would otherwise make it allocate or loop (found by fuzzing)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..base.errors import GGUFFormatError


# GGUF value types: fixed sizes of the scalar ones (8 = string, 9 = array)
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def prescan(path: Path) -> None:
    with open(path, "rb", buffering=1 << 16) as f:
        _prescan(path, f)


def _prescan(path: Path, f: Any) -> None:
    """Walk the header with every count and length checked against the file size, before
    gguf-py's reader trusts them (a hostile count would otherwise make it allocate or loop)."""
    import struct

    size = path.stat().st_size  # read as we go: the header is small, the file may not be
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > size:
            raise GGUFFormatError(f"{path}: truncated or corrupt GGUF header (needs {n} bytes at offset {pos}, "
                                  f"{size - pos} left)")
        pos += n
        if n <= 64:
            return f.read(n)
        f.seek(n, 1)  # long strings and arrays are skipped, not read
        return b""

    def u32() -> int:
        return struct.unpack("<I", take(4))[0]

    def u64() -> int:
        return struct.unpack("<Q", take(8))[0]

    def string() -> None:
        take(u64())

    take(4)
    version = u32()
    if version not in (2, 3):
        raise GGUFFormatError(f"{path}: GGUF version {version}, expected 2 or 3")
    n_tensors, n_kv = u64(), u64()
    if n_tensors > size // 24 or n_kv > size // 12:
        raise GGUFFormatError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys in {size} bytes)")
    for _ in range(n_kv):
        string()
        vtype = u32()
        if vtype in _SCALAR:
            take(_SCALAR[vtype])
        elif vtype == 8:
            string()
        elif vtype == 9:
            itype, count = u32(), u64()
            if itype in _SCALAR:
                take(_SCALAR[itype] * count)
            elif itype == 8:
                if count > (size - pos) // 8:
                    raise GGUFFormatError(f"{path}: corrupt GGUF header (array of {count} strings)")
                for _ in range(count):
                    string()
            else:
                raise GGUFFormatError(f"{path}: corrupt GGUF header (array of value type {itype})")
        else:
            raise GGUFFormatError(f"{path}: corrupt GGUF header (value type {vtype})")
    for _ in range(n_tensors):
        string()
        n_dims = u32()
        if not 1 <= n_dims <= 4:
            raise GGUFFormatError(f"{path}: corrupt GGUF tensor info ({n_dims} dimensions)")
        dims = [u64() for _ in range(n_dims)]
        if any(d == 0 or d > size for d in dims):
            raise GGUFFormatError(f"{path}: corrupt GGUF tensor info (dimensions {dims})")
        take(4 + 8)
