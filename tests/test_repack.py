"""CPU weight repacking under Virtual Experts: slot bytes from ggml's own repacking, independent of
the other slots; `full` bit for bit equal to stock llama.cpp (which repacks); swaps equal a fresh build."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from swapmoe_gguf.llamacpp.ggml import GGMLTensor, ggml
from swapmoe_gguf.llamacpp.repack import Repacker, repack_buft

# ggml types ggml-cpu has repack layouts for (which of them apply depends on the CPU)
TYPES = {"Q4_0": 2, "Q8_0": 8, "Q2_K": 10, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ4_NL": 20, "MXFP4": 39}


def _whole_repack(qtype: int, ne0: int, ne1: int, n: int, raw: np.ndarray) -> bytes:
    """A [ne0, ne1, n] tensor in a CPU_REPACK buffer, set whole: what llama.cpp's loader does."""
    g = ggml()
    ctx = g.lib.ggml_init(g.init_params(1 << 12, no_alloc=True))
    t = g.lib.ggml_new_tensor(ctx, qtype, 3, (ctypes.c_int64 * 3)(ne0, ne1, n))
    buf = g.lib.ggml_backend_buft_alloc_buffer(repack_buft(), g.nbytes(t) + 64)
    try:
        g.lib.ggml_backend_tensor_alloc(buf, t, g.lib.ggml_backend_buffer_get_base(buf))
        g.set(t, raw)
        return ctypes.string_at(GGMLTensor.from_address(t).data, g.nbytes(t))
    finally:
        g.lib.ggml_backend_buffer_free(buf)
        g.lib.ggml_free(ctx)


def test_slot_bytes_are_independent_of_other_slots():
    """For every type ggml repacks on this CPU: repacking one expert alone gives exactly that expert's
    bytes of the whole stacked tensor repacked at once (so a slot can be rewritten alone)."""
    rp = Repacker()
    assert rp.available, "this llama.cpp build has no CPU_REPACK buffer type"
    ne0, ne1, n = 512, 64, 4
    rng = np.random.default_rng(0)
    seen = []
    try:
        for name, q in TYPES.items():
            if not rp.wants("blk.0.ffn_up_exps.weight", q, (n, ne1, ne0)):
                continue
            seen.append(name)
            per = rp.scratch(q, ne0, ne1).nbytes
            raw = rng.integers(0, 256, size=n * per, dtype=np.uint8)
            if name in ("Q4_0", "Q8_0", "IQ4_NL", "MXFP4", "Q4_K", "Q5_K", "Q6_K", "Q2_K"):
                raw = _sane_scales(raw, name, per)
            whole = _whole_repack(q, ne0, ne1, n, raw)
            for e in range(n):
                addr = rp.scratch(q, ne0, ne1).repack(raw[e * per:(e + 1) * per])
                assert ctypes.string_at(addr, per) == whole[e * per:(e + 1) * per], f"{name}: expert {e}"
    finally:
        rp.close()
    # this CPU (x86-64 with AVX2) repacks at least the 4-bit types; never pass having checked nothing
    assert {"Q4_0", "IQ4_NL"} <= set(seen), f"repacked types here: {seen}"


def _sane_scales(raw: np.ndarray, name: str, per: int) -> np.ndarray:
    """Random blocks with finite f16 scales (the repack only moves bytes, but keep the data valid)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
    blocks = raw.reshape(-1, size).copy()
    if name in ("Q4_0", "Q8_0", "IQ4_NL"):
        blocks[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return blocks.reshape(-1)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A tiny Mixtral (hidden 256, 8 experts of 512, 2 layers) in each type, from one checkpoint."""
    from swapmoe_gguf.converters import convert
    from swapmoe_gguf.converters.tiny_checkpoint import write_tiny_mixtral

    root = tmp_path_factory.mktemp("repack")
    hf = write_tiny_mixtral(root / "hf", hidden=256, ffn=512, layers=2, experts=8, heads=8, kv_heads=4)
    out = {}
    for t in ("q4_0", "q4_k_m", "iq4_nl", "q8_0"):
        out[t] = root / f"{t}.gguf"
        convert(hf, out[t], t, progress=False)
    return out


TOKENS = list(range(1, 40))


def _logits(llm) -> np.ndarray:
    llm.reset()
    llm.eval(TOKENS)
    return np.array(llm.scores[: len(TOKENS)])


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k_m", "iq4_nl", "q8_0"])
def test_full_equals_stock_llamacpp_and_swaps_equal_a_fresh_build(quantized, qtype):
    import llama_cpp

    from swapmoe_gguf.runtime import SwapMoELlama

    path = str(quantized[qtype])
    kw = dict(n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False, flash_attn=True)
    stock = llama_cpp.Llama(path, **kw)  # repacks, as every llama.cpp CPU build does by default
    ref = _logits(stock)
    stock.close()
    full = SwapMoELlama(path, policy="full", **kw)
    try:
        assert bool(full.vmodel.repacked) == (qtype != "q8_0"), full.vmodel.repacked  # Q8_0: no layout on AVX2
        np.testing.assert_array_equal(_logits(full), ref)
        layers = full.vmodel.moe_layers
    finally:
        full.close()

    def static(initial, swaps=()):
        rt = SwapMoELlama(path, policy="static", experts_per_layer=4, initial_experts=initial, **kw)
        try:
            for layer, slot, e in swaps:
                rt.vmodel.swap(layer, slot, e)
            return _logits(rt)
        finally:
            rt.close()

    swapped = static({l: [0, 1, 2, 3] for l in layers}, [(l, 3, 7) for l in layers] + [(l, 0, 5) for l in layers])
    np.testing.assert_array_equal(swapped, static({l: [5, 1, 2, 7] for l in layers}))


def test_no_repack_keeps_the_file_layout(quantized):
    """-nr/--no-repack (llama.cpp's flag): nothing in CPU_REPACK; the plain kernels give close, not equal, logits."""
    import llama_cpp

    from swapmoe_gguf.runtime import SwapMoELlama

    path = str(quantized["q4_0"])
    kw = dict(n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False, flash_attn=True)
    stock = llama_cpp.Llama(path, **kw)
    ref = _logits(stock)
    stock.close()
    rt = SwapMoELlama(path, policy="full", repack=False, **kw)
    try:
        assert not rt.vmodel.repacked
        ours = _logits(rt)
    finally:
        rt.close()
    diff = np.abs(ours - ref).max()
    assert 0 < diff < 0.05 * np.abs(ref).max(), diff
