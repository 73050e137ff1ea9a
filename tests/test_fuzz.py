"""Bounded fuzzing of the file readers: every mutated file yields a clean SwapMoEError, never a
crash, a hang or another exception. Longer runs: raise SWAPMOE_FUZZ_SECONDS."""
from __future__ import annotations

import os
import random
import shutil
import time

import pytest

from swapmoe_gguf.converters import convert
from swapmoe_gguf.converters.safetensors_io import Checkpoint
from swapmoe_gguf.errors import SwapMoEError
from swapmoe_gguf.gguf_info import read_gguf
from swapmoe_gguf.inspect import summary

SECONDS = float(os.environ.get("SWAPMOE_FUZZ_SECONDS", "6"))


def _mutate(rng: random.Random, data: bytes, hot: int) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(0, min(len(b), hot))
        b[i] = rng.choice((0, 0xFF, rng.randrange(256)))
    if rng.random() < 0.3:
        b = b[: rng.randrange(len(b))]
    return bytes(b)


def test_fuzz_gguf_inspect_and_relayout(tiny_gguf, tmp_path):
    src = open(tiny_gguf, "rb").read()
    rng = random.Random(1234)
    path, out = tmp_path / "f.gguf", tmp_path / "o.gguf"
    n = 0
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        path.write_bytes(_mutate(rng, src, 16384))  # the metadata and tensor infos live up front
        t0 = time.monotonic()
        try:
            summary(read_gguf(path))
            if n % 5 == 0:
                out.unlink(missing_ok=True)
                convert(path, out, force=True, progress=False)
        except SwapMoEError:
            pass
        assert time.monotonic() - t0 < 5, "reader took too long on a mutated file"
        n += 1
    assert n > 50


def test_fuzz_safetensors(hf_models, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(hf_models["mixtral"], d)
    st = d / "model.safetensors"
    src = st.read_bytes()
    rng = random.Random(99)
    n = 0
    deadline = time.monotonic() + SECONDS / 2
    while time.monotonic() < deadline:
        st.write_bytes(_mutate(rng, src, 4096))
        try:
            with Checkpoint(d) as ck:
                for name in ck.names()[:4]:
                    ck.get(name)
        except SwapMoEError:
            pass
        n += 1
    assert n > 50


@pytest.mark.parametrize("blob", [
    b"GGUF" + (3).to_bytes(4, "little") + (2**62).to_bytes(8, "little") + (1).to_bytes(8, "little"),   # tensor count
    b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
    + (2**60).to_bytes(8, "little"),                                                               # key length
    b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
    + (1).to_bytes(8, "little") + b"k" + (9).to_bytes(4, "little") + (8).to_bytes(4, "little")
    + (2**61).to_bytes(8, "little"),                                                               # string array
    b"GGUF" + (99).to_bytes(4, "little") + bytes(16),                                              # version
])
def test_hostile_headers_fail_fast(tmp_path, blob):
    p = tmp_path / "h.gguf"
    p.write_bytes(blob + bytes(64))
    t0 = time.monotonic()
    with pytest.raises(SwapMoEError):
        read_gguf(p)
    assert time.monotonic() - t0 < 1


def test_corpus_of_past_crashers():
    """Files the fuzzer once made misbehave (hang: a hostile count the reader trusted)."""
    from pathlib import Path

    files = sorted((Path(__file__).parent / "fuzz_corpus").glob("*.gguf"))
    assert files
    for f in files:
        t0 = time.monotonic()
        with pytest.raises(SwapMoEError):
            summary(read_gguf(f))
        assert time.monotonic() - t0 < 1, f
