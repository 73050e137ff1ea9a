"""The Virtual Experts runtime against stock llama.cpp and a numpy MoE reference."""
from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest

from conftest import ARCH_CONFIGS
from swapmoe_gguf.converters import convert
from swapmoe_gguf.base.errors import LayoutError
from swapmoe_gguf.fileformat.info import dequantize
from swapmoe_gguf.fileformat.reader import read_gguf
from swapmoe_gguf.runtime import SwapMoELlama
from swapmoe_gguf.llamacpp.vmodel import VirtualExpertModel

TOKENS = [1, 5, 9, 30, 2, 7, 8, 11]
SETTINGS = dict(n_ctx=128, n_threads=2, logits_all=True, verbose=False, flash_attn=True)


def _scores(llm) -> np.ndarray:
    llm.reset()
    llm.eval(TOKENS)
    return np.array(llm.scores[: len(TOKENS)])


@pytest.fixture(scope="module")
def converted(hf_models, stories_moe, tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    out = {}
    for arch in ARCH_CONFIGS:
        out[arch] = root / f"{arch}.gguf"
        convert(hf_models[arch], out[arch], "q8_0", progress=False)
    out["stories"] = root / "stories.gguf"
    convert(stories_moe, out["stories"], progress=False)
    return out


@pytest.mark.parametrize("name", [*ARCH_CONFIGS, "stories"])
def test_all_slots_equal_stock_llama_cpp(name, converted):
    path = str(converted[name])
    ref = llama_cpp.Llama(path, **SETTINGS)
    rt = SwapMoELlama(path, **SETTINGS)
    try:
        assert rt.memory.slots == rt.vmodel.n_expert
        assert np.array_equal(_scores(rt), _scores(ref))  # bit for bit
        assert rt.telemetry().hit_rate == 1.0
        # the tensors the file lacks are NULL again in llama.cpp's model: its graph reads none of them
        vm = rt.vmodel
        assert vm.unlinked >= len(vm._absent) > 0
        assert not set(vm.absent_filled) - {"output.weight"} & rt.tap.graph_inputs
    finally:
        rt.close()
        ref.close()


def test_swap_at_runtime_equals_fresh_build(converted):
    path = str(converted["qwen3moe"])
    rt = SwapMoELlama(path, experts_per_layer=2, initial_experts={0: [0, 1], 1: [0, 1]}, policy="static", **SETTINGS)
    fresh = SwapMoELlama(path, experts_per_layer=2, initial_experts={0: [3, 1], 1: [0, 2]}, policy="static", **SETTINGS)
    try:
        before = _scores(rt)
        rt.vmodel.swap(0, 0, 3)
        rt.request_swap(1, 1, 2)   # asynchronous path: read in the background, commit between decodes
        assert rt.apply_pending(wait=True) == 1
        assert rt.vmodel.slot_map == {0: [3, 1], 1: [0, 2]}
        after = _scores(rt)
        assert np.array_equal(after, _scores(fresh))
        assert not np.array_equal(after, before)
        t = rt.telemetry()
        assert t.swaps == 1 and t.bytes_read > 0 and t.resident == {0: (3, 1), 1: (0, 2)}
    finally:
        rt.close()
        fresh.close()


def _capture(vm: VirtualExpertModel, layer: int, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Router input and MoE output of `layer`, read from llama.cpp's graph with an eval callback."""
    from swapmoe_gguf.llamacpp.ggml import ggml

    g, want, got = ggml(), {f"ffn_moe_logits-{layer}".encode(), f"ffn_moe_out-{layer}".encode()}, {}

    @llama_cpp.ggml_backend_sched_eval_callback
    def cb(t, ask, _ud):
        name = ctypes.string_at(g.lib.ggml_get_name(t))
        if ask:
            return name in want
        if name in want:
            tensor = g.tensor(t)
            a = g.get_f32(tensor.src[1] if b"logits" in name else t)
            got[name] = a.reshape(-1, a.shape[-1]).copy()
        return True

    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_threads, p.n_threads_batch = 64, 64, 64, 2, 2
    p.cb_eval = cb
    ctx = llama_cpp.llama_init_from_model(vm.model, p)
    arr = (llama_cpp.llama_token * len(tokens))(*tokens)
    assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(tokens))) == 0
    llama_cpp.llama_free(ctx)
    return got[f"ffn_moe_logits-{layer}".encode()], got[f"ffn_moe_out-{layer}".encode()]


@pytest.mark.parametrize("resident", [[1, 3], [0, 2, 3]])
def test_masked_gating_matches_numpy_reference(hf_models, tmp_path, resident):
    """With S < n_expert, layer 0 routes among the resident experts only, top-k of S, renormalised
    (Mixtral's gating): compare llama.cpp's MoE output with numpy on the same input."""
    path = tmp_path / "m.gguf"
    convert(hf_models["mixtral"], path, "f32", progress=False)
    info = read_gguf(path)
    vm = VirtualExpertModel(path, len(resident), initial={0: resident, 1: resident})
    try:
        x, out = _capture(vm, 0, [5, 17, 42, 99, 7])  # [n_tok, n_embd], [n_tok, n_embd]
        w = {}
        for t in info.layer_expert_tensors(0):
            with open(path, "rb") as f:
                f.seek(t.offset)
                w[t.name.split(".")[2]] = dequantize(np.frombuffer(f.read(t.nbytes), np.uint8), t.qtype, t.shape)
        router = vm.router[0][resident]                       # [S, n_embd]
        logits = x @ router.T                                 # [n_tok, S]
        k = info.params.n_expert_used
        ref = np.zeros_like(out)
        for i in range(x.shape[0]):
            top = np.argsort(-logits[i])[:k]
            p = np.exp(logits[i, top] - logits[i, top].max())
            p /= p.sum()
            for wgt, s in zip(p, top):
                e = resident[s]
                gate, up = w["ffn_gate_exps"][e] @ x[i], w["ffn_up_exps"][e] @ x[i]
                ref[i] += wgt * (w["ffn_down_exps"][e] @ (gate / (1 + np.exp(-gate)) * up))
        assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
        # and it differs from the unrestricted (all-experts) routing
        full = x @ vm.router[0].T
        assert any(set(np.argsort(-full[i])[:k]) - set(resident) for i in range(x.shape[0]))
    finally:
        vm.close()


def test_dense_file_is_refused_in_one_line():
    """A GGUF without routed experts: one LayoutError from the runtime, one line and exit 2 from the CLI."""
    from conftest import STORIES_DENSE, run_cli

    with pytest.raises(LayoutError, match="not a Mixture-of-Experts"):
        SwapMoELlama(str(STORIES_DENSE), **SETTINGS)
    r = run_cli("chat", "-m", STORIES_DENSE, "-p", "hi", "-n", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "not a Mixture-of-Experts" in r.stderr, r.stderr


@pytest.mark.parametrize("aligned", [False, True])
def test_truncated_file_under_running_model_keeps_generating(converted, tmp_path, caplog, aligned):
    import os
    import shutil

    path = tmp_path / "victim.gguf"
    if aligned:  # page-aligned slices: the store reads with O_DIRECT
        from swapmoe_gguf.converters.tiny_checkpoint import write_tiny_mixtral

        convert(write_tiny_mixtral(tmp_path / "hf", hidden=256, ffn=512, layers=2, experts=4), path, "q8_0",
                progress=False)
    else:
        shutil.copy(converted["qwen2moe"], path)
    info = read_gguf(path)
    assert info.slices_aligned == aligned
    rt = SwapMoELlama(str(path), experts_per_layer=2, initial_experts={0: [0, 1], 1: [0, 1]}, policy="static",
                      **SETTINGS)
    try:
        import itertools

        before = list(itertools.islice(rt.generate([5, 17, 42], temp=0.0), 8))
        cut = min(t.offset for t in info.layer_expert_tensors(1))
        os.truncate(path, cut)  # every expert of layer 1 is gone from the disk
        rt.request_swap(1, 0, 3)
        rt.request_swap(0, 1, 2)  # layer 0 is still readable
        rt.apply_pending(wait=True)
        rt.reset()
        after = list(itertools.islice(rt.generate([5, 17, 42], temp=0.0), 8))
        assert len(after) == len(before) == 8
        t = rt.telemetry()
        assert t.swap_failures == 1 and t.swaps == 1
        assert t.resident == {0: (0, 2), 1: (0, 1)}  # the failed slot kept its expert
        assert sum("expert read failed" in r.message for r in caplog.records) == 1  # logged once
    finally:
        rt.close()


def test_tied_embeddings_quantized(tmp_path):
    """A tied Q8_0 model: llama.cpp would build the absent output.weight as F32; the runtime
    declares it with token_embd's type and copies the bytes, so the logits stay exact."""
    import json

    from swapmoe_gguf.converters.safetensors_io import Checkpoint
    from swapmoe_gguf.converters.tiny_checkpoint import save_safetensors, write_tiny_mixtral

    d = write_tiny_mixtral(tmp_path / "tied", hidden=128, ffn=256, layers=2, experts=4)
    with Checkpoint(d) as ck:
        arrays = {n: ck.get(n) for n in ck.names() if n != "lm_head.weight"}
    save_safetensors(d / "model.safetensors", {n: (a.shape, a.dtype) for n, a in arrays.items()}, arrays.__getitem__)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    path = tmp_path / "tied.gguf"
    convert(d, path, "q8_0", progress=False)
    assert "output.weight" not in {t.name for t in read_gguf(path).tensors}
    ref = llama_cpp.Llama(str(path), **SETTINGS)
    rt = SwapMoELlama(str(path), **SETTINGS)
    try:
        assert np.array_equal(_scores(rt), _scores(ref))
        assert "output.weight" in rt.vmodel.absent_filled
    finally:
        rt.close()
        ref.close()


def test_request_stop_interrupts_before_the_next_step(converted):
    rt = SwapMoELlama(str(converted["mixtral"]), **SETTINGS)
    try:
        rt.eval(TOKENS[:3])
        rt.request_stop()
        with pytest.raises(KeyboardInterrupt):
            rt.eval([5])
        rt.eval([5])  # the request was consumed
        rt.request_stop()
        rt.clear_stop()
        rt.eval([6])
        assert rt.n_tokens == 5
    finally:
        rt.close()
