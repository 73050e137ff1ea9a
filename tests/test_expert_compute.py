"""Experts computed outside llama.cpp's graph (expert_compute.py), the stream of their reads
(ExpertStore.stream), and the ranking values a streamed batch writes (policies.stream_picks)."""
from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import dequantize

from swapmoe_gguf.converters import convert
from swapmoe_gguf.converters.tiny_checkpoint import write_tiny_mixtral
from swapmoe_gguf.llamacpp.expert_compute import ExpertFFN, ffn_spec, run_expert
from swapmoe_gguf.store.expert_store import ExpertReadError, ExpertStore
from swapmoe_gguf.fileformat.reader import read_gguf
from swapmoe_gguf.residency.policies import stream_picks
from swapmoe_gguf.llamacpp.routing import GraphNode, Routed


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ec")
    src = write_tiny_mixtral(root / "hf", hidden=256, ffn=512, layers=2, experts=8, heads=4, kv_heads=2,
                             dtype=np.dtype(np.uint16), std=0.05)
    out = {}
    for qt in ("f16", "q8_0", "q4_k_m"):
        out[qt] = str(root / f"m-{qt}.gguf")
        convert(src, out[qt], qt, progress=False)
    return out


def _ffn(info, layer: int) -> ExpertFFN:
    by = {t.name.split(".")[-2]: t for t in info.layer_expert_tensors(layer)}
    return ExpertFFN(by["ffn_gate_exps"], by["ffn_up_exps"], by["ffn_down_exps"], "ffn_moe_swiglu")


# relative error of ggml's kernels against f32 math on the dequantised weights: the activations are
# quantised to the weights' dot type (q8_0 / q8_K) as in llama.cpp's graph, F16 keeps them in f16
@pytest.mark.parametrize("qt,tol", [("f16", 2e-3), ("q8_0", 3e-2), ("q4_k_m", 5e-2)])
def test_run_expert_matches_f32_math_on_the_dequantised_weights(files, qt, tol):
    info = read_gguf(files[qt])
    ffn = _ffn(info, 1)
    store = ExpertStore(info)
    try:
        staged = store.read(1, 5)
        x = np.random.default_rng(0).standard_normal((7, ffn.n_embd)).astype(np.float32)
        got = run_expert(ffn, staged, x, n_threads=2)

        def mat(t):  # [rows, cols] f32
            return dequantize(staged.parts[t.name], t.qtype).reshape(t.shape[1:]).astype(np.float32)

        g, u = x @ mat(ffn.gate).T, x @ mat(ffn.up).T
        ref = (g / (1 + np.exp(-g)) * u) @ mat(ffn.down).T
        assert got.shape == ref.shape == (7, ffn.n_embd)
        assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
        # another expert gives another answer (the staged bytes are really what is computed)
        other = store.read(1, 6)
        assert np.abs(run_expert(ffn, other, x) - got).max() > 10 * tol * np.abs(ref).max()
        store.release(other)
        store.release(staged)
        with pytest.raises(ValueError, match="expected"):
            run_expert(ffn, staged, x[:, :-1])
    finally:
        store.close()


def _nodes(**over) -> dict[str, GraphNode]:
    nodes = {
        "ffn_moe_logits": GraphNode("MUL_MAT", ("", "ffn_norm")),
        "ffn_moe_probs": GraphNode("SOFT_MAX", ("ffn_moe_logits",)),
        "ffn_moe_up": GraphNode("MUL_MAT_ID", ("", "ffn_norm", "ffn_moe_topk")),
        "ffn_moe_gate": GraphNode("MUL_MAT_ID", ("", "ffn_norm", "ffn_moe_topk")),
        "ffn_moe_swiglu": GraphNode("GLU", ("ffn_moe_gate", "ffn_moe_up")),
        "ffn_moe_down": GraphNode("MUL_MAT_ID", ("", "ffn_moe_swiglu", "ffn_moe_topk")),
        "ffn_moe_weighted": GraphNode("MUL", ("ffn_moe_down", "ffn_moe_weights")),
        "ffn_moe_out": GraphNode("ADD", ("ffn_moe_weighted", "ffn_moe_weighted")),
    }
    for k, v in over.items():
        if v is None:
            nodes.pop(k)
        else:
            nodes[k] = v
    return nodes


def test_ffn_spec_reads_the_graph_and_names_what_it_cannot_reproduce(files):
    tensors = read_gguf(files["f16"]).layer_expert_tensors(0)
    ok = ffn_spec(_nodes(), tensors)
    assert isinstance(ok, ExpertFFN) and ok.act == "ffn_moe_swiglu" and (ok.n_embd, ok.n_ff) == (256, 512)
    cases = {
        "ffn_moe_up_biased": _nodes(ffn_moe_up_biased=GraphNode("ADD_ID")),           # gpt-oss
        "another input": _nodes(ffn_moe_up=GraphNode("MUL_MAT_ID", ("", "ffn_moe_weighted_in"))),  # llama4
        "down projection": _nodes(ffn_moe_weighted=GraphNode("MUL", ("ffn_moe_weights",))),
        "no gated": _nodes(ffn_moe_swiglu=None, ffn_moe_relu_sqr=GraphNode("SQR")),    # nemotron-h
    }
    for why, nodes in cases.items():
        got = ffn_spec(nodes, tensors)
        assert isinstance(got, str) and why in got, (why, got)
    assert "gate/up/down" in ffn_spec(_nodes(), tensors[:2])


def test_stream_reads_in_order_and_gives_every_buffer_back(files):
    info = read_gguf(files["q8_0"])
    store = ExpertStore(info, staging_buffers=2)
    try:
        experts = [6, 1, 3, 7, 0]
        stream = store.stream(1, experts)
        got = []
        for e, staged in zip(experts, stream):
            assert not isinstance(staged, ExpertReadError)
            assert staged.expert == e and staged.layer == 1
            t = info.layer_expert_tensors(1)[0]
            assert bytes(staged.parts[t.name][:64]) == bytes(store.pread(t.expert_range(e)[0], 64))
            got.append(e)
            store.release(staged)
            if len(got) == 3:
                break  # a consumer that stops early: close() finishes or cancels the rest
        stream.close()
        assert got == [6, 1, 3]
        assert store._free.qsize() == 2  # every staging buffer back
        again = []
        for staged in store.stream(0, [2, 4]):
            again.append(staged.expert)
            store.release(staged)
        assert again == [2, 4]
    finally:
        store.close()


def test_stream_picks_rank_the_resident_experts_first_then_weightless_fillers():
    rng = np.random.default_rng(1)
    n_expert, k, slots = 16, 4, [3, 9, 0, 12, 5, 7, 14, 1]
    selected = np.stack([rng.permutation(n_expert)[:k] for _ in range(50)])            # [50, k]
    weights = rng.random((50, k)).astype(np.float32)
    routed = Routed(np.zeros((50, n_expert), np.float32), selected, weights)
    values, w = stream_picks(routed, slots, n_expert)
    assert values.shape == (50, len(slots)) and w.shape == (50, k)
    top = np.argsort(-values, axis=1, kind="stable")[:, :k]                             # llama.cpp's top-k
    for t in range(50):
        rest = np.delete(values[t], top[t])
        assert len(set(values[t][top[t]])) == k and values[t][top[t]].min() > rest.max()  # no ties at the cut
        picked = [slots[s] for s in top[t]]
        resident = [e for e in selected[t] if e in slots]
        assert picked[: len(resident)] == resident                                      # full model's order
        assert np.allclose(w[t, : len(resident)], [weights[t][list(selected[t]).index(e)] for e in resident])
        assert (w[t, len(resident):] == 0).all()                                        # fillers weigh nothing
