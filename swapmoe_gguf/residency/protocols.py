"""What residency code may use of the runtime, as protocols, so that it never imports the runtime.

`runtime.SwapMoELlama` satisfies `Runtime`; policies (`policies.py`) satisfy `ResidencyPolicy`.
The profiler (`planning.profile`) drives a `Runtime` built by the caller's factory.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol, Sequence

if TYPE_CHECKING:
    import numpy as np

    from ..llamacpp.expert_compute import ExpertFFN
    from ..llamacpp.router import FullRouter, RouterBatch, RouterTap
    from ..llamacpp.vmodel import VirtualExpertModel
    from ..store.expert_store import StagedExpert
    from .telemetry import Telemetry


class ResidencyPolicy(Protocol):
    """Decides swaps. Called on the decoding thread; must not block on I/O (except `exact`)."""

    name: str
    observes: bool        # needs the router tap
    owns_hit_rate: bool   # reports the hit rate itself

    def on_router(self, rt: "Runtime", batch: "RouterBatch") -> None: ...

    def before_decode(self, rt: "Runtime") -> None: ...

    def scores_due(self, rt: "Runtime") -> bool:
        """Whether the decode steps the router tap has gathered must be scored now."""
        ...


class Runtime(Protocol):
    """The runtime as policies and the profiler see it: its slot model, router tap and full router,
    counters, pending swaps, and llama-cpp-python's `eval`/`reset`."""

    vmodel: "VirtualExpertModel"
    tap: "RouterTap"
    full_router: "FullRouter"
    telemetry_: "Telemetry"
    policy: ResidencyPolicy
    expert_ffn: "dict[int, ExpertFFN]"
    pending: "list[tuple[int, int, int, Future[StagedExpert]]]"  # (layer, slot, expert, read)
    miss_cpu_tokens: int  # slots on a device: misses used by at most this many tokens are computed on the CPU
    input_ids: "np.ndarray"

    def eval(self, tokens: Sequence[int]) -> None: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...

    def n_ctx_seq(self) -> int: ...

    def lossless_ubatch(self) -> int: ...

    def request_swap(self, layer: int, slot: int, expert: int) -> None: ...

    def apply_pending(self, wait: bool = False, limit: int | None = None) -> int: ...


class RuntimeFactory(Protocol):
    """Builds a runtime for a model file (the caller passes `runtime.SwapMoELlama`)."""

    def __call__(self, model_path: str, **kwargs: Any) -> Runtime: ...
