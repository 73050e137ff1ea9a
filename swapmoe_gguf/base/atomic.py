"""Atomic output files: write to a temporary sibling, rename on success, remove on failure.

Temporaries are named `.<name>.swapmoe-<pid>.partial*`; a later run removes those whose
process is gone (for instance after SIGKILL), so nothing stray accumulates.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

import psutil

from .errors import OutputExistsError, SwapMoEError

log = logging.getLogger(__name__)


def _temps(dst: Path) -> list[Path]:
    return list(dst.parent.glob(f".{dst.name}.swapmoe-*.partial*"))


def remove_stale(dst: Path) -> None:
    for p in _temps(dst):
        try:
            pid = int(p.name.rsplit(".swapmoe-", 1)[1].split(".", 1)[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not psutil.pid_exists(pid):
            log.info("removing stale temporary %s", p)
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(dst: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `dst`; it becomes `dst` only if the block succeeds."""
    dst = Path(dst)
    if dst.is_dir():
        raise OutputExistsError(f"{dst}: is a directory, expected an output file path")
    if dst.exists() and not force:
        raise OutputExistsError(f"{dst}: already exists (use --force to overwrite)")
    if not dst.parent.is_dir():
        raise SwapMoEError(f"{dst.parent}: output directory does not exist")
    remove_stale(dst)
    tmp = dst.parent / f".{dst.name}.swapmoe-{os.getpid()}.partial"
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        for p in _temps(dst):
            if f".swapmoe-{os.getpid()}.partial" in p.name:
                p.unlink(missing_ok=True)
