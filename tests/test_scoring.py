"""The C scoring kernel (llamacpp/_score.c) against the numpy path it replaces: routing.route, the
scheduler's Eq. 1 sums and routing.hit_shares, for every gating llama.cpp's graphs use (no model)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from swapmoe_gguf.llamacpp.routing import GatingSpec, hit_shares, route
from swapmoe_gguf.llamacpp.scoring import ScoreKernel, token_masks
from swapmoe_gguf.residency.scheduler import ImportanceScheduler, SchedulerConfig

SPECS = {
    "softmax": GatingSpec(),
    "softmax-norm": GatingSpec(norm_w=True),
    "sigmoid-norm-scale": GatingSpec(func="sigmoid", norm_w=True, scale=2.5),
    "sigmoid-bias-groups": GatingSpec(func="sigmoid", selection_bias=True, norm_w=True, scale=1.5, n_group=4,
                                      n_group_used=2),
    "softmax-groups": GatingSpec(n_group=8, n_group_used=3),
    "softmax_weight": GatingSpec(func="softmax_weight"),
    "select-logits": GatingSpec(func="sigmoid", select="logits"),
    "sigmoid_logits": GatingSpec(func="softmax", select="sigmoid_logits", selection_bias=True),
    "sqrt_softplus": GatingSpec(func="sqrt_softplus", norm_w=True),
}


def _kernel(n_expert: int, k: int, bias, sel):  # type: ignore[no-untyped-def]
    kern = ScoreKernel.load(n_expert, k, bias, sel)
    if kern is None and os.environ.get("CI"):
        pytest.fail("the C scoring kernel is not built (pip install -e . compiles it)")
    if kern is None:
        pytest.skip("the C scoring kernel is not built: pip install -e . compiles it")
    return kern


@pytest.mark.parametrize("name", sorted(SPECS))
def test_kernel_scores_and_hits_equal_numpy(name: str) -> None:
    spec = SPECS[name]
    rng = np.random.default_rng(len(name))
    n_layer, n_expert, k, g, n = 5, 32, 4, 5, 9
    bias = rng.normal(0, 0.3, (n_layer, n_expert)).astype(np.float32)
    sel = rng.normal(0, 0.3, (n_layer, n_expert)).astype(np.float32)
    kern = _kernel(n_expert, k, bias, sel)
    layers = [1, 2, 4, 5, 7]
    norms = rng.uniform(0.5, 2.0, (n_layer, n_expert)).astype(np.float32)
    cfg = SchedulerConfig(decay=0.97)
    ref = ImportanceScheduler(layers, n_expert, k, norms, cfg)
    fast = ImportanceScheduler(layers, n_expert, k, norms, cfg)
    resident = rng.random((2, n_layer, n_expert)) < 0.5
    masks, of_token = token_masks([(4, resident[0])], resident[1], n)
    for step in range(2):  # from zero scores, then onto decayed ones
        logits = rng.normal(0, 2.0, (g, n, n_expert)).astype(np.float32)
        x_norm = rng.uniform(0.5, 3.0, (g, n)).astype(np.float32)
        hits = kern.score(logits, x_norm, np.arange(g), spec, fast.sink(), masks, of_token)
        shares = []
        for i in range(g):
            r = route(logits[i] + bias[i], spec, k, sel[i])
            ref.observe_routed(layers[i], x_norm[i], r.selected, r.weights)
            shares.append(hit_shares(r, masks[of_token][:, i]))
        assert hits is not None and hits.count == g * n
        assert hits.mass == pytest.approx(float(np.concatenate(shares).sum()), rel=1e-6)
        np.testing.assert_allclose(fast.scores, ref.scores, rtol=1e-6)
        if step == 0:  # the same experts were selected: the same ones still score zero
            assert np.array_equal(fast.scores == 0, ref.scores == 0) and (ref.scores == 0).any()


def test_kernel_selection_is_exact_on_ties() -> None:
    """Ties are broken as numpy's stable argsort does (lower expert id first): equal logits select
    the same experts, and Eq. 1 lands on them bit for bit."""
    n_expert, k = 16, 4
    kern = _kernel(n_expert, k, None, None)
    cfg = SchedulerConfig(decay=0.9)
    norms = np.ones((1, n_expert), dtype=np.float32)
    ref, fast = (ImportanceScheduler([0], n_expert, k, norms, cfg) for _ in range(2))
    logits = np.zeros((1, 3, n_expert), dtype=np.float32)
    logits[0, 1, [3, 9, 12]] = 1.0
    x_norm = np.ones((1, 3), dtype=np.float32)
    kern.score(logits, x_norm, np.arange(1), GatingSpec(), fast.sink())
    r = route(logits[0], GatingSpec(), k)
    ref.observe_routed(0, x_norm[0], r.selected, r.weights)
    assert np.array_equal(fast.scores > 0, ref.scores > 0)
    np.testing.assert_allclose(fast.scores, ref.scores, rtol=1e-7)


def test_token_masks() -> None:
    a, b, c = (np.full((2, 3), v) for v in (True, False, True))
    masks, of = token_masks([(2, a), (5, b)], c, 7)
    assert masks.shape == (3, 2, 3) and of.tolist() == [0, 0, 1, 1, 1, 2, 2]
    masks, of = token_masks([], c, 3)
    assert masks.shape == (1, 2, 3) and of.tolist() == [0, 0, 0]


def test_runtime_scores_captured_steps_in_c(tiny_gguf: str) -> None:
    """swapmoe decoding one token at a time scores through the kernel (not numpy's path), on router
    inputs the graph wrote into the capture area itself (no copy, no split)."""
    from swapmoe_gguf.runtime import SwapMoELlama

    llm = SwapMoELlama(tiny_gguf, policy="swapmoe", experts_per_layer=4, n_ctx=128, verbose=False)
    try:
        llm.eval([5, 17, 42])
        for t in range(24):
            llm.eval([t + 3])
        llm.score_pending()
        assert llm.tap.kernel_flushes > 0
        assert llm.tap.redirected_inputs >= 24 * len(llm.full_router.layers)
        assert llm.telemetry().hit_rate is not None
    finally:
        llm.close()
