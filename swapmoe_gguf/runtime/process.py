"""Process-wide settings the runtime needs: freed memory goes back to the OS, BLAS stays on one thread."""
from __future__ import annotations

from typing import Callable


def _glibc_release_large_blocks() -> Callable[[], None]:
    """Make freed model memory go back to the OS (glibc): with its default, the threshold above which
    malloc uses mmap grows after each large free, so a rebuilt model's old buffers stay in the heap
    and RSS creeps past the budget. Fixing the threshold at 1 MiB keeps large blocks mmap'ed."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        return lambda: None


_trim = _glibc_release_large_blocks()


def release_memory() -> None:
    """Return freed heap memory to the system (after a model is closed)."""
    _trim()


def single_threaded_blas() -> None:
    """numpy's BLAS scores the routers; its worker threads keep spinning after each matmul and took
    the cores from llama.cpp's threads (measured: the five decode steps after a scored prompt ran
    at half speed). The router matmuls are small, so one BLAS thread is plenty; llama.cpp owns the
    cores. Process-wide, as BLAS thread pools are."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
