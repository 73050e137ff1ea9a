"""Runtime telemetry: counters updated by the runtime, read as immutable snapshots."""
from __future__ import annotations

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


@dataclass
class Telemetry:
    swaps: int = 0
    swap_failures: int = 0
    io_blocked_seconds: float = 0.0
    tokens: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
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

    @property
    def hit_rate(self) -> float | None:
        return self.hit_mass / self.hit_count if self.hit_count else None
