"""Bounded fuzzing of the file readers: every mutated file yields a clean SwapMoEError, never a
crash, a hang or another exception. Longer runs: raise SWAPMOE_FUZZ_SECONDS."""
from __future__ import annotations

import os
import random
import shutil
import time

import numpy as np
import pytest

from swapmoe_gguf.converters import convert
from swapmoe_gguf.converters.safetensors_io import Checkpoint
from swapmoe_gguf.base.errors import SwapMoEError
from swapmoe_gguf.fileformat.reader import read_gguf
from swapmoe_gguf.commands.inspect import summary

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


def _patched(src: str, dst, edit) -> None:  # type: ignore[no-untyped-def]
    """Copy a GGUF and edit its header bytes in place (same length), as a hostile file would."""
    import gguf

    shutil.copy(src, dst)
    r = gguf.GGUFReader(dst, "r+")
    edit(r)
    r.data.flush()


def _rename_key(r, old: str, new: str) -> None:  # type: ignore[no-untyped-def]
    f = r.fields[old]
    f.parts[1][:] = np.frombuffer(new.encode(), dtype=np.uint8)


def _dup_token(r) -> None:  # type: ignore[no-untyped-def]
    f = r.fields["tokenizer.ggml.tokens"]
    texts = [bytes(f.parts[i]) for i in f.data]
    by_len: dict[int, int] = {}
    for j, t in enumerate(texts):
        if len(t) in by_len:  # make token j a copy of an earlier token of the same length
            f.parts[f.data[j]][:] = np.frombuffer(texts[by_len[len(t)]], dtype=np.uint8)
            return
        by_len[len(t)] = j



@pytest.mark.parametrize("name,edit,message", [
    ("dup-token", _dup_token, "repeats a token"),
    ("no-heads", lambda r: _rename_key(r, "llama.attention.head_count", "llama.attenti1n.head_count"),
     "missing metadata key llama.attention.head_count"),
    ("layers", lambda r: r.fields["llama.block_count"].parts[-1].__setitem__(0, 65286), "block_count is 65286"),
])
def test_loader_refuses_what_llama_cpp_would_abort_on(tiny_gguf, tmp_path, name, edit, message):
    """Found by fuzzing the runtime loader in subprocesses: llama.cpp aborts (GGML_ASSERT) on these."""
    from conftest import run_cli

    path = tmp_path / f"{name}.gguf"
    _patched(tiny_gguf, path, edit)
    r = run_cli("chat", "-m", path, "-p", "hi", "-n", "2", "--temp", "0", "-c", "256")
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr[-400:])


def test_fuzz_runtime_loader_in_subprocesses(tiny_gguf, tmp_path):
    """Mutated headers through the whole loader (llama.cpp included), each in its own process so an
    abort would show as a signal: every run must end with an answer or a one-line error."""
    import subprocess
    import sys

    src = open(tiny_gguf, "rb").read()
    rng = random.Random(7)
    deadline = time.monotonic() + SECONDS
    n = 0
    while time.monotonic() < deadline or n < 3:
        b = bytearray(src)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(0, 12000)] = rng.choice((0, 0xFF, rng.randrange(256)))
        p = tmp_path / "l.gguf"
        p.write_bytes(bytes(b))
        r = subprocess.run([sys.executable, "-m", "swapmoe_gguf", "chat", "-m", str(p), "-p", "hi", "-n", "2",
                            "--temp", "0", "-c", "256"], capture_output=True, text=True, timeout=120)
        assert r.returncode in (0, 2) and "Traceback" not in r.stderr, (n, r.returncode, r.stderr[-600:])
        n += 1
