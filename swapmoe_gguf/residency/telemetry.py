"""Runtime telemetry: counters updated by the runtime, read as immutable snapshots."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class TelemetrySnapshot:
    resident: dict[int, tuple[int, ...]]  # layer -> experts in slot order
    slots: int
    swaps: int
    swap_failures: int
    bytes_read: int
    read_seconds: float       # time the I/O thread spent reading
    io_blocked_seconds: float  # time decoding waited for I/O (0 unless a policy must block)
    tokens: int
    decode_tokens: int        # tokens decoded one at a time (generation)
    decode_seconds: float
    prefill_tokens: int       # tokens decoded in batches (prompts)
    prefill_seconds: float
    hit_rate: float | None    # share of the full router's top-k mass on resident experts
    rss_bytes: int
    peak_rss_bytes: int
    budget_bytes: int | None
    decode_swaps: int = 0     # swaps committed in one-token steps
    # weight buffers (expert slots included) llama.cpp allocated on each non-host buffer type, as
    # allocated ("RPC0[127.0.0.1:50052]", "CUDA0"); KV and compute buffers are not in it
    device_bytes: dict[str, int] | None = None
    vram_budget_bytes: int | None = None
    # the scheduler's own work in one-token steps: router inputs read (in C or Python), routing, Eq. 1,
    # hit counting, swap decisions and commits; summed seconds (per token: / decode_tokens)
    decode_sched_seconds: float = 0.0
    # the host RAM tier (store/ram_tier.py): its capacity, experts held, reads it answered (no disk I/O)
    ram_tier_bytes: int = 0
    ram_tier_experts: int = 0
    tier_hits: int = 0

    @property
    def sched_us_per_token(self) -> float | None:
        return 1e6 * self.decode_sched_seconds / self.decode_tokens if self.decode_tokens else None


@dataclass
class Telemetry:
    swaps: int = 0
    swap_failures: int = 0
    io_blocked_seconds: float = 0.0
    tokens: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_swaps: int = 0      # swaps committed in one-token steps (the floor's on-demand loads among them)
    decode_sched_seconds: float = 0.0  # see TelemetrySnapshot
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    hit_mass: float = 0.0      # sum over (token, layer) of the hit share
    hit_count: int = 0
    peak_rss_bytes: int = 0

    def add_hits(self, shares: "list[float] | object") -> None:
        import numpy as np

        s = np.asarray(shares, dtype=np.float64).ravel()
        self.hit_mass += float(s.sum())
        self.hit_count += int(s.size)

    def add_hit_sums(self, mass: float, count: int) -> None:
        """Shares summed elsewhere (the router tap's C kernel)."""
        self.hit_mass += mass
        self.hit_count += count

    @property
    def hit_rate(self) -> float | None:
        return self.hit_mass / self.hit_count if self.hit_count else None


class RssProbe:
    """The process's resident set size, cheap enough to read on every decode step: one pread of
    /proc/self/statm on Linux (psutil opens and parses a file per call: ~150 us, measured as 3-5 % of
    a small model's step), psutil elsewhere. The same number as psutil's `rss`."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        try:
            self._fd: int | None = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._fd = None

    def __call__(self) -> int:
        if self._fd is not None:
            return int(os.pread(self._fd, 128, 0).split()[1]) * self._page
        import psutil  # not Linux, or closed

        return int(psutil.Process().memory_info().rss)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
