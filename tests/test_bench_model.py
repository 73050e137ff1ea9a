"""The bench model (issue #28): the trained default model with its experts widened by zeros.

Widths here are small (256-2048 instead of the bench's 8192) so the files are 60-240 MB and the
test takes seconds; the padding code is the same at every width.
"""
from __future__ import annotations

import numpy as np
import pytest

from swapmoe_gguf.base.errors import ConvertError
from swapmoe_gguf.converters.default_model import default_model, shipped_heldout
from swapmoe_gguf.converters.widened import WIDENED_KEY, expert_bytes, widen
from swapmoe_gguf.fileformat.info import dequantize
from swapmoe_gguf.fileformat.norms import compute_norms
from swapmoe_gguf.fileformat.reader import read_gguf
from swapmoe_gguf.runtime import SwapMoELlama

KW = dict(n_ctx=256, n_batch=256, n_threads=2, verbose=False, seed=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bench-model")
    src = str(default_model())
    out = {"default": src}
    for width, t in ((256, "f16"), (512, "f16"), (1024, "q8_0"), (2048, "q8_0")):
        out[f"{t}-{width}"] = str(widen(src, d / f"w{width}-{t}.gguf", width, t, progress=False))
    return out


@pytest.fixture(scope="module")
def tokens(models) -> list[int]:
    import llama_cpp

    vocab = llama_cpp.Llama(models["default"], vocab_only=True, verbose=False)
    text = "".join(p.read_text()[:800] for p in shipped_heldout())  # every domain
    toks = vocab.tokenize(text.encode())[:240]
    vocab.close()
    return toks


def _logits(path: str, toks: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(path, logits_all=True, type_k=0, type_v=0, **KW)  # F32 KV cache
    try:
        llm.eval(toks)
        return np.array(llm.scores[:len(toks)], dtype=np.float64)  # [n_tokens, n_vocab]
    finally:
        llm.close()


def _raw(info, t) -> bytes:
    with open(info.path, "rb") as f:
        f.seek(t.offset)
        return f.read(t.nbytes)


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    lp = p_logits - np.logaddexp.reduce(p_logits, axis=1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, axis=1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())


def test_widened_file_is_the_default_model_padded(models):
    src = read_gguf(models["default"])
    for name, width in (("f16-256", 256), ("q8_0-2048", 2048)):
        info = read_gguf(models[name])
        assert info.params.n_ff_exp == width and info.get(WIDENED_KEY) == f"96 -> {width}"
        assert info.slices_aligned and not info.layout_problem()
        assert info.expert_bytes == expert_bytes(192, width, name.split("-")[0])
        # the router, the norms and the attention: the source's (F32 kept bit for bit)
        for t in src.tensors:
            if "ffn_gate_inp" in t.name or t.name.endswith("norm.weight"):
                w = next(x for x in info.tensors if x.name == t.name)
                assert _raw(info, w) == _raw(src, t), t.name
        np.testing.assert_array_equal(info.expert_norms, src.expert_norms)
    # the padding: gate/up rows and down columns of zeros, the rest the source's values
    info = read_gguf(models["f16-256"])
    for kind in ("gate", "down"):
        a = next(t for t in src.tensors if t.name == f"blk.3.ffn_{kind}_exps.weight")
        b = next(t for t in info.tensors if t.name == a.name)
        x = dequantize(np.frombuffer(_raw(src, a), np.uint8), a.qtype, a.shape)
        y = dequantize(np.frombuffer(_raw(info, b), np.uint8), b.qtype, b.shape)
        real, pad = (y[:, :, :96], y[:, :, 96:]) if kind == "down" else (y[:, :96], y[:, 96:])
        np.testing.assert_array_equal(real, x)
        assert not pad.any()
    # zeros add nothing to ||E_i||: the norms recomputed from the widened F16 file are the stored ones
    np.testing.assert_allclose(compute_norms(info), src.expert_norms.reshape(compute_norms(info).shape), rtol=1e-5)


def test_widened_logits_match_the_default_model(models, tokens):
    """F16: every width gives bit-identical logits; against the unwidened model (n_ff 96) they agree to
    float rounding only, because 96 is not a multiple of ggml-cpu's F16 SIMD step (64 with AVX-512), so
    the last 32 products of each down row are summed in another order. Q8_0: the real blocks are
    exactly the unwidened model's Q8_0 blocks, so every width is again bit-identical, and the
    difference from F16 is Q8_0's own rounding."""
    ref = _logits(models["default"], tokens)
    f16a, f16b = _logits(models["f16-256"], tokens), _logits(models["f16-512"], tokens)
    np.testing.assert_array_equal(f16a, f16b)
    # measured (AMD EPYC, AVX-512): max |diff| 0.0043 on logits up to ~17, KL 6e-8
    assert np.abs(f16a - ref).max() < 0.05 and _kl(ref, f16a) < 1e-6
    assert (f16a.argmax(1) == ref.argmax(1)).all()
    q8a, q8b = _logits(models["q8_0-1024"], tokens), _logits(models["q8_0-2048"], tokens)
    np.testing.assert_array_equal(q8a, q8b)
    # measured: KL(f16 || q8_0) 0.0018 nats/token, top-1 agreement 0.98
    assert _kl(ref, q8a) < 0.01 and (q8a.argmax(1) == ref.argmax(1)).mean() > 0.95


def test_widened_model_routes_and_schedules_as_the_default_model(models, tokens):
    """The same experts are chosen and scored: calibration picks the same starting set, and the
    scheduler's importance scores after the same tokens are the same. Swaps are turned off (quota 0)
    because which finished loads get committed depends on read timing, which the widened experts
    change on purpose (that is what the bench measures). The calibration text is short so that both
    models read all of it (calibration reads fewer tokens of a long text when a model is slow)."""
    from swapmoe_gguf.residency.scheduler import SchedulerConfig

    calib = "".join(p.read_text()[-600:] for p in shipped_heldout())
    seen = []
    for name in ("default", "f16-256", "f16-512"):
        llm = SwapMoELlama(models[name], policy="swapmoe", experts_per_layer=16, logits_all=True,
                           scheduler=SchedulerConfig(quota=0), calibration=calib, **KW)
        try:
            slots0 = {l: sorted(s) for l, s in llm.vmodel.slot_map.items()}
            llm.eval(tokens[:32])
            for t in tokens[32:96]:
                llm.eval([t])
            llm.score_pending()
            seen.append((slots0, llm.telemetry_.swaps, llm.telemetry_.hit_count, llm.telemetry_.hit_mass,
                         np.array(llm.calib_rates, dtype=np.float64), llm.policy.scheduler.scores.copy(),
                         np.array(llm.scores[95], dtype=np.float64)))
        finally:
            llm.close()
    (k0, s0, c0, m0, r0, sc0, l0), (k1, s1, c1, m1, r1, sc1, l1), (k2, s2, c2, m2, r2, sc2, l2) = seen
    assert k0 == k1 == k2 and s0 == s1 == s2 == 0 and c0 == c1 == c2 > 0
    np.testing.assert_allclose(r1, r0, rtol=1e-3, atol=1e-6)     # calibration: same routing
    # the unwidened model: the same scores up to float rounding, which may flip a top-k near-tie
    # (measured: 2 of 192 scores, one selection in the last layer, over these 96 tokens)
    close = np.isclose(sc1, sc0, rtol=1e-3, atol=1e-6)
    assert sc0.any() and close.mean() >= 0.97, np.argwhere(~close)
    assert m0 == pytest.approx(m1, rel=1e-2) and np.abs(l0 - l1).max() < 0.05
    # two widths: bit for bit the same (the F16 dot products sum the same blocks in the same order)
    np.testing.assert_array_equal(sc2, sc1)
    np.testing.assert_array_equal(l2, l1)
    assert m1 == m2 and (r1 == r2).all()


def test_widen_refuses_bad_widths(models, tmp_path):
    for width, t, msg in ((64, "f16", "must be >= the experts' 96"), (1000, "q8_0", "multiple of 1024"),
                          (1024, "q4_k_m", "not supported")):
        with pytest.raises(ConvertError, match=msg):
            widen(models["default"], tmp_path / "x.gguf", width, t)
    assert not list(tmp_path.iterdir())  # nothing half-written
