"""The calibration (`static`'s set, `swapmoe`'s prior), cached per model file, calibration text and slot count.

Calibrating runs the whole calibration text through the model (70 s for the 48-layer synthetic model
in issue #14's measurement) and gives the same ranking every time for the same inputs, so it is done
once and kept next to the device profiles (`~/.cache/swapmoe-gguf/calibration/`): each expert's
importance per token [n_moe_layer, n_expert]. The key holds what it depends on: the file's
identity (size, mtime, a hash of its first MiB), the text, the slot count S (calibration routes
among the S experts resident while it runs) and a format version.
A cache that is unreadable or for other inputs is ignored (and rewritten).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import resources
from pathlib import Path

import numpy as np

from ..base.paths import cache_dir
from ..fileformat.info import GGUFInfo
from .profile import model_fingerprint

log = logging.getLogger(__name__)
# bump when the importance score or the calibration procedure changes (2: CALIB_CHUNK windows, 3: rates)
CALIB_VERSION = 3


def default_calibration_text() -> str:
    """The calibration text that ships with the package (mixed domains, `data/calibration.txt`)."""
    return (resources.files("swapmoe_gguf") / "data" / "calibration.txt").read_text(encoding="utf-8")


def _key(info: GGUFInfo, text: str, slots: int, chunk: int) -> str:
    h = hashlib.sha256(f"v{CALIB_VERSION}|{model_fingerprint(info.path)}|S{slots}|c{chunk}|".encode())
    h.update(text.encode())
    return h.hexdigest()[:24]


def calib_path(info: GGUFInfo, text: str, slots: int, chunk: int) -> Path:
    return cache_dir() / "calibration" / f"{info.path.name}-{_key(info, text, slots, chunk)}.json"


def load(info: GGUFInfo, text: str, slots: int, chunk: int) -> np.ndarray | None:
    """The cached importance per token [n_moe_layer, n_expert], or None."""
    path = calib_path(info, text, slots, chunk)
    try:
        data = json.loads(path.read_text())
        rates = np.array(data["rates"], dtype=np.float64)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.info("ignoring unreadable calibration cache %s", path)
        return None
    if rates.shape != (len(info.moe_layers), info.n_expert) or not np.isfinite(rates).all() or (rates < 0).any():
        log.info("ignoring calibration cache %s: it does not fit this model", path)
        return None
    log.info("using cached calibration %s", path)
    return rates


def save(info: GGUFInfo, text: str, slots: int, chunk: int, rates: np.ndarray) -> None:
    """Write atomically (a reader never sees half a file); a cache that cannot be written is skipped."""
    path = calib_path(info, text, slots, chunk)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": CALIB_VERSION, "slots": slots,
                                   "rates": rates.tolist()}))
        os.replace(tmp, path)
    except OSError as e:
        log.info("calibration not cached (%s)", e)
        tmp.unlink(missing_ok=True)
