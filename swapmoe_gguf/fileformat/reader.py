"""Open a GGUF (or the whole set of a split GGUF) into a `GGUFInfo`.

Every malformed or truncated file becomes a `GGUFFormatError` naming the file, never a raw
traceback; a missing or inconsistent shard is named too.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from ..base.errors import GGUFFormatError
from .info import GGUFInfo
from .prescan import prescan
from .splits import SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS_COUNT, SplitState, shard_path, shard_paths, split_prefix


def _open(p: Path) -> GGUFReader:
    if p.is_dir():
        raise GGUFFormatError(f"{p}: is a directory, expected a .gguf file")
    if not p.is_file():
        raise GGUFFormatError(f"{p}: no such file")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GGUFFormatError(f"{p}: cannot read: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise GGUFFormatError(f"{p}: not a GGUF file (magic {magic!r})")
    prescan(p)
    try:
        return GGUFReader(p)
    except (ValueError, IndexError, KeyError, OverflowError, MemoryError, UnicodeDecodeError) as e:
        raise GGUFFormatError(f"{p}: truncated or corrupt GGUF ({type(e).__name__}: {e})") from None


def _split_int(p: Path, reader: GGUFReader, key: str) -> int | None:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        v = f.contents()
    except (UnicodeDecodeError, ValueError, IndexError):
        v = None
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
        raise GGUFFormatError(f"{p}: metadata key {key} should be a non-negative integer, got {v!r}")
    return int(v)


def _read_split(p: Path, reader: GGUFReader) -> tuple[list[tuple[Path, GGUFReader]], SplitState]:
    """The other shards of a split GGUF whose first shard is `p`, and what is missing or inconsistent.
    A non-first shard is refused outright (it has no metadata to show)."""
    count = _split_int(p, reader, SPLIT_COUNT) or 1
    no = _split_int(p, reader, SPLIT_NO) or 0
    st = SplitState(no=no, count=count, tensors_count=_split_int(p, reader, SPLIT_TENSORS_COUNT))
    if count <= 1:
        return [], st
    if no >= count:
        raise GGUFFormatError(f"{p}: split.no {no} for split.count {count}")
    if no != 0:
        prefix = split_prefix(p, no, count)
        first = shard_path(prefix, 0, count) if prefix else f"the *-00001-of-{count:05d}.gguf file"
        raise GGUFFormatError(f"{p}: shard {no + 1} of {count} of a split GGUF; give its first shard: {first}")
    paths = shard_paths(p, count)
    st.present = [p]
    if paths is None:
        st.problem = (f"{p}: shard 1 of {count} of a split GGUF, but its name does not end in "
                      f"-00001-of-{count:05d}.gguf, so the other shards cannot be found")
        return [], st
    st.paths = paths
    shards: list[tuple[Path, GGUFReader]] = []
    for i, sp in enumerate(paths[1:], 1):
        if not sp.is_file():
            st.missing.append(sp)
            st.problem = st.problem or f"{p}: shard {i + 1} of {count} is missing: {sp}"
            continue
        r = _open(sp)
        c, n = _split_int(sp, r, SPLIT_COUNT), _split_int(sp, r, SPLIT_NO)
        if c != count or n != i:
            st.missing.append(sp)
            st.problem = st.problem or (f"{sp}: split.no {n} of split.count {c}, but the first shard {p.name} "
                                        f"expects shard {i} of {count}")
            continue
        shards.append((sp, r))
        st.present.append(sp)
    if len(st.missing) > 1 and st.problem:
        st.problem += f" ({len(st.missing)} of {count} shards missing or inconsistent)"
    if st.problem is None and st.tensors_count is not None:
        n_tensors = len(reader.tensors) + sum(len(r.tensors) for _, r in shards)
        if n_tensors != st.tensors_count:
            st.problem = (f"{p}: the {count} shards hold {n_tensors} tensors, "
                          f"split.tensors.count says {st.tensors_count}")
    return shards, st


def read_gguf(path: str | os.PathLike[str], *, partial: bool = False) -> GGUFInfo:
    """Read a GGUF; for the first shard of a split GGUF, the whole set. A missing or inconsistent
    shard raises (naming it) unless `partial` (inspect), which reads what is there and records the
    problem in `info.split` (`run_problem()` and `layout_problem()` then report it)."""
    p = Path(path)
    reader = _open(p)
    shards, split = _read_split(p, reader)
    if split.problem and not partial:
        raise GGUFFormatError(split.problem)
    try:
        return GGUFInfo(p, reader, shards, split)
    except (ValueError, TypeError, IndexError) as e:
        raise GGUFFormatError(f"{p}: corrupt GGUF metadata ({e})") from None
