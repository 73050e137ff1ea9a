"""llama.cpp's own converter (`convert_hf_to_gguf.py`, `conversion/`, `gguf-py/`), fetched once.

The architecture knowledge of every Hugging Face model llama.cpp converts lives there; it comes
from the sdist of the llama-cpp-python that runs the models (so converter and runtime are the same
llama.cpp), fetched with pip once and extracted into `<cache>/llama.cpp-converter-<version>/`.
`SWAPMOE_LLAMACPP_CONVERTER` may point at such a directory instead (an extracted llama.cpp tree).
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..base.errors import ConvertError
from ..base.paths import cache_dir

log = logging.getLogger(__name__)

PINNED = "0.3.36"  # llama-cpp-python whose llama.cpp the project runs (pyproject.toml)
ENV = "SWAPMOE_LLAMACPP_CONVERTER"
_WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
_MUST_HAVE = ("convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py")


def llamacpp_version() -> str:
    """The installed llama-cpp-python's version (its converter matches its runtime), else the pin."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return PINNED


def _complete(d: Path) -> bool:
    return all((d / f).exists() for f in _MUST_HAVE)


def converter_dir() -> Path:
    """The directory holding llama.cpp's converter; fetched with pip the first time."""
    env = os.environ.get(ENV)
    if env:
        d = Path(env)
        if not _complete(d):
            raise ConvertError(f"{ENV}={env}: not a llama.cpp directory (expected {', '.join(_MUST_HAVE)})")
        return d
    ver = llamacpp_version()
    final = cache_dir() / f"llama.cpp-converter-{ver}"
    if _complete(final):
        return final
    log.warning("fetching llama.cpp's converter once (llama-cpp-python==%s sdist, with pip) into %s", ver, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        _extract(_download(ver, tmp / ".sdist"), ver, tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race
            if not _complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _download(ver: str, dl: Path) -> Path:
    dl.mkdir(parents=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               f"llama-cpp-python=={ver}", "-d", str(dl)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        proc = None
    files = list(dl.glob("llama_cpp_python-*.tar.gz"))
    if proc is None or proc.returncode != 0 or not files:
        lines = [ln for ln in ((proc.stderr + proc.stdout) if proc else "timed out").splitlines() if ln.strip()]
        raise ConvertError(f"llama.cpp's converter is not cached and pip could not fetch the llama-cpp-python=={ver} "
                           f"sdist ({lines[-1].strip() if lines else 'no output'}); run once with network access, "
                           f"or set {ENV} to an extracted llama.cpp directory")
    return files[0]


def _extract(sdist: Path, ver: str, into: Path) -> None:
    with tarfile.open(sdist) as tf:
        members = []
        for m in tf.getmembers():
            parts = m.name.split("/", 1)
            if len(parts) < 2 or not parts[1].startswith("vendor/llama.cpp/"):
                continue
            rel = parts[1][len("vendor/llama.cpp/"):]
            if (m.isfile() or m.isdir()) and rel.startswith(_WANTED) and ".." not in rel.split("/"):
                m = copy.copy(m)
                m.name = rel
                members.append(m)
        tf.extractall(into, members=members, filter="data")
    if not _complete(into):
        raise ConvertError(f"{sdist.name}: no vendor/llama.cpp/convert_hf_to_gguf.py with conversion/ and gguf-py/")
