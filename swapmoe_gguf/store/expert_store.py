"""Expert store: reads one expert's bytes (all its tensors in one layer) from a GGUF.

Reads use `os.preadv` into reusable staging buffers on one background thread (the read
releases the GIL, so decoding continues). When every expert slice is page-aligned (the
swap-ready layout) they use O_DIRECT into page-aligned buffers: the disk DMAs straight into the
buffer, no CPU copies the bytes and the page cache is left alone. Otherwise (or where O_DIRECT
is refused) reads are buffered and `posix_fadvise(DONTNEED)` drops the pages afterwards, so the
page cache does not quietly hold the whole model. A GGUF that was not converted (llama.cpp's
32-byte alignment, possibly split into shards) is read in place the same way, buffered: one
descriptor per shard, each tensor read from the file it is in. A read error or short read raises
`ExpertReadError` from the future; callers keep the experts they have.
"""
from __future__ import annotations

import contextlib
import logging
import mmap
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..base.errors import SwapMoEError
from ..fileformat.info import GGUFInfo, TensorEntry
from .ram_tier import RamTier

log = logging.getLogger(__name__)
_told_in_place: set[str] = set()  # files whose in-place (unconverted) reads were logged once


class ExpertReadError(SwapMoEError):
    pass


@dataclass
class StagedExpert:
    """One expert's bytes, read and waiting to be committed into a slot."""

    layer: int
    expert: int
    parts: dict[str, np.ndarray]  # expert tensor name -> this expert's slice (a view of `buf`)
    buf: np.ndarray
    read_seconds: float
    tier_block: int = -1  # >= 0: `buf` is this block of the RAM tier (pinned until released), no disk read


@dataclass
class StoreStats:
    reads: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    errors: int = 0
    tier_hits: int = 0       # reads the RAM tier answered (no disk I/O)
    warm_reads: int = 0      # experts read from disk into the RAM tier ahead of need (`warm`)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class _ReadThread:
    """One daemon thread running reads in order. Not a ThreadPoolExecutor: its worker is joined at
    interpreter exit, and a read waiting for a staging buffer that nobody will release (a model
    never closed) would then hang the exit."""

    def __init__(self, nice: int = 10, name: str = "swapmoe-io") -> None:
        self._q: queue.SimpleQueue[tuple[Future, Callable[[], StagedExpert]] | None] = queue.SimpleQueue()
        self._nice = nice
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Lower CPU priority for background swaps: the reads are DMA and need little CPU, while
        # llama.cpp's threads wait for each other at every graph barrier, so a read preempting one
        # of them stalls them all. Measured on 2 vCPUs: what one swap adds to a decode step 1.4-1.9
        # ms at nice 0, 0.9 at 10, 0.4 at 19; but at 19 the starved reads land so late that the
        # default model's KL at half the experts rose from 0.31 to 0.38 (0.33 at 10). Streams
        # (below) run at nice 0: the decoding thread waits for them.
        if self._nice:
            with contextlib.suppress(AttributeError, OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
        while (item := self._q.get()) is not None:
            fut, fn = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - delivered through the future
                    fut.set_exception(e)

    def submit(self, fn: Callable[[], StagedExpert]) -> Future[StagedExpert]:
        fut: Future[StagedExpert] = Future()
        self._q.put((fut, fn))
        return fut

    def shutdown(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)  # bounded: at interpreter exit a daemon thread may be frozen


class ExpertStore:
    def __init__(self, info: GGUFInfo, staging_buffers: int = 2, drop_cache: bool = True, reserved: int = 0):
        self.info, self.path, self.drop_cache = info, info.path, drop_cache
        self.layers: dict[int, list[TensorEntry]] = {l: info.layer_expert_tensors(l) for l in info.moe_layers}
        self.expert_nbytes = {l: sum(t.expert_nbytes for t in ts) for l, ts in self.layers.items()}
        self.max_expert_nbytes = max(self.expert_nbytes.values())
        self.paths = list(info.paths)  # shards of a split GGUF; TensorEntry.file indexes them
        self.fds: list[int] = []
        self.direct_fds: list[int] = []
        try:
            for p in self.paths:
                self.fds.append(os.open(p, os.O_RDONLY))
            if info.slices_aligned and hasattr(os, "O_DIRECT"):
                for p in self.paths:
                    try:
                        self.direct_fds.append(os.open(p, os.O_RDONLY | os.O_DIRECT))
                    except OSError:  # e.g. tmpfs: no O_DIRECT
                        self.direct_fds.append(-1)
        except OSError:
            self._close_fds()
            raise
        if not self.direct_fds:
            self.direct_fds = [-1] * len(self.paths)
        if info.layout_problem() and str(self.path) not in _told_in_place:
            _told_in_place.add(str(self.path))
            log.info("%s is not swap-ready (%s): reading experts in place, buffered; `swapmoe convert %s -o NEW.gguf` "
                     "gives page-aligned O_DIRECT reads", self.path, info.layout_problem(), self.path)
        self.stats = StoreStats()
        # A fixed pool of staging buffers bounds the memory of in-flight swaps. Anonymous maps are
        # page-aligned, as O_DIRECT needs.
        # `reserved` more serve synchronous reads only: a read on the decoding thread (the quality floor)
        # must not wait for a buffer held by a finished background read, which commits only between
        # decode steps (it would wait forever).
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        self._sync_free: queue.Queue[np.ndarray] = queue.Queue()
        self._maps = [mmap.mmap(-1, self.max_expert_nbytes) for _ in range(staging_buffers + reserved)]
        for i, m in enumerate(self._maps):
            (self._free if i < staging_buffers else self._sync_free).put(np.frombuffer(m, dtype=np.uint8))
        self._reserved_at = {np.frombuffer(m, dtype=np.uint8).ctypes.data for m in self._maps[staging_buffers:]}
        self.staging_buffers, self.reserved = staging_buffers, reserved
        self.staging_bytes = (staging_buffers + reserved) * self.max_expert_nbytes
        self._pool = _ReadThread()
        self._stream_pool: _ReadThread | None = None  # started by the first stream
        self._warned = False
        self.tier: RamTier | None = None  # the host RAM tier (attach_tier), owned by the caller
        self._warm_thread: threading.Thread | None = None
        self._warm_stop = threading.Event()

    # compatibility: the first (or only) file's descriptors
    @property
    def fd(self) -> int:
        return self.fds[0] if self.fds else -1

    @property
    def direct_fd(self) -> int:
        return self.direct_fds[0] if self.direct_fds else -1

    def pread(self, offset: int, n: int, file: int = 0) -> np.ndarray:
        """`n` bytes at `offset` of file `file` (buffered), or ExpertReadError on a short read."""
        buf = np.empty(n, dtype=np.uint8)
        if n and os.preadv(self.fds[file], [buf], offset) != n:
            raise ExpertReadError(f"{self.paths[file]}: short read of {n} bytes at {offset} (file truncated?)")
        return buf

    def read_slice(self, t: TensorEntry, expert: int, out: np.ndarray) -> None:
        start, end = t.expert_range(expert)
        f = t.file
        if self.direct_fds[f] >= 0 and out.ctypes.data % mmap.PAGESIZE == 0:
            try:
                got = os.preadv(self.direct_fds[f], [out], start)
                if got == end - start:
                    return
            except OSError as e:
                if e.errno != 22:  # EINVAL: this file system wants other alignment; fall back for good
                    raise
                log.info("O_DIRECT refused for %s; using buffered reads", self.paths[f])
                os.close(self.direct_fds[f])
                self.direct_fds[f] = -1
        got = os.preadv(self.fds[f], [out], start)
        if got != end - start:
            raise ExpertReadError(f"{self.paths[f]}: short read of {t.name} expert {expert}: "
                                  f"{got} of {end - start} bytes")
        if self.drop_cache:
            os.posix_fadvise(self.fds[f], start, end - start, os.POSIX_FADV_DONTNEED)

    def read(self, layer: int, expert: int, timeout: float | None = None, sync: bool = False) -> StagedExpert:
        """Read synchronously into a staging buffer (blocks until one is free). `sync`: a read on the
        decoding thread, which takes a reserved buffer when the store has one. An expert the RAM tier
        holds comes from there (no disk I/O, no staging buffer); one read from disk is copied in."""
        hit = self._from_tier(layer, expert)
        if hit is not None:
            return hit
        buf = self._sync_free.get() if sync and self.reserved else self._free.get(timeout=timeout)
        t0 = time.perf_counter()
        try:
            parts, off = {}, 0
            for t in self.layers[layer]:
                view = buf[off:off + t.expert_nbytes]
                self.read_slice(t, expert, view)
                parts[t.name] = view
                off += t.expert_nbytes
        except (OSError, ExpertReadError) as e:
            self._give_back(buf)
            with self.stats.lock:
                self.stats.errors += 1
            if not self._warned:
                log.warning("expert read failed (keeping resident experts): %s", e)
                self._warned = True
            if isinstance(e, ExpertReadError):
                raise
            raise ExpertReadError(f"{self.path}: reading layer {layer} expert {expert}: {e}") from None
        dt = time.perf_counter() - t0
        with self.stats.lock:
            self.stats.reads += 1
            self.stats.bytes_read += off
            self.stats.read_seconds += dt
        if self.tier is not None:  # read once from disk: kept in RAM while the tier values it
            self.tier.put(layer, expert, buf[:off])
        return StagedExpert(layer, expert, parts, buf, dt)

    def _parts(self, layer: int, buf: np.ndarray) -> dict[str, np.ndarray]:
        parts, off = {}, 0
        for t in self.layers[layer]:
            parts[t.name] = buf[off:off + t.expert_nbytes]
            off += t.expert_nbytes
        return parts

    def _from_tier(self, layer: int, expert: int) -> StagedExpert | None:
        """The expert as the RAM tier holds it (pinned until `release`), or None."""
        if self.tier is None:
            return None
        got = self.tier.get(layer, expert)
        if got is None:
            return None
        block, buf = got
        with self.stats.lock:
            self.stats.tier_hits += 1
        return StagedExpert(layer, expert, self._parts(layer, buf), buf, 0.0, tier_block=block)

    def _done(self, staged: StagedExpert) -> Future[StagedExpert]:
        fut: Future[StagedExpert] = Future()
        fut.set_running_or_notify_cancel()
        fut.set_result(staged)
        return fut

    def submit(self, layer: int, expert: int) -> Future[StagedExpert]:
        """Read on the background thread; an expert the RAM tier holds is a completed future at once."""
        hit = self._from_tier(layer, expert)
        if hit is not None:
            return self._done(hit)
        return self._pool.submit(lambda: self.read(layer, expert))

    def attach_tier(self, tier: RamTier | None) -> None:
        """Serve and fill reads through `tier` (None: detach). The tier stays the caller's to close."""
        self.stop_warm()
        self.tier = tier

    def warm(self, order: list[tuple[int, int]]) -> None:
        """Read these (layer, expert) pairs, most wanted first, straight into the RAM tier on a
        low-priority thread, until the tier admits no more (it is full of experts worth more).
        Swaps and misses go first: they have their own threads; this one runs at nice 19."""
        self.stop_warm()
        if self.tier is None or not order:
            return
        self._warm_stop.clear()
        self._warm_thread = threading.Thread(target=self._warm, args=(self.tier, list(order)),
                                             name="swapmoe-warm", daemon=True)
        self._warm_thread.start()

    def _warm(self, tier: RamTier, order: list[tuple[int, int]]) -> None:
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        for layer, expert in order:
            if self._warm_stop.is_set():
                return
            if (layer, expert) in tier:
                continue
            got = tier.reserve(layer, expert, self.expert_nbytes[layer])
            if got is None:
                if (layer, expert) in tier:
                    continue
                return  # not admitted: the rest of the order is worth even less
            block, buf = got
            t0 = time.perf_counter()
            try:
                off = 0
                for t in self.layers[layer]:
                    self.read_slice(t, expert, buf[off:off + t.expert_nbytes])
                    off += t.expert_nbytes
            except (OSError, ExpertReadError) as e:
                tier.abort(block)
                log.info("RAM tier warm-up stopped: %s", e)
                return
            tier.publish(block)
            with self.stats.lock:
                self.stats.warm_reads += 1
                self.stats.bytes_read += off
                self.stats.read_seconds += time.perf_counter() - t0

    def wait_warm(self, timeout: float | None = None) -> bool:
        """Wait for `warm` to finish; True when it has."""
        th = self._warm_thread
        if th is not None:
            th.join(timeout)
            return not th.is_alive()
        return True

    def stop_warm(self) -> None:
        self._warm_stop.set()
        if self._warm_thread is not None:
            self._warm_thread.join(timeout=30)
            self._warm_thread = None

    def stream(self, layer: int, experts: list[int]) -> "ExpertStream":
        """Read `experts` of `layer` in this order on a dedicated thread (not the background swaps'
        one, whose reads may wait for buffers that commit only between decode steps), into the
        synchronous buffers, each as soon as the caller gave the one before back: the reads overlap
        whatever the caller computes meanwhile. Iterate it, release each expert, close it."""
        if self._stream_pool is None:
            self._stream_pool = _ReadThread(nice=0, name="swapmoe-stream")
        pool = self._stream_pool
        futures = []
        for e in experts:  # the RAM tier's experts are there at once: decoding never waits on the disk for them
            hit = self._from_tier(layer, e)
            futures.append(self._done(hit) if hit is not None else
                           pool.submit(lambda e=e: self.read(layer, e, sync=True)))
        return ExpertStream(self, futures)

    def release(self, staged: StagedExpert) -> None:
        """Give a staging buffer (or a RAM tier block) back once its bytes are committed (or dropped)."""
        if staged.tier_block >= 0:
            if self.tier is not None:
                self.tier.unpin(staged.tier_block)
            return
        self._give_back(staged.buf)

    def _give_back(self, buf: np.ndarray) -> None:
        (self._sync_free if buf.ctypes.data in self._reserved_at else self._free).put(buf)

    def _close_fds(self) -> None:
        for fd in (*self.fds, *self.direct_fds):
            if fd >= 0:
                os.close(fd)
        self.fds, self.direct_fds = [], []

    def close(self) -> None:
        self.stop_warm()
        self._pool.shutdown()
        if self._stream_pool is not None:
            self._stream_pool.shutdown()
        self._close_fds()


class ExpertStream:
    """Reads in flight for one layer (ExpertStore.stream): yields each expert's StagedExpert, or the
    ExpertReadError of its read, in order. What it yielded is the caller's to release."""

    def __init__(self, store: ExpertStore, futures: list[Future[StagedExpert]]):
        self.store, self.futures = store, futures
        self._handed = 0  # futures whose result went to the caller

    def __iter__(self) -> "Iterator[StagedExpert | ExpertReadError]":
        while self._handed < len(self.futures):
            fut = self.futures[self._handed]
            self._handed += 1
            try:
                yield fut.result()
            except ExpertReadError as e:
                yield e

    def close(self) -> None:
        """Cancel the reads not started; wait for the others and give their buffers back (the caller
        has released what it took, so a read waiting for a buffer gets one)."""
        rest = self.futures[self._handed:]
        self._handed = len(self.futures)
        for fut in rest:
            fut.cancel()
        for fut in rest:
            if not fut.cancelled():
                with contextlib.suppress(Exception):
                    self.store.release(fut.result(timeout=30))
