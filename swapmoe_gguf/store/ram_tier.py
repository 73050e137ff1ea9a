"""The host RAM tier: a bounded cache of experts' bytes in host memory, below the device slots.

A swap (or an `exact`/floor miss) whose expert the tier holds reads RAM, not the disk: the expert
store answers it at once with a view of the tier's block (`ExpertStore.submit`, `read`, `stream`).
The tier is filled by the reads the store does anyway (every expert read from disk for a swap or a
miss is copied in) and by `ExpertStore.warm` (the next-most-important experts beyond the slots,
read straight into tier blocks on a low-priority thread).

Memory: one arena of `capacity` bytes cut into equal page-aligned blocks of one expert each (the
largest expert of any layer, rounded up to a page, so O_DIRECT can read into them). The arena is
the caller's (a backend's pinned host buffer, see llamacpp/host_buffer.py) or an anonymous map
(numpy); an anonymous map is resident only as blocks are first written, the budget counts it whole.

Eviction: with a `value` callback (layer -> [n_expert] importance, higher is kept; the runtime
gives the scheduler's scores with the experts in slots lowest, since a slot already holds them),
the least valuable of the SCAN least recently used entries goes, and an expert less valuable than
that is not admitted; without one, the least recently used. A block handed out (pinned) is neither evicted nor reused
until its reader gives it back.
"""
from __future__ import annotations

import contextlib
import mmap
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..base.errors import SwapMoEError

PAGE = mmap.PAGESIZE
SCAN = 1024  # entries an eviction compares at most (the least recently used ones)


class RamTierError(SwapMoEError):
    pass


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    inserts: int = 0
    evictions: int = 0
    refused: int = 0      # not admitted: less valuable than everything cached, or every block pinned


@dataclass
class _Entry:
    block: int
    nbytes: int
    pins: int = 0
    ready: bool = False   # False while a warm read fills the block


def block_size(expert_nbytes: int) -> int:
    """One tier block: the expert's bytes rounded up to a page (O_DIRECT reads need page alignment)."""
    return -(-max(1, expert_nbytes) // PAGE) * PAGE


class RamTier:
    """Experts' bytes per (layer, expert), at most `capacity` bytes. Thread-safe."""

    def __init__(self, capacity: int, expert_nbytes: int, *, arena: np.ndarray | None = None,
                 release: Callable[[], None] | None = None, where: str = "host (numpy)"):
        if capacity < 0:
            raise RamTierError(f"RAM tier capacity must be >= 0 bytes, got {capacity}")
        self.block = block_size(expert_nbytes)
        self.n_blocks = capacity // self.block
        self.capacity = self.n_blocks * self.block
        self.where = where
        self._map: mmap.mmap | None = None
        if arena is None:
            self._map = mmap.mmap(-1, max(self.capacity, PAGE))
            arena = np.frombuffer(self._map, dtype=np.uint8)
        elif arena.nbytes < self.capacity or arena.dtype != np.uint8:
            raise RamTierError(f"RAM tier arena is {arena.nbytes} bytes of {arena.dtype}, expected "
                               f">= {self.capacity} bytes of uint8")
        self._arena, self._release = arena, release
        self._free = list(range(self.n_blocks - 1, -1, -1))
        self._entries: OrderedDict[tuple[int, int], _Entry] = OrderedDict()  # least recently used first
        self._key_of: dict[int, tuple[int, int]] = {}  # block -> its (layer, expert)
        self._lock = threading.Lock()
        self.value: Callable[[int], np.ndarray] | None = None
        self.stats = TierStats()

    # reading --------------------------------------------------------------------------------
    def view(self, block: int, nbytes: int | None = None) -> np.ndarray:
        start = block * self.block
        return self._arena[start:start + (self.block if nbytes is None else nbytes)]

    def get(self, layer: int, expert: int) -> tuple[int, np.ndarray] | None:
        """(block, the expert's bytes) pinned until `unpin(block)`, or None (counted as a miss)."""
        with self._lock:
            ent = self._entries.get((layer, expert))
            if ent is None or not ent.ready:
                self.stats.misses += 1
                return None
            ent.pins += 1
            self._entries.move_to_end((layer, expert))
            self.stats.hits += 1
            return ent.block, self.view(ent.block, ent.nbytes)

    def unpin(self, block: int) -> None:
        with self._lock:
            ent = self._entries.get(self._key_of.get(block, (-1, -1)))
            if ent is not None and ent.pins:
                ent.pins -= 1
                return
        raise RamTierError(f"RAM tier block {block} was not handed out")

    def __contains__(self, key: tuple[int, int]) -> bool:
        ent = self._entries.get(key)
        return ent is not None and ent.ready

    def __len__(self) -> int:
        with self._lock:
            return sum(e.ready for e in self._entries.values())

    def keys(self) -> list[tuple[int, int]]:
        with self._lock:
            return [k for k, e in self._entries.items() if e.ready]

    # filling --------------------------------------------------------------------------------
    def put(self, layer: int, expert: int, data: np.ndarray) -> bool:
        """Copy an expert's bytes in (after a disk read); False when it is not admitted."""
        got = self.reserve(layer, expert, data.nbytes)
        if got is None:
            return False
        block, out = got
        out[:] = data.reshape(-1).view(np.uint8)
        self.publish(block)
        return True

    def reserve(self, layer: int, expert: int, nbytes: int) -> tuple[int, np.ndarray] | None:
        """A block to read the expert into (evicting if need be), invisible until `publish`, freed by
        `abort`; None when cached already or not admitted."""
        if nbytes > self.block:
            raise RamTierError(f"expert of {nbytes} bytes does not fit a RAM tier block of {self.block}")
        with self._lock:
            if (layer, expert) in self._entries or not self.n_blocks:
                return None
            if not self._free and not self._evict_for(layer, expert):
                self.stats.refused += 1
                return None
            block = self._free.pop()
            self._entries[(layer, expert)] = _Entry(block, nbytes)
            self._key_of[block] = (layer, expert)
            return block, self.view(block, nbytes)

    def publish(self, block: int) -> None:
        with self._lock:
            ent = self._entries[self._key_of[block]]
            ent.ready = True
            self.stats.inserts += 1

    def abort(self, block: int) -> None:
        with self._lock:
            key = self._key_of.get(block)
            if key is not None and not self._entries[key].ready:
                del self._entries[key], self._key_of[block]
                self._free.append(block)

    def _evict_for(self, layer: int, expert: int) -> bool:
        """Free one block for (layer, expert) (lock held): the least valuable unpinned entry among the
        SCAN least recently used, if it is worth less than the newcomer; without values the least
        recently used. (The scan is bounded: this runs on the decoding thread for `exact`'s loads.)"""
        values: dict[int, list[float]] = {}

        def val(l: int, x: int) -> float:
            v = values.get(l)
            if v is None:
                v = values[l] = np.asarray(self.value(l), dtype=np.float64).tolist()  # type: ignore[misc]
            return v[x]

        best: tuple[tuple[int, int], _Entry] | None = None
        best_v, seen = 0.0, 0
        for key, ent in self._entries.items():  # least recently used first: ties go to the older
            if ent.pins or not ent.ready:
                continue
            if self.value is None:
                best = (key, ent)
                break
            v = val(*key)
            if best is None or v < best_v:
                best, best_v = (key, ent), v
            seen += 1
            if seen >= SCAN:
                break
        if best is None or (self.value is not None and best_v > val(layer, expert)):
            return False
        key, ent = best
        del self._entries[key], self._key_of[ent.block]
        self._free.append(ent.block)
        self.stats.evictions += 1
        return True

    def close(self) -> None:
        """Free the arena. Nothing may hold a block any more."""
        with self._lock:
            self._entries.clear()
            self._key_of.clear()
            self._free = []
            self.n_blocks = 0
        self._arena = np.zeros(0, dtype=np.uint8)
        if self._release is not None:
            self._release()
            self._release = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still alive: the map goes with it
                self._map.close()
            self._map = None
