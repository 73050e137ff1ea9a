"""Absent tensors made absent again: the slot model's graph equals stock llama.cpp's.

`llama_model_init_from_user` has no file to look in, so llama.cpp creates *every* optional tensor
of the architecture (attention biases, per-tensor scales, `rope_freqs`, ...). The slot model fills
them with neutral values (0 for a bias, 1 for a scale), which keeps the output exact, but the graph
then runs an extra add or mul for most such tensors (19 per layer for a Mixtral file), each a
barrier across threads, measured at 10-15 % of a small model's decode step. And where
llama.cpp's graph takes another path when a tensor is missing (a dense or MoE layer, attention sinks),
a created tensor takes the wrong one.

Stock llama.cpp keeps a NULL pointer for an optional tensor the file lacks, and its graph code tests
each pointer. This module sets those pointers back to NULL in the model's per-layer structs (and its
top-level fields) right after the model is built and before any graph exists:

* the `layers` vector (`std::vector<llama_layer>`) is found inside the llama_model object as the one
  (begin, end, capacity) triple whose memory holds every layer's own tensors at a per-layer stride,
  read only within the object's allocation (`malloc_usable_size`) and only from mapped memory;
* a word is cleared only if it equals the address of a tensor that the file lacks and that llama.cpp
  created for this model (tensor structs live in ggml's context pools, which no other field can
  point to).

Where any of this cannot be established (another C library, a layout that does not match), nothing
is changed and the neutral values keep the output exact (logged).
"""
from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Neutral:
    """Value for a tensor llama.cpp creates although the file lacks it (it then asks us to fill it)."""

    suffix: str
    value: float
    identity: bool = False  # a square projection the graph always applies: the identity matrix


# Filled into the absent tensors llama.cpp creates (before they are unlinked; where unlinking is not
# possible they stay, and must be neutral or the output is NaN). Per architecture, with a default.
_DEFAULT_NEUTRAL = (Neutral(".bias", 0.0), Neutral(".input_scale", 1.0), Neutral(".scale", 1.0),
                    Neutral("rope_freqs.weight", 1.0))
NEUTRAL_TENSORS: dict[str, tuple[Neutral, ...]] = {
    "default": _DEFAULT_NEUTRAL,
    # Nemotron-H MoE without a latent space (moe_latent_size 0): llama.cpp creates the latent
    # projections as [n_embd, n_embd] and multiplies by them whenever they exist
    "nemotron_h_moe": (*_DEFAULT_NEUTRAL, Neutral("ffn_latent_down.weight", 1.0, identity=True),
                       Neutral("ffn_latent_up.weight", 1.0, identity=True)),
}
# Absent tensors that are another tensor's copy (tied embeddings).
ALIAS_TENSORS = {"output.weight": "token_embd.weight"}

_WORD = 8  # pointer size (64-bit only)


def _usable_size(addr: int) -> int | None:
    """Bytes usable in the heap allocation starting at `addr` (glibc/musl), or None."""
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != _WORD:
        return None
    try:
        fn = ctypes.CDLL(None).malloc_usable_size
    except (AttributeError, OSError):
        return None
    fn.restype, fn.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    return int(fn(addr))


def _readable(ranges: Iterable[tuple[int, int]]) -> list[bool]:
    """For each [start, end): is it inside one readable mapping of this process?"""
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            if perms[0] == "r":
                lo, hi = (int(x, 16) for x in span.split("-"))
                maps.append((lo, hi))
    maps.sort()
    starts = np.array([m[0] for m in maps], dtype=np.uint64)
    out = []
    for s, e in ranges:
        i = int(np.searchsorted(starts, np.uint64(s), side="right")) - 1
        out.append(i >= 0 and maps[i][0] <= s and e <= maps[i][1])
    return out


def _words(addr: int, nbytes: int) -> np.ndarray:
    """A writable uint64 view of memory [addr, addr + nbytes)."""
    return np.ctypeslib.as_array((ctypes.c_uint64 * (nbytes // _WORD)).from_address(addr))


def _find_layers(model: np.ndarray, n_layer: int, anchors: list[dict[str, int]]) -> tuple[int, int] | None:
    """(address, stride) of the layers array: the one vector in `model` whose i-th element holds the
    pointers of anchors[i] (suffix -> address of a tensor llama.cpp created for layer i that the file
    has), each suffix at the same offset in every layer, as fields of one struct are."""
    b, e, c = model[:-2], model[1:-1], model[2:]
    size = e - b
    ok = (b > 0) & (b < e) & (e <= c) & (b % _WORD == 0) & (size % n_layer == 0)
    stride = np.where(ok, size // max(n_layer, 1), 0)
    ok &= (stride >= _WORD) & (stride % _WORD == 0) & (stride < (1 << 20))
    cands = [(int(b[i]), int(stride[i])) for i in np.flatnonzero(ok)]
    found = []
    for (base, st), readable in zip(cands, _readable((bb, bb + st * n_layer) for bb, st in cands)):
        if readable and _fields_match(_words(base, st * n_layer).reshape(n_layer, st // _WORD), anchors):
            found.append((base, st))
    return found[0] if len(found) == 1 else None


def _fields_match(layers: np.ndarray, anchors: list[dict[str, int]]) -> bool:
    """Does every layer hold its anchors, each suffix at one offset across layers?"""
    offset: dict[str, int] = {}
    for row, want in zip(layers, anchors):
        for suffix, ptr in want.items():
            at = np.flatnonzero(row == np.uint64(ptr))
            if not len(at) or offset.setdefault(suffix, int(at[0])) != int(at[0]):
                return False
    return any(anchors)


def unlink_absent(model_ptr: int, n_layer: int, present: dict[int, dict[str, int]], absent: set[int]) -> int:
    """Clear the model's pointers to the `absent` tensors; returns how many were cleared (0: nothing
    changed). present: layer -> {name suffix: address} of tensors the file has, created for that layer."""
    if not absent or n_layer <= 0:
        return 0
    size = _usable_size(model_ptr)
    if not size or not _readable([(model_ptr, model_ptr + size)])[0]:
        log.info("absent tensors kept with neutral values: the model object's size is unknown here")
        return 0
    model = _words(model_ptr, size)
    anchors = [present.get(i, {}) for i in range(n_layer)]
    if not any(anchors):
        return 0
    where = _find_layers(model, n_layer, anchors)
    if where is None:
        log.info("absent tensors kept with neutral values: llama.cpp's layer array was not found")
        return 0
    base, stride = where
    layers = _words(base, stride * n_layer)
    targets = np.fromiter(absent, dtype=np.uint64, count=len(absent))
    cleared = 0
    for words in (layers, model):
        hit = np.isin(words, targets)
        cleared += int(hit.sum())
        words[hit] = 0
    log.debug("unlinked %d pointers to %d absent tensors", cleared, len(absent))
    return cleared
