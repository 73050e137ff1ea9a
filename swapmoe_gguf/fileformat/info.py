"""A GGUF's metadata as typed records: hyper-parameters, tensor table, swap-ready layout checks.

Built by `reader.read_gguf`; used by `inspect`, the re-layout converter and the runtime's
expert store.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, quants

from ..base.errors import GGUFFormatError
from .constants import EXPERT_TENSOR_MARK, FORMAT_VERSION, PAGE_ALIGNMENT, SwapKeys
from .splits import SplitState

_BLK = re.compile(r"^blk\.(\d+)\.")


def block_of(name: str) -> int | None:
    """The block (layer) number of a tensor name, None outside `blk.N.`."""
    m = _BLK.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # numpy order: outermost first, e.g. [n_expert, n_ff, n_embd]
    qtype: GGMLQuantizationType
    nbytes: int
    offset: int             # absolute byte offset of the data in its file
    n_expert: int = 0       # > 0 for stacked expert tensors
    file: int = 0           # index into GGUFInfo.paths (shard of a split GGUF; 0 for a single file)

    @property
    def is_expert(self) -> bool:
        return self.n_expert > 0

    @property
    def expert_nbytes(self) -> int:
        return self.nbytes // self.n_expert if self.n_expert else 0

    @property
    def block(self) -> int | None:
        return block_of(self.name)

    def expert_range(self, e: int) -> tuple[int, int]:
        """Absolute [start, end) of expert `e`'s slice."""
        return self.offset + e * self.expert_nbytes, self.offset + (e + 1) * self.expert_nbytes


@dataclass(frozen=True)
class ModelParams:
    """Hyper-parameters read from `<arch>.*` keys."""

    arch: str
    n_layer: int
    n_embd: int
    n_expert: int
    n_expert_used: int
    n_ctx_train: int
    n_head: int
    n_head_kv: int
    n_embd_head_k: int
    n_embd_head_v: int
    n_vocab: int
    n_ff_exp: int
    n_expert_groups: int = 1   # DeepSeek-V3-style expert groups (llama.cpp: expert_group_count)
    n_group_used: int = 1


class GGUFInfo:
    def __init__(self, path: Path, reader: GGUFReader, shards: Sequence[tuple[Path, GGUFReader]] = (),
                 split: SplitState | None = None):
        self.path, self.reader = path, reader
        # every file holding tensors: `path` first, then the other shards of a split GGUF (in order)
        self.paths: list[Path] = [path, *(p for p, _ in shards)]
        self.file_sizes: list[int] = [p.stat().st_size for p in self.paths]
        self.file_size = self.file_sizes[0]
        self.split = split or SplitState()
        self.arch = self.str("general.architecture")
        self.params = ModelParams(
            arch=self.arch,
            n_layer=self.int(f"{self.arch}.block_count"),
            n_embd=self.int(f"{self.arch}.embedding_length"),
            n_expert=self.int(f"{self.arch}.expert_count", 0),
            n_expert_used=self.int(f"{self.arch}.expert_used_count", 0),
            n_ctx_train=self.int(f"{self.arch}.context_length", 0),
            n_head=self.int(f"{self.arch}.attention.head_count", 0),
            n_head_kv=self.int(f"{self.arch}.attention.head_count_kv", 0) or self.int(f"{self.arch}.attention.head_count", 0),
            n_embd_head_k=self.int(f"{self.arch}.attention.key_length", 0) or self._head_dim(),
            n_embd_head_v=self.int(f"{self.arch}.attention.value_length", 0) or self._head_dim(),
            n_vocab=self._array_len("tokenizer.ggml.tokens") or self.int(f"{self.arch}.vocab_size", 0),
            n_ff_exp=self.int(f"{self.arch}.expert_feed_forward_length", 0) or self.int(f"{self.arch}.feed_forward_length", 0),
            n_expert_groups=max(1, self.int(f"{self.arch}.expert_group_count", 1)),
            n_group_used=max(1, self.int(f"{self.arch}.expert_group_used_count", 1)),
        )
        self.n_expert = self.params.n_expert
        self.alignment = int(reader.alignment)
        self.tensors: list[TensorEntry] = []
        seen: set[str] = set()
        for i, (fpath, r) in enumerate([(path, reader), *shards]):
            for t in r.tensors:
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                nbytes, off = int(t.n_bytes), int(t.data_offset)
                if off + nbytes > self.file_sizes[i]:
                    raise GGUFFormatError(f"{fpath}: truncated GGUF: tensor {t.name} ends at byte {off + nbytes}, "
                                          f"file has {self.file_sizes[i]}")
                if t.name in seen:
                    raise GGUFFormatError(f"{fpath}: tensor {t.name} appears twice in the shard set")
                seen.add(t.name)
                n_exp = self.n_expert if (EXPERT_TENSOR_MARK in t.name and self.n_expert >= 2
                                          and len(shape) >= 2 and shape[0] == self.n_expert) else 0
                self.tensors.append(TensorEntry(t.name, shape, GGMLQuantizationType(int(t.tensor_type)), nbytes, off,
                                                n_exp, i))

    def _array_len(self, key: str) -> int:
        f = self.reader.fields.get(key)
        return len(f.data) if f is not None else 0

    def _head_dim(self) -> int:
        n_head = self.int(f"{self.arch}.attention.head_count", 0)
        return self.int(f"{self.arch}.embedding_length") // n_head if n_head else 0

    # typed accessors -----------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise GGUFFormatError(f"{self.path}: corrupt value of metadata key {key} ({e})") from None

    def str(self, key: str) -> str:
        v = self.get(key)
        if not isinstance(v, str):
            raise GGUFFormatError(f"{self.path}: missing or non-string metadata key {key}")
        return v

    def int(self, key: str, default: int | None = None) -> int:
        v = self.get(key, default)
        if isinstance(v, list):  # per-layer arrays (e.g. head counts): the largest (0 = none in a layer)
            v = max(v) if v else default
        if v is None:
            raise GGUFFormatError(f"{self.path}: missing metadata key {key}")
        try:
            return int(v)
        except (TypeError, ValueError):
            raise GGUFFormatError(f"{self.path}: metadata key {key} should be an integer, got {v!r}") from None

    # experts -----------------------------------------------------------------------------
    @cached_property
    def expert_tensors(self) -> list[TensorEntry]:
        return [t for t in self.tensors if t.is_expert]

    @cached_property
    def moe_layers(self) -> list[int]:
        return sorted({t.block for t in self.expert_tensors if t.block is not None})

    def layer_expert_tensors(self, layer: int) -> list[TensorEntry]:
        return [t for t in self.expert_tensors if t.block == layer]

    @cached_property
    def expert_bytes(self) -> int:
        """Bytes of one expert (all its tensors) in one layer; the largest over layers."""
        return max((sum(t.expert_nbytes for t in self.layer_expert_tensors(l)) for l in self.moe_layers), default=0)

    @cached_property
    def non_expert_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if not t.is_expert)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def weight_bytes_with(self, experts_per_layer: int) -> int:
        """Weight bytes resident with `experts_per_layer` experts in every MoE layer."""
        per_layer = [sum(t.expert_nbytes for t in self.layer_expert_tensors(l)) for l in self.moe_layers]
        return self.non_expert_bytes + experts_per_layer * sum(per_layer)

    @cached_property
    def expert_norms(self) -> np.ndarray | None:
        """[n_moe_layer, n_expert] ||E_i|| from the converter (or `set_expert_norms`), or None."""
        v = self.get(SwapKeys.EXPERT_NORMS)
        if v is None or len(v) != len(self.moe_layers) * self.n_expert:
            return None
        return np.asarray(v, dtype=np.float32).reshape(len(self.moe_layers), self.n_expert)

    def set_expert_norms(self, norms: np.ndarray) -> None:
        """Norms computed outside the file (a GGUF run in place, see `norms_cache`)."""
        norms = np.asarray(norms, dtype=np.float32)
        if norms.shape != (len(self.moe_layers), self.n_expert):
            raise ValueError(f"expert norms of shape {norms.shape}, expected {(len(self.moe_layers), self.n_expert)}")
        self.__dict__["expert_norms"] = norms

    # layout ------------------------------------------------------------------------------
    @property
    def format_version(self) -> int | None:
        v = self.get(SwapKeys.FORMAT_VERSION)
        return int(v) if v is not None else None

    @property
    def swap_ready(self) -> bool:
        return self.layout_problem() is None

    @property
    def slices_aligned(self) -> bool:
        return all(t.offset % PAGE_ALIGNMENT == 0 and t.expert_nbytes % PAGE_ALIGNMENT == 0 for t in self.expert_tensors)

    def unaligned_reason(self) -> str | None:
        """Why some expert slices cannot start on a page, or None when all do."""
        bad = [t for t in self.expert_tensors if t.expert_nbytes % PAGE_ALIGNMENT]
        if not bad:
            return None
        t = bad[0]
        return (f"{len(bad)} expert tensor(s), e.g. {t.name}, have slices of {t.expert_nbytes} bytes, not a multiple "
                f"of the {PAGE_ALIGNMENT}-byte page: stacked tensors are contiguous, so only tensor starts are "
                "page-aligned (swapping still works; neighbouring slices share a boundary page)")

    def check_loadable(self) -> None:
        """Checks llama.cpp would otherwise answer with an abort (GGML_ASSERT) instead of an error."""
        tokens = self.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise GGUFFormatError(f"{self.path}: no tokenizer.ggml.tokens")
        a = self.arch
        n_layer = self.int(f"{a}.block_count")
        if not 0 < n_layer <= 512:  # LLAMA_MAX_LAYERS
            raise GGUFFormatError(f"{self.path}: {a}.block_count is {n_layer}, expected 1..512")
        required = ["embedding_length", "attention.head_count", "context_length"]
        if self.get(f"{a}.expert_feed_forward_length") is None:
            required.append("feed_forward_length")
        for key in required:
            if self.get(f"{a}.{key}") is None:
                raise GGUFFormatError(f"{self.path}: missing metadata key {a}.{key}")
        for key in ("embedding_length", "feed_forward_length", "attention.head_count", "attention.head_count_kv",
                    "attention.key_length", "attention.value_length", "rope.dimension_count",
                    "expert_feed_forward_length", "expert_shared_feed_forward_length", "context_length"):
            v = self.get(f"{a}.{key}")
            if isinstance(v, list):  # per-layer (hybrid models): 0 = no attention / FFN in that layer
                if not (v and all(isinstance(x, int) and 0 <= x < 1 << 24 for x in v)):
                    raise GGUFFormatError(f"{self.path}: {a}.{key} is {v!r}, expected sizes per layer "
                                          "(0 for a layer without it)")
            elif v is not None and not (isinstance(v, int) and 0 < v < 1 << 24):
                raise GGUFFormatError(f"{self.path}: {a}.{key} is {v!r}, expected a positive size")
        if a in _GATING_KEY_REQUIRED and self.get(f"{a}.expert_gating_func") is None:
            raise GGUFFormatError(f"{self.path}: {a} without {a}.expert_gating_func: llama.cpp cannot route its "
                                  "experts (its graph aborts); the converter that wrote this file left the key out")
        if not 0 < self.params.n_expert_used <= self.n_expert:
            raise GGUFFormatError(f"{self.path}: {a}.expert_used_count {self.params.n_expert_used} for "
                                  f"{self.n_expert} experts")
        # llama.cpp reads token texts as C strings: a NUL ends them
        tokens = [t.split("\x00", 1)[0] for t in tokens]
        if len(set(tokens)) != len(tokens):
            raise GGUFFormatError(f"{self.path}: the vocabulary repeats a token ({len(tokens) - len(set(tokens))} "
                                  "duplicates); llama.cpp cannot load it")
        for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            n = self._array_len(key)
            if n and n != len(tokens):
                raise GGUFFormatError(f"{self.path}: {key} has {n} entries for {len(tokens)} tokens")

    def run_problem(self) -> str | None:
        """Why the runtime cannot run this file even in place (reading experts where they are), or None."""
        if self.split.problem:
            return self.split.problem
        if self.n_expert < 2 or not self.expert_tensors:
            return "not a Mixture-of-Experts model (no stacked expert tensors)"
        if self.format_version is not None and self.format_version != FORMAT_VERSION:
            return f"swapmoe format version {self.format_version}, this build reads {FORMAT_VERSION}"
        return None

    @property
    def runnable_in_place(self) -> bool:
        """Runnable, but not swap-ready: experts are read where they are (buffered, unaligned)."""
        return self.run_problem() is None and self.layout_problem() is not None

    def layout_problem(self) -> str | None:
        """Why this file is not swap-ready (one page-aligned file with swapmoe metadata), or None."""
        problem = self.run_problem()
        if problem:
            return problem
        if self.split.is_split:
            return f"split into {self.split.count} files (`swapmoe convert` joins them into one swap-ready file)"
        if self.format_version is None:
            return "no swapmoe metadata (convert it with `swapmoe convert`)"
        if self.format_version != FORMAT_VERSION:
            return f"swapmoe format version {self.format_version}, this build reads {FORMAT_VERSION}"
        if self.alignment % PAGE_ALIGNMENT:
            return f"data alignment {self.alignment}, expected a multiple of {PAGE_ALIGNMENT}"
        if self.expert_norms is None:
            return "expert norms missing or of the wrong length"
        return None


# Architectures whose llama.cpp graph takes the gating function from the file with no default
# (llama.cpp's load_arch_hparams reads it as optional, then build_moe_ffn aborts on "none").
_GATING_KEY_REQUIRED = frozenset({"dots1", "minimax-m2", "smallthinker", "hy_v4"})


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Raw tensor bytes (any dtype view) back to float32 of `shape`, with gguf-py's numpy decoders."""
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        dt = np.float32 if qtype == GGMLQuantizationType.F32 else np.float16
        return np.asarray(raw).view(dt).astype(np.float32).reshape(shape)
    try:
        out = quants.dequantize(np.asarray(raw).view(np.uint8), qtype)
    except NotImplementedError:
        raise GGUFFormatError(f"cannot decode {qtype.name} tensors in numpy") from None
    return out.reshape(shape).astype(np.float32, copy=False)
