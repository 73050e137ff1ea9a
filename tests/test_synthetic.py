"""The synthetic speed/memory model: a valid swap-ready GGUF that stock llama.cpp runs."""
from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from swapmoe_gguf.converters.synthetic import SyntheticShape, write_synthetic_moe
from swapmoe_gguf.base.errors import ConvertError
from swapmoe_gguf.fileformat.info import dequantize
from swapmoe_gguf.fileformat.reader import read_gguf
from swapmoe_gguf.runtime import SwapMoELlama

SMALL = SyntheticShape(layers=2, hidden=512, ffn=256, experts=16, top_k=4, heads=8, kv_heads=2)
SETTINGS = dict(n_ctx=64, n_threads=2, logits_all=True, verbose=False, flash_attn=True)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic_moe(tmp_path_factory.mktemp("synth") / "s.gguf", SMALL, progress=False)


def test_layout_and_norms(synth):
    info = read_gguf(synth)
    assert info.layout_problem() is None and info.slices_aligned
    assert (info.n_expert, info.params.n_expert_used, len(info.moe_layers)) == (16, 4, 2)
    assert sum(t.nbytes for t in info.expert_tensors) == SMALL.layers * SMALL.experts * SMALL.expert_bytes()
    # ||E_i|| in the metadata equals the norm of the dequantized expert weights
    raw = np.memmap(synth, dtype=np.uint8, mode="r")
    for layer in info.moe_layers:
        for e in (0, 7, 15):
            sq = 0.0
            for t in info.layer_expert_tensors(layer):
                a, b = t.expert_range(e)
                w = dequantize(raw[a:b], t.qtype, t.shape[1:])
                sq += float((w.astype(np.float64) ** 2).sum())
            assert info.expert_norms[layer, e] == pytest.approx(np.sqrt(sq), rel=1e-4)
    assert len(set(np.round(info.expert_norms[0], 3))) > 8  # experts differ in size


def test_runs_bit_exact_against_stock_llama_cpp(synth):
    toks = [1, 40, 50, 60, 70, 80, 90]
    ref = llama_cpp.Llama(str(synth), **SETTINGS)
    rt = SwapMoELlama(str(synth), policy="full", **SETTINGS)
    try:
        out = []
        for llm in (ref, rt):
            llm.reset()
            llm.eval(toks)
            out.append(np.array(llm.scores[: len(toks)]))
        assert np.isfinite(out[0]).all() and out[0].std() > 0
        assert np.array_equal(out[0], out[1])
    finally:
        rt.close()
        ref.close()


def test_bad_shape_is_refused(tmp_path):
    with pytest.raises(ConvertError, match="multiples of 32"):
        write_synthetic_moe(tmp_path / "x.gguf", SyntheticShape(hidden=500, heads=5, kv_heads=5))
    assert not list(tmp_path.iterdir())


def test_process_exits_with_swaps_in_flight_and_no_close(synth):
    """A model never closed, with more swaps pending than staging buffers: the interpreter still exits."""
    import subprocess
    import sys

    code = f"""
from swapmoe_gguf.runtime import SwapMoELlama
from swapmoe_gguf.residency.scheduler import SchedulerConfig
llm = SwapMoELlama({str(synth)!r}, policy="swapmoe", experts_per_layer=4, n_ctx=64, verbose=False,
                   scheduler=SchedulerConfig(quota=4, interval=1, commit_rate=0.01))
toks = llm.tokenize(b"the quick brown fox jumps over the lazy dog")
llm.eval(toks)
for t in toks:
    llm.eval([t])
assert len(llm.pending) > llm.vmodel.store.staging_buffers, len(llm.pending)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
