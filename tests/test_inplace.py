"""The runtime on a GGUF that was not converted (no second copy): experts read in place, norms
computed once and cached in a sidecar, logits bit-identical to the converted file and to stock."""
from __future__ import annotations

import logging
import os
import shutil

import llama_cpp
import numpy as np
import pytest

from conftest import run_cli
from swapmoe_gguf.fileformat import norms as norms_cache
from swapmoe_gguf.store import expert_store
from swapmoe_gguf.converters import convert
from swapmoe_gguf.base.errors import GGUFFormatError, LayoutError
from swapmoe_gguf.fileformat.reader import read_gguf
from swapmoe_gguf.runtime import SwapMoELlama
from test_split import write_copy

from test_runtime import SETTINGS, TOKENS, _scores  # the same prompt and settings as the runtime tests


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a fresh norms cache per test


@pytest.fixture(scope="module")
def files(tiny_gguf, tmp_path_factory):
    """A downloaded-style copy of the tiny model (32-byte alignment, no swapmoe keys), its
    conversion, and the same split into two shards."""
    root = tmp_path_factory.mktemp("inplace")
    raw = write_copy(tiny_gguf, root / "raw.gguf")[0]
    conv = root / "conv.gguf"
    convert(raw, conv, progress=False)
    (root / "s").mkdir()
    split = write_copy(tiny_gguf, root / "s" / "raw.gguf", shards=2)[0]
    return {"raw": raw, "conv": conv, "split": split}


def test_raw_file_is_not_swap_ready_but_runs(files):
    info = read_gguf(files["raw"])
    assert info.alignment == 32 and info.format_version is None and info.expert_norms is None
    assert info.layout_problem() and info.run_problem() is None and info.runnable_in_place
    assert not info.slices_aligned


@pytest.mark.parametrize("which", ["raw", "split"])
def test_full_policy_bit_identical_to_converted_and_stock(files, which, caplog):
    path = str(files[which])
    caplog.set_level(logging.INFO, logger="swapmoe_gguf")
    expert_store._told_in_place.clear()
    stock = llama_cpp.Llama(path, **SETTINGS)
    raw = SwapMoELlama(path, policy="full", **SETTINGS)
    conv = SwapMoELlama(str(files["conv"]), policy="full", **SETTINGS)
    try:
        assert raw.memory.slots == raw.vmodel.n_expert
        assert raw.vmodel.store.direct_fd < 0  # buffered: slices are not page-aligned
        a = _scores(raw)
        assert np.array_equal(a, _scores(stock))  # bit for bit
        assert np.array_equal(a, _scores(conv))
    finally:
        raw.close()
        conv.close()
        stock.close()
    told = [r.message for r in caplog.records if "reading experts in place" in r.message]
    assert len(told) == 1 and "O_DIRECT" in told[0] and "swapmoe convert" in told[0]  # once, for two models


def test_norms_equal_the_converters_and_the_sidecar_is_reused(files, monkeypatch):
    ref = read_gguf(files["conv"]).expert_norms  # computed by relayout from the same dequantized tensors
    before = dict(norms_cache.stats)
    info = read_gguf(files["raw"])
    norms = norms_cache.ensure_expert_norms(info)
    assert np.array_equal(norms, ref)
    assert norms_cache.stats["computed"] == before["computed"] + 1
    side = norms_cache.sidecar_path(info)
    assert side.is_file() and side.stat().st_size < 4096 and str(side).startswith(os.environ["XDG_CACHE_HOME"])

    def boom(_info):
        raise AssertionError("norms recomputed although cached")

    orig = norms_cache.compute_norms
    monkeypatch.setattr(norms_cache, "compute_norms", boom)
    rt = SwapMoELlama(str(files["raw"]), experts_per_layer=3, policy="swapmoe", **SETTINGS)
    try:
        assert np.array_equal(rt.vmodel.info.expert_norms, ref)
        assert norms_cache.stats["cache_hits"] == before["cache_hits"] + 1
    finally:
        rt.close()
    # a corrupt sidecar is recomputed, not trusted
    monkeypatch.setattr(norms_cache, "compute_norms", orig)
    side.write_bytes(b"garbage")
    assert np.array_equal(norms_cache.load_or_compute(read_gguf(files["raw"])), ref)
    assert norms_cache.stats["computed"] == before["computed"] + 2


@pytest.mark.parametrize("which", ["raw", "split"])
def test_swaps_and_exact_in_place(files, which):
    kw = dict(experts_per_layer=3, policy="static", **SETTINGS)
    init = {l: [0, 1, 2] for l in read_gguf(files[which]).moe_layers}
    raw = SwapMoELlama(str(files[which]), initial_experts=init, **kw)
    conv = SwapMoELlama(str(files["conv"]), initial_experts=init, **kw)
    try:
        assert np.array_equal(_scores(raw), _scores(conv))
        for rt in (raw, conv):
            rt.vmodel.swap(0, 1, 7)
            rt.request_swap(2, 0, 5)
            assert rt.apply_pending(wait=True) == 1
        assert raw.vmodel.slot_map == conv.vmodel.slot_map
        assert np.array_equal(_scores(raw), _scores(conv))
        assert raw.telemetry().bytes_read == conv.telemetry().bytes_read > 0
    finally:
        raw.close()
        conv.close()
    # exact (lossless at S < n) read in place equals full on the converted file
    kw = dict(n_ctx=128, n_threads=2, verbose=False, flash_attn=True, n_batch=1, n_ubatch=1)
    exact = SwapMoELlama(str(files[which]), policy="exact", experts_per_layer=2, **kw)
    full = SwapMoELlama(str(files["conv"]), policy="full", **kw)
    try:
        outs = []
        for rt in (exact, full):
            rt.reset()
            outs.append([t for _, t in zip(range(12), rt.generate(TOKENS[:4], temp=0.0))])
        assert outs[0] == outs[1]
        assert exact.policy_name == "exact" and exact.telemetry().swaps > 0
    finally:
        exact.close()
        full.close()


def test_truncated_raw_file_is_refused_in_one_line(files, tmp_path):
    bad = tmp_path / "trunc.gguf"
    shutil.copy(files["raw"], bad)
    os.truncate(bad, bad.stat().st_size - 1000)
    with pytest.raises(GGUFFormatError, match="truncated"):
        SwapMoELlama(str(bad), **SETTINGS)
    r = run_cli("chat", "-m", bad, "-p", "hi", "-n", "2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "truncated" in r.stderr, r.stderr


def test_non_moe_file_is_still_refused(tmp_path):
    import gguf

    path = tmp_path / "dense.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((64, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from swapmoe_gguf.llamacpp.vmodel import VirtualExpertModel

    with pytest.raises(LayoutError, match="not a Mixture-of-Experts"):
        VirtualExpertModel(path, 2)
