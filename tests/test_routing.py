"""The routing module against independent references: numpy re-statements of the published routers
(DeepSeek-V3's grouped sigmoid router, gpt-oss's softmax over the selected experts) and llama.cpp's
own selection and weights on GGUFs written by llama.cpp's converter (tests/zoo.py)."""
from __future__ import annotations

import numpy as np
import pytest

from swapmoe_gguf.llamacpp.routing import GatingSpec, GraphNode, RoutingError, hit_shares, route, slot_mask_values

rng = np.random.default_rng(0)


def test_softmax_renormalised_is_mixtral():
    logits = rng.standard_normal((5, 8)).astype(np.float32)
    r = route(logits, GatingSpec(func="softmax", norm_w=True), 2)
    top = np.argsort(-logits, axis=-1)[:, :2]
    w = np.take_along_axis(logits, top, -1)
    w = np.exp(w - w.max(-1, keepdims=True))
    np.testing.assert_array_equal(r.selected, top)
    np.testing.assert_allclose(r.weights, w / w.sum(-1, keepdims=True), rtol=1e-6)


def test_deepseek_v3_grouped_sigmoid_router():
    """DeepSeek-V3's MoEGate (noaux_tc), restated: scores = sigmoid; choice scores += bias; group score =
    sum of its top-2; keep topk_group groups; top-k of the rest; weights = unbiased scores, normalised,
    times routed_scaling_factor."""
    n_tok, n_exp, n_group, topk_group, k, scale = 64, 16, 4, 2, 4, 2.5
    logits = rng.standard_normal((n_tok, n_exp)).astype(np.float32)
    bias = rng.standard_normal(n_exp).astype(np.float32)
    r = route(logits, GatingSpec(func="sigmoid", selection_bias=True, norm_w=True, scale=scale, n_group=n_group,
                                 n_group_used=topk_group), k, bias)
    for t in range(n_tok):
        scores = 1 / (1 + np.exp(-logits[t].astype(np.float64)))
        choice = scores + bias
        groups = choice.reshape(n_group, -1)
        gscore = np.sort(groups, -1)[:, -2:].sum(-1)
        keep = set(np.argsort(-gscore)[:topk_group].tolist())
        masked = np.array([choice[e] if e // (n_exp // n_group) in keep else -np.inf for e in range(n_exp)])
        top = np.argsort(-masked)[:k]
        w = scores[top] / scores[top].sum() * scale
        assert r.selected[t].tolist() == top.tolist()
        np.testing.assert_allclose(r.weights[t], w, rtol=1e-5)


def test_gpt_oss_softmax_over_selected():
    logits = rng.standard_normal((7, 8)).astype(np.float32) * 3
    r = route(logits, GatingSpec(func="softmax_weight"), 4)
    for t in range(7):
        top = np.argsort(-logits[t])[:4]
        w = np.exp(logits[t, top] - logits[t, top].max())
        np.testing.assert_allclose(r.weights[t], w / w.sum(), rtol=1e-6)


def test_llama4_ranks_by_logits_weighs_by_sigmoid():
    logits = rng.standard_normal((6, 8)).astype(np.float32)
    r = route(logits, GatingSpec(func="sigmoid", select="logits"), 1)
    np.testing.assert_array_equal(r.selected[:, 0], logits.argmax(-1))
    np.testing.assert_allclose(r.weights[:, 0], 1 / (1 + np.exp(-logits.max(-1))), rtol=1e-6)


def test_selection_bias_picks_but_does_not_weigh():
    logits = np.zeros((1, 4), dtype=np.float32)
    r = route(logits, GatingSpec(func="sigmoid", selection_bias=True), 1, np.array([0, 0, 5, 0], np.float32))
    assert r.selected.tolist() == [[2]] and r.weights[0, 0] == pytest.approx(0.5)


def test_hit_share_and_slot_mask():
    logits = np.array([[4.0, 3.0, 0.0, -1.0]], dtype=np.float32)
    r = route(logits, GatingSpec(func="softmax", norm_w=True), 2)           # selects 0 and 1
    assert hit_shares(r, np.array([True, False, True, True]))[0] == pytest.approx(r.weights[0, 0] / r.weights[0].sum())
    vals = slot_mask_values(r, [3, 1, 0], np.ones((1, 3), np.float32))     # slots hold experts 3, 1, 0
    assert vals.tolist() == [[-np.inf, 1.0, 1.0]]


def test_spec_from_graph_nodes():
    nodes = {"ffn_moe_logits": GraphNode("MUL_MAT"), "ffn_moe_probs": GraphNode("SIGMOID", ("ffn_moe_logits",)),
             "ffn_moe_probs_biased": GraphNode("ADD", ("ffn_moe_probs", "")),
             "ffn_moe_group_topk": GraphNode("ARGSORT"), "ffn_moe_argsort": GraphNode("ARGSORT", ("ffn_moe_probs_masked",)),
             "ffn_moe_weights_norm": GraphNode("DIV"), "ffn_moe_weights_scaled": GraphNode("SCALE", (), (2.5, 0.0))}
    spec = GatingSpec.from_nodes(nodes, n_group=8, n_group_used=4)
    assert spec == GatingSpec(func="sigmoid", selection_bias=True, norm_w=True, scale=2.5, n_group=8, n_group_used=4)
    with pytest.raises(RoutingError, match="TANH"):
        GatingSpec.from_nodes({"ffn_moe_probs": GraphNode("TANH"), "ffn_moe_argsort": GraphNode("ARGSORT", ("x",))})


# --- against llama.cpp's own graph, on files written by llama.cpp's converter ----------------------------

ARCHS = ["mixtral", "deepseek-v3", "gpt-oss", "llama4", "ernie4.5-moe", "glm4moe"]
PROMPT = b"Once upon a time there was a little girl named Lily. She"


def _llama_routing(path: str) -> dict:
    """Per MoE layer: (ours, llama.cpp's) selected experts [n_tok, k] and final weights [n_tok, k], policy full."""
    from swapmoe_gguf.llamacpp.ggml import ggml
    from swapmoe_gguf.runtime import SwapMoELlama

    rt = SwapMoELlama(path, policy="full", n_ctx=64, n_batch=64, n_threads=2)
    tap, k, rec = rt.tap, rt.vmodel.top_k, {}
    kinds = ["topk", "weights", "weights_softmax", "weights_norm", "weights_scaled"]  # in graph order
    for layer in rt.full_router.w_t:
        tap.wanted |= {f"ffn_moe_{kind}-{layer}".encode(): (kind, layer) for kind in kinds}

    def hook(kind: str, layer: int, t: int) -> None:
        g, r = ggml(), rec.setdefault(layer, {})
        if kind == "logits":
            r["ours"] = rt.full_router.route(layer, tap.last_input())
        elif kind == "topk":  # a view of the argsort: the first k columns
            full = g.tensor(g.tensor(t).view_src)
            buf = np.empty(full.ne[0] * full.ne[1], dtype=np.int32)
            g.lib.ggml_backend_tensor_get(g.tensor(t).view_src, buf.ctypes.data, 0, buf.nbytes)
            r["sel"] = buf.reshape(full.ne[1], full.ne[0])[:, :k]
        else:
            r["w"] = g.get_f32(t).reshape(-1, k)  # the last weights node of the layer wins

    tap.in_graph = hook
    if tap._filter is not None:
        tap._filter.prefix, tap._filter.prefix_len = b"ffn_moe_", len(b"ffn_moe_")
    tap.enabled = True
    try:
        rt.eval(rt.tokenize(PROMPT, add_bos=True))
    finally:
        rt.close()
    return rec


@pytest.mark.parametrize("arch", ARCHS)
def test_full_router_reproduces_llamacpp(arch):
    import zoo

    rec = _llama_routing(str(zoo.build(arch)))
    assert rec, "no MoE layer observed"
    for layer, r in rec.items():
        ours, n = r["ours"], r["sel"].shape[0]
        by_ours = np.argsort(ours.selected[-n:], -1)
        by_llama = np.argsort(r["sel"], -1)
        np.testing.assert_array_equal(np.take_along_axis(ours.selected[-n:], by_ours, -1),
                                      np.take_along_axis(r["sel"], by_llama, -1), err_msg=f"{arch} layer {layer}")
        np.testing.assert_allclose(np.take_along_axis(ours.weights[-n:], by_ours, -1),
                                   np.take_along_axis(r["w"], by_llama, -1), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{arch} layer {layer}")


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_equals_full_at_the_same_microbatch(arch):
    """`exact` with half the experts resident computes what `full` computes, token by token
    (both one token per micro-batch: exact's), whatever the gating."""
    import zoo
    from swapmoe_gguf.runtime import SwapMoELlama

    path = str(zoo.build(arch))
    out = {}
    for policy in ("full", "exact"):
        rt = SwapMoELlama(path, policy=policy, experts_per_layer=4, n_ctx=64, n_batch=1, n_ubatch=1, n_threads=2,
                          logits_all=True)
        try:
            rt.eval(rt.tokenize(PROMPT, add_bos=True))
            out[policy] = np.array(rt.scores[: rt.n_tokens])
            if policy == "exact":
                assert rt.telemetry().swaps > 0 and rt.policy.overflows == 0
        finally:
            rt.close()
    # not bit for bit: a softmax router's denominator needs every expert's logit, which the slot graph
    # does not compute, so exact writes numpy's f32 softmax (measured: <= 1.2e-4 of the largest logit)
    scale = max(1.0, float(np.abs(out["full"]).max()))
    assert float(np.abs(out["exact"] - out["full"]).max()) <= 5e-4 * scale


@pytest.mark.parametrize("slots", [3, 5])
def test_grouped_router_with_a_slot_count_groups_do_not_divide(slots):
    """DeepSeek-V3's 8 experts in 4 groups: S=3 or 5 slots cannot be grouped; the slot model routes among
    residents without groups (never llama.cpp's abort) and `exact` still follows the grouped choice."""
    import zoo
    from swapmoe_gguf.runtime import SwapMoELlama

    path = str(zoo.build("deepseek-v3"))
    out = {}
    for policy in ("full", "exact", "swapmoe"):
        rt = SwapMoELlama(path, policy=policy, experts_per_layer=slots, n_ctx=64, n_batch=1, n_ubatch=1,
                          n_threads=2, logits_all=True)
        try:
            assert rt.vmodel.slots == (8 if policy == "full" else slots)
            assert next(iter(rt.full_router.specs.values())).n_group == 4
            rt.eval(rt.tokenize(PROMPT, add_bos=True))
            out[policy] = np.array(rt.scores[: rt.n_tokens])
        finally:
            rt.close()
    assert np.isfinite(out["swapmoe"]).all()
    assert float(np.abs(out["exact"] - out["full"]).max()) <= 5e-4 * max(1.0, float(np.abs(out["full"]).max()))


def test_decode_step_routes_layers_together_as_one_by_one():
    """The tap's decode-step fast path (all layers' single rows routed in one pass) equals routing each
    layer alone, per-layer selection biases included."""
    from swapmoe_gguf.llamacpp.router import FullRouter, RouterTap

    r = np.random.default_rng(3)
    w = {l: r.standard_normal((8, 16)).astype(np.float32) for l in (1, 2, 4)}
    bias = {l: r.standard_normal(8).astype(np.float32) for l in (1, 4)}
    router = FullRouter(w, 2, selection_bias=bias)
    router.specs = {l: GatingSpec(func="sigmoid", selection_bias=True, norm_w=True, scale=2.0) for l in w}
    tap = RouterTap(router)
    xs = {l: r.standard_normal((1, 16)).astype(np.float32) for l in w}
    tap._seen = [(l, x, None) for l, x in xs.items()]  # (layer, input, no routing from a hook)
    batch = tap.take()
    assert batch.layers == [1, 2, 4]
    for l, xn, got in zip(batch.layers, batch.x_norm, batch.routed):
        want = router.route(l, xs[l])
        np.testing.assert_array_equal(got.selected, want.selected)
        np.testing.assert_allclose(got.weights, want.weights, rtol=1e-6)
        np.testing.assert_allclose(xn, np.linalg.norm(xs[l], axis=-1), rtol=1e-6)
