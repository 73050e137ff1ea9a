"""Streaming reader of (sharded) safetensors checkpoints, numpy only.

Each tensor is read with `pread` into its own buffer when asked for and dropped from the page
cache afterwards, so a conversion holds about one tensor at a time (a memory map would leave
every page it touched counted in RSS). bf16 is widened to f32 with integer shifts, which is
exact, so torch is not needed to convert a checkpoint.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base.errors import CheckpointFormatError

# safetensors dtype -> (numpy dtype of the stored bytes, bytes per element)
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened on read
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("u1"),
}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


class SafetensorsFile:
    """One `.safetensors` file: validated header plus lazy memory-mapped tensors."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointFormatError(f"{path}: truncated safetensors file (no header)")
                (hlen,) = struct.unpack("<Q", head)
                if hlen > _MAX_HEADER or 8 + hlen > size:
                    raise CheckpointFormatError(
                        f"{path}: truncated or corrupt safetensors file "
                        f"(header of {hlen} bytes, file is {size} bytes)")
                header = json.loads(f.read(hlen))
        except OSError as e:
            raise CheckpointFormatError(f"{path}: cannot read: {e.strerror or e}") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointFormatError(f"{path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointFormatError(f"{path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        base = 8 + hlen
        self.tensors: dict[str, TensorRef] = {}
        for name, info in header.items():
            try:
                dtype, shape, (lo, hi) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointFormatError(f"{path}: corrupt header entry for tensor {name!r}") from None
            if dtype not in _DTYPES:
                raise CheckpointFormatError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
            want = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
            if hi - lo != want or lo < 0:
                raise CheckpointFormatError(
                    f"{path}: tensor {name!r} should span {want} bytes for shape {list(shape)} {dtype}, "
                    f"header says {hi - lo}")
            if base + hi > size:
                raise CheckpointFormatError(
                    f"{path}: truncated safetensors file: tensor {name!r} ends at byte {base + hi}, "
                    f"file has {size}")
            self.tensors[name] = TensorRef(path, dtype, shape, base + lo, want)
        self._fd: int | None = None

    def array(self, ref: TensorRef) -> np.ndarray:
        """The tensor as a fresh numpy array (f32 for bf16, the stored dtype otherwise)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        buf = np.empty(ref.nbytes, dtype=np.uint8)
        got = os.preadv(self._fd, [buf], ref.start) if ref.nbytes else 0
        if got != ref.nbytes:
            raise CheckpointFormatError(f"{self.path}: short read of {ref.nbytes} bytes at {ref.start} (file truncated?)")
        try:
            os.posix_fadvise(self._fd, ref.start, ref.nbytes, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            pass
        raw = buf.view(_DTYPES[ref.dtype]).reshape(ref.shape)
        if ref.dtype == "BF16":  # widen into one u32 buffer: bf16 bits are the top half of f32
            wide = np.empty(ref.shape, dtype=np.uint32)
            np.left_shift(raw, np.uint32(16), out=wide, dtype=np.uint32)
            return wide.view(np.float32)
        return raw

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Checkpoint:
    """All tensors of an HF checkpoint directory: a single file or shards with an index."""

    def __init__(self, directory: Path):
        self.dir = directory
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                raise CheckpointFormatError(f"{index}: corrupt index (no weight_map)") from None
            files = sorted(set(weight_map.values()))
            for fn in files:
                if not (directory / fn).is_file():
                    raise CheckpointFormatError(f"{directory / fn}: shard listed in {index.name} is missing")
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise CheckpointFormatError(f"{directory}: no *.safetensors files (only safetensors checkpoints are supported)")
        self.files = {fn: SafetensorsFile(directory / fn) for fn in files}
        self.refs: dict[str, tuple[SafetensorsFile, TensorRef]] = {}
        for f in self.files.values():
            for name, ref in f.tensors.items():
                self.refs[name] = (f, ref)
        if index.is_file():
            missing = [n for n, fn in weight_map.items() if n not in self.refs]
            if missing:
                raise CheckpointFormatError(
                    f"{index}: tensor {missing[0]!r} is listed but not found in {weight_map[missing[0]]}")

    def names(self) -> list[str]:
        return list(self.refs)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.refs[name][1].shape

    def get(self, name: str) -> np.ndarray:
        f, ref = self.refs[name]
        return f.array(ref)

    @property
    def largest_tensor_bytes(self) -> int:
        return max((ref.nbytes for _, ref in self.refs.values()), default=0)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

