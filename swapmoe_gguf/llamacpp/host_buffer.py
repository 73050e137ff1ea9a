"""Host memory for the RAM tier in the device's own host buffer type, where it has one.

ggml devices may offer a host buffer type (`ggml_backend_dev_host_buffer_type`): CUDA's is pinned
(page-locked) memory, which the GPU reads by DMA, so `ggml_backend_tensor_set` from it skips the
driver's bounce copy through its own pinned staging. The CPU device and RPC devices offer none: the
tier is then ordinary anonymous memory (numpy), which is all a host or network copy needs.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .devices import Device, backend
from .ggml import ggml

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _host_buft_fn() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    fn = backend().lib.ggml_backend_dev_host_buffer_type
    fn.restype, fn.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    return fn


def host_buffer_type(dev: Device) -> int | None:
    """The device's host buffer type (pinned memory on CUDA), or None where it has none."""
    buft = _host_buft_fn()(dev.handle)
    return int(buft) if buft else None


@dataclass
class HostArena:
    """`nbytes` of host memory: `array` views it; `release` frees it (once)."""

    array: np.ndarray
    release: Callable[[], None] | None
    where: str  # "CUDA_Host (pinned)", or "host (numpy)"


def allocate(nbytes: int, devices: Sequence[Device]) -> HostArena | None:
    """An arena in the first offload device's host buffer type; None when no device has one (the
    caller then uses numpy) or the allocation fails (logged: pinned memory is a limited resource)."""
    for dev in devices:
        buft = host_buffer_type(dev)
        if buft is None:
            continue
        g = ggml()
        name = g.buft_name(buft)
        buf = g.lib.ggml_backend_buft_alloc_buffer(buft, nbytes)
        if not buf:
            log.info("RAM tier: %s could not allocate %d bytes; using ordinary host memory", name, nbytes)
            return None
        base = g.lib.ggml_backend_buffer_get_base(buf)
        arr = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(base))
        freed = [False]

        def release(buf: int = buf) -> None:
            if not freed[0]:
                freed[0] = True
                ggml().lib.ggml_backend_buffer_free(buf)

        return HostArena(arr, release, f"{name} (pinned)")
    return None
