"""Expert norms ||E_i|| for a GGUF run in place (not converted), computed once and cached.

A swap-ready file carries `swapmoe.expert_norms`; a GGUF downloaded as llama.cpp writes it does
not. Its norms are computed from the dequantized expert tensors exactly as the converter does
(`ExpertNorms`: gate, up and down of expert i together) and kept in a small
sidecar, `<cache>/norms/<name>-<key>.npz`, where the key hashes the identity of every file of
the model (resolved path, size, mtime) and its first MiB (the header). Change the file and the
key changes; a stale or unreadable sidecar is recomputed.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np

from ..base.paths import cache_dir
from .info import GGUFInfo, dequantize

log = logging.getLogger(__name__)

NORMS_VERSION = 1
_HEADER_BYTES = 1 << 20

# counters, for tests and logs: how often norms were computed vs. read back from a sidecar
stats = {"computed": 0, "cache_hits": 0}


# Tensors whose squared entries make up ||E_i|| (weights of the expert's FFN, not biases/scales).
_NORM_KINDS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight", "ffn_gate_up_exps.weight")


def counts_for_norm(name: str) -> bool:
    return name.endswith(_NORM_KINDS)


class ExpertNorms:
    """Accumulates ||E_i||^2 per (MoE layer, expert) while expert slices stream past: gate, up and
    down of expert i together (the converters and `compute_norms` alike)."""

    def __init__(self, moe_layers: list[int], n_expert: int):
        self.moe_layers = moe_layers
        self.row = {layer: i for i, layer in enumerate(moe_layers)}
        self.sq = np.zeros((len(moe_layers), n_expert), dtype=np.float64)  # [n_moe_layer, n_expert]

    def add(self, layer: int, expert: int, data: np.ndarray) -> None:
        d = np.asarray(data, dtype=np.float32)
        self.sq[self.row[layer], expert] += float(np.dot(d.ravel(), d.ravel()))

    def values(self) -> np.ndarray:
        return np.sqrt(self.sq).astype(np.float32)  # [n_moe_layer, n_expert]


def norms_dir() -> Path:
    return cache_dir() / "norms"


def file_identity(info: GGUFInfo) -> str:
    """Hash of what identifies the model's bytes without reading them all."""
    h = hashlib.sha256(f"v{NORMS_VERSION}".encode())
    for p in info.paths:
        st = p.stat()
        h.update(f"|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    with open(info.paths[0], "rb") as f:
        h.update(f.read(_HEADER_BYTES))
    return h.hexdigest()[:24]


def sidecar_path(info: GGUFInfo) -> Path:
    return norms_dir() / f"{info.path.name}-{file_identity(info)}.npz"


def compute_norms(info: GGUFInfo) -> np.ndarray:
    """[n_moe_layer, n_expert] ||E_i||, reading one expert slice at a time (buffered, page cache dropped)."""
    acc = ExpertNorms(info.moe_layers, info.n_expert)
    fds = [os.open(p, os.O_RDONLY) for p in info.paths]
    try:
        for t in info.expert_tensors:
            if not counts_for_norm(t.name) or t.block not in acc.row:
                continue
            buf = np.empty(t.expert_nbytes, dtype=np.uint8)
            for e in range(t.n_expert):
                start, end = t.expert_range(e)
                if os.preadv(fds[t.file], [buf], start) != end - start:
                    from ..base.errors import GGUFFormatError

                    raise GGUFFormatError(f"{info.paths[t.file]}: short read of {t.name} (file truncated?)")
                acc.add(t.block, e, dequantize(buf, t.qtype, t.shape[1:]))  # type: ignore[arg-type]
                os.posix_fadvise(fds[t.file], start, end - start, os.POSIX_FADV_DONTNEED)
    finally:
        for fd in fds:
            os.close(fd)
    return acc.values()


def load_or_compute(info: GGUFInfo) -> np.ndarray:
    """The norms of `info` from its sidecar, or computed (and the sidecar written)."""
    shape = (len(info.moe_layers), info.n_expert)
    path = sidecar_path(info)
    try:
        with np.load(path, allow_pickle=False) as z:
            norms = np.asarray(z["norms"], dtype=np.float32)
            if (norms.shape == shape and int(z["version"]) == NORMS_VERSION
                    and list(z["moe_layers"]) == list(info.moe_layers) and np.isfinite(norms).all()):
                stats["cache_hits"] += 1
                log.debug("expert norms of %s from %s", info.path, path)
                return norms
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, EOFError) as e:  # corrupt or foreign: recompute
        log.info("ignoring unreadable expert-norms cache %s (%s)", path, e)
    log.info("%s has no swapmoe.expert_norms (not converted): computing them once from its %.2f GiB of experts",
             info.path, (info.total_bytes - info.non_expert_bytes) / 2**30)
    t0 = time.perf_counter()
    norms = compute_norms(info)
    stats["computed"] += 1
    log.info("computed expert norms of %s in %.1f s (cached in %s)", info.path, time.perf_counter() - t0, path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, norms=norms, moe_layers=np.asarray(info.moe_layers, dtype=np.int32),
                     version=np.int32(NORMS_VERSION))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot cache expert norms in %s (%s); they will be recomputed next time", path, e)
        with contextlib.suppress(OSError):
            tmp.unlink()
    return norms


def ensure_expert_norms(info: GGUFInfo) -> np.ndarray:
    """`info.expert_norms`, filled from the sidecar cache when the file has none."""
    if info.expert_norms is None:
        info.set_expert_norms(load_or_compute(info))
    return info.expert_norms  # type: ignore[return-value]

