"""The embedded default model: the shipped checkpoint, its held-out text, its swap-ready GGUF.

`data/multidomain-moe` is a 32-expert, top-4 Mixtral-architecture model trained from scratch on
Shakespeare, encyclopedic English, Python and C (bench/train_default_moe.py); it is converted
once into the user cache, so nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import sys
from importlib import resources
from pathlib import Path

from ..base.paths import cache_dir
from . import convert


def shipped_checkpoint() -> Path:
    return Path(str(resources.files("swapmoe_gguf") / "data" / "multidomain-moe"))


def shipped_heldout() -> list[Path]:
    """The default model's held-out text, one file per training domain (never trained on)."""
    return sorted((shipped_checkpoint() / "heldout").glob("*.txt"))


def default_model(directory: Path | None = None, force: bool = False) -> Path:
    """The embedded default model as a swap-ready F16 GGUF, converted once into the cache."""
    ckpt = shipped_checkpoint()
    digest = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()[:12]
    gguf = (directory or cache_dir() / "default") / f"{ckpt.name}-{digest}-f16.gguf"
    if force or not gguf.is_file():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        print(f"converting the embedded default model to {gguf}", file=sys.stderr)
        # F16: an expert's 96 x 192 matrices are 9 pages each, so every expert slice is page-aligned.
        convert(ckpt, gguf, "f16", force=True)
    return gguf
