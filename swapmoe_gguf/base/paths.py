"""Where swapmoe keeps its caches (converted demo model, device profiles)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/swapmoe-gguf`, or `~/.cache/swapmoe-gguf`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "swapmoe-gguf"
