"""HF checkpoint -> GGUF for each architecture, checked against transformers' float32 forward.

Tolerances (measured on these tiny models, 4 prompts, 2 threads; see README):
- f32: max |logit diff| <= 1e-3. Measured <= 4.5e-5: the weights are bit-identical, only the
  order of float sums differs (llama.cpp runs with an F32 KV cache here).
- f16: max |diff| <= 4 % of the largest |logit|. Measured <= 1.9 % (Mixtral): f16 keeps 11
  significant bits of every weight (rel. error <= 4.9e-4) and llama.cpp also rounds activations
  to f16 for its dot products; the router stays F32, so top-k choices do not flip.
- q8_0: KL(ref || gguf) of the next-token distribution <= 0.1 per prompt and top-1 agreement
  on >= 3 of 4 prompts. Measured max KL 0.036: 8-bit blocks of 32 weights plus q8 activations.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import ARCH_CONFIGS, hf_logits, hf_tokens, llama_logits
from swapmoe_gguf.converters import convert
from swapmoe_gguf.fileformat.reader import read_gguf


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p = np.exp(p_logits - p_logits.max())
    p /= p.sum()
    q = np.exp(q_logits - q_logits.max())
    q /= q.sum()
    return float(np.sum(p * (np.log(p) - np.log(q))))


@pytest.fixture(scope="module")
def references(hf_models):
    return {arch: (hf_tokens(d), hf_logits(d, hf_tokens(d))) for arch, d in hf_models.items()}


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_logits_match_transformers(arch, qtype, hf_models, references, tmp_path):
    out = tmp_path / f"{arch}-{qtype}.gguf"
    res = convert(hf_models[arch], out, qtype, progress=False)
    assert res.written and out.is_file()
    info = read_gguf(out)
    assert info.swap_ready, info.layout_problem()
    tokens, ref = references[arch]
    got = llama_logits(out, tokens)
    assert all(r.shape == g.shape for r, g in zip(ref, got))
    scale = max(np.abs(r).max() for r in ref)
    assert scale > 1.0, "reference logits too small to make the comparison meaningful"
    diff = max(np.abs(r - g).max() for r, g in zip(ref, got))
    kls = [_kl(r, g) for r, g in zip(ref, got)]
    top1 = sum(int(r.argmax() == g.argmax()) for r, g in zip(ref, got))
    if qtype == "f32":
        assert diff <= 1e-3, diff
    elif qtype == "f16":
        assert diff <= 0.04 * scale, (diff, scale)
        assert top1 == len(ref)
    else:
        assert max(kls) <= 0.1, kls
        assert top1 >= 3, top1


def test_expert_norms_match_weights(hf_models, tmp_path):
    """swapmoe.expert_norms holds ||E_i|| (gate, up, down together) of the source weights."""
    from safetensors.numpy import load_file

    d = hf_models["qwen3moe"]
    out = tmp_path / "n.gguf"
    convert(d, out, "q8_0", progress=False)
    info = read_gguf(out)
    w = load_file(str(d / "model.safetensors"))
    norms = info.expert_norms
    assert norms is not None and norms.shape == (2, 4)
    for li, layer in enumerate(info.moe_layers):
        for e in range(4):
            sq = sum(float(np.sum(w[f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight"].astype(np.float64) ** 2))
                     for p in ("gate", "up", "down"))
            assert norms[li, e] == pytest.approx(np.sqrt(sq), rel=1e-5)
