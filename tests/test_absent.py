"""absent.py's search for llama.cpp's layer array, on a memory layout built here (no model needed).

The real model is covered by test_runtime.py (every absent pointer cleared, graph reads none of
them, logits equal stock bit for bit) and the architecture zoo."""
from __future__ import annotations

import numpy as np

from swapmoe_gguf.llamacpp.absent import _find_layers

N_LAYER, FIELDS = 3, 40  # a layer struct of 40 pointer fields


def _layout(rng: np.random.Generator):
    """A fake llama_model object holding a std::vector<llama_layer> triple (and decoys)."""
    tensors = rng.integers(1 << 40, 1 << 44, size=(N_LAYER, FIELDS), dtype=np.uint64) * np.uint64(16)
    layers = tensors.copy()  # [n_layer, fields]: the vector's storage
    base = layers.ctypes.data
    model = np.zeros(64, dtype=np.uint64)
    model[10:13] = [base, base + layers.nbytes, base + layers.nbytes]  # begin, end, capacity
    # a decoy: a bigger buffer around the layer array, split in N_LAYER equal parts; each part holds
    # one layer's tensors, but not at the same field offset
    decoy = np.zeros(N_LAYER * 64, dtype=np.uint64)
    for i in range(N_LAYER):
        decoy[i * 64 + i: i * 64 + i + FIELDS] = tensors[i]
    model[20:23] = [decoy.ctypes.data, decoy.ctypes.data + decoy.nbytes, decoy.ctypes.data + decoy.nbytes]
    model[30:33] = [5, 3, 9]  # not a vector (end < begin)
    anchors = [{"attn_norm.weight": int(tensors[i, 4]), "ffn_down_exps.weight": int(tensors[i, 17])}
               for i in range(N_LAYER)]
    return model, layers, decoy, anchors


def test_finds_the_layer_array_not_the_decoy():
    model, layers, decoy, anchors = _layout(np.random.default_rng(0))
    assert _find_layers(model, N_LAYER, anchors) == (layers.ctypes.data, FIELDS * 8)


def test_ambiguous_or_missing_means_no_change():
    model, layers, decoy, anchors = _layout(np.random.default_rng(1))
    twin = layers.copy()  # a second vector with the same contents: which one is llama.cpp's?
    model[40:43] = [twin.ctypes.data, twin.ctypes.data + twin.nbytes, twin.ctypes.data + twin.nbytes]
    assert _find_layers(model, N_LAYER, anchors) is None
    model[40:43] = 0
    anchors[1]["attn_norm.weight"] = 12345  # a tensor the array does not hold
    assert _find_layers(model, N_LAYER, anchors) is None


def test_weight_buffers_ask_for_huge_pages():
    """advise_huge_pages before the first write: the region is backed by 2 MiB pages where THP is
    available to regions that ask (`madvise` or `always` mode); a no-op under `never`."""
    import mmap
    import re
    from pathlib import Path

    from swapmoe_gguf.llamacpp.vmodel import advise_huge_pages

    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.is_file() or "[never]" in mode.read_text():
        advise_huge_pages(0, 1 << 22)  # nothing to ask for: must not fail
        return
    size = 16 << 20
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # as malloc maps big blocks
    addr = np.frombuffer(m, dtype=np.uint8).ctypes.data
    advise_huge_pages(addr, size)
    m.write(b"\x01" * size)  # first touch, after the advice
    smaps = Path("/proc/self/smaps").read_text()
    start = f"{addr:x}-"
    block = smaps[smaps.index(start):].split("VmFlags")[0]
    assert int(re.search(r"AnonHugePages:\s+(\d+) kB", block).group(1)) > 0
    m.close()
