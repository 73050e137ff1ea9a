"""Split GGUFs (llama.cpp's `gguf-split`): `<prefix>-00001-of-00003.gguf`, ...

Every shard carries `split.no` (u16, 0-based), `split.count` (u16) and `split.tensors.count`
(i32, the tensors of the whole set); the first shard also holds all the metadata. llama.cpp
loads a set from its first shard only, deriving the other names from the pattern; so do we.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

SPLIT_NO = "split.no"
SPLIT_COUNT = "split.count"
SPLIT_TENSORS_COUNT = "split.tensors.count"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT)

_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_path(prefix: str | Path, no: int, count: int) -> Path:
    """Path of shard `no` (0-based) of `count`, as llama.cpp's `llama_split_path` names it."""
    return Path(f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf")


def split_prefix(path: Path, no: int, count: int) -> str | None:
    """`<prefix>` of `path` if its name is shard `no` (0-based) of `count`, else None
    (as `llama_split_prefix`)."""
    m = _NAME.match(path.name)
    if not m or int(m["no"]) != no + 1 or int(m["count"]) != count:
        return None
    return str(path.parent / m["prefix"])


def shard_paths(first: Path, count: int) -> list[Path] | None:
    """All shard paths of a set whose shard 0 is `first`, or None if its name does not follow the pattern."""
    prefix = split_prefix(first, 0, count)
    return None if prefix is None else [shard_path(prefix, i, count) for i in range(count)]


@dataclass
class SplitState:
    """What is known about the shard set a GGUF belongs to."""

    no: int = 0                      # this file's shard index (0-based)
    count: int = 1                   # shards in the set
    tensors_count: int | None = None  # tensors in the whole set, per the first shard
    paths: list[Path] = field(default_factory=list)    # every shard's expected path (when derivable)
    present: list[Path] = field(default_factory=list)  # shards read (consistent ones)
    missing: list[Path] = field(default_factory=list)  # shards that are absent
    problem: str | None = None       # first problem found (one line, names the file), or None

    @property
    def is_split(self) -> bool:
        return self.count > 1

