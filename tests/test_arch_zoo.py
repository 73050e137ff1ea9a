"""The runtime on GGUFs written by llama.cpp's OWN converter, one tiny random MoE per architecture.

tests/zoo.py builds each model (transformers' classes, then convert_hf_to_gguf.py from the
llama-cpp-python 0.3.36 sdist) and caches it; every llama.cpp run happens in a child process
(llama.cpp aborts the process on what it does not support). Per architecture:

* `full` on the `swapmoe convert` re-layout equals stock llama-cpp-python on the converted file,
  bit for bit, at every position of three prompts;
* `exact` with 4 of 8 experts per layer (a prompt in one graph, missing experts computed outside it;
  or micro-batches of S // k tokens where that FFN is not reproduced) equals stock decoding one token
  at a time, up to float rounding (routing weights, micro-batch sizes);
* `swapmoe` and `static` with 4 of 8 experts per layer run and give finite logits.

Known failures are xfail(strict=True) with the measured error, so a fix shows up as XPASS.
`python bench/arch_matrix.py` prints the same checks as a table (docs/architectures.md).
"""
from __future__ import annotations

import numpy as np
import pytest

import zoo

# |exact - stock| over all positions; rounding of routing weights gives ~1e-7..1e-4, a wrong expert ~0.1..1
EXACT_ATOL = 2e-3

WORKING = ["mixtral", "qwen3moe", "gpt-oss", "deepseek-v3", "deepseek-v2", "glm4moe", "ernie4.5-moe", "llama4",
           "qwen3next", "qwen3next-fused", "granite-hybrid", "qwen2moe", "olmoe", "dots1", "minimax-m2", "granitemoe",
           "hunyuan-moe", "lfm2-moe", "afmoe", "exaone-moe", "qwen3.5-moe", "glm4moe-lite", "cohere2moe",
           "granitemoe-shared", "laguna", "dbrx", "deepseek-v3.2", "granitemoe-swa", "glm4moe-mtp-decl", "nemotron-h",
           "mixtral-q8_0", "deepseek-v3-q8_0", "gpt-oss-q8_0", "mimo-v2-flash", "hy-v3",
           "phimoe", "solar-open", "glm-moe-dsa"]
# `exact` cuts their prompts into micro-batches of S // k tokens: expert_compute does not reproduce their
# expert FFN (expert biases and the clamped SwiGLU of gpt-oss, llama4's weights applied before the FFN,
# lfm2's expert input, nemotron-h's ungated squared ReLU); every other arch runs a prompt in one graph
MICRO_BATCHED = {"gpt-oss", "gpt-oss-q8_0", "llama4", "lfm2-moe", "nemotron-h"}
# stock llama.cpp runs it, the runtime does not (yet); cause in docs/architectures.md: jamba's loader
# makes a layer dense or MoE by an optional tensor's presence (llama_model_init_from_user creates
# every optional tensor, so the dense layers' weights are never asked for)
FAILING = ["jamba"]

# (recipe, check) -> the measured failure; strict: a fix turns it into XPASS (a failure to notice)
KNOWN: dict[tuple[str, str], str] = {
    ("jamba", "*"): "full: ModelBuildError: jamba: llama.cpp built this model without the file's "
                    "blk.0.ffn_down.weight (and 5 more): its loader chose another layer structure",
}


def _mark(name: str, check: str):  # type: ignore[no-untyped-def]
    reason = KNOWN.get((name, check)) or KNOWN.get((name, "*"))
    if not reason:
        return name
    return pytest.param(name, marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason))


def _params(check: str) -> list:
    return [_mark(n, check) for n in WORKING + FAILING]


class _Runs:
    """Every probe once per session (stock is shared by the checks)."""

    def __init__(self, root):  # type: ignore[no-untyped-def]
        self.root, self.cache = root, {}

    def _once(self, key: tuple, make):  # type: ignore[no-untyped-def]
        """make() once per key; a ZooError is remembered and raised as an AssertionError every time."""
        if key not in self.cache:
            try:
                self.cache[key] = make()
            except zoo.ZooError as e:
                self.cache[key] = e
        got = self.cache[key]
        if isinstance(got, zoo.ZooError):
            raise AssertionError(f"{key[1]}: {got}")
        return got

    def gguf(self, name: str):  # type: ignore[no-untyped-def]
        return self._once(("gguf", name), lambda: zoo.build(name))

    def swapready(self, name: str):  # type: ignore[no-untyped-def]
        return self._once(("swapready", name), lambda: zoo.relayout(self.gguf(name)))

    def probe(self, name: str, mode: str, n_batch: int = 512) -> dict:
        key = ("probe", name, mode, n_batch)
        if key not in self.cache:
            path = self.gguf(name) if mode == "stock" else self.swapready(name)
            self.cache[key] = zoo.probe(mode, path, self.root / f"{name}-{mode}-{n_batch}.npz", n_batch=n_batch)
        r = self.cache[key]
        assert r["ok"], f"{name} / {mode}: {r['error']}"
        return r


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> _Runs:  # type: ignore[no-untyped-def]
    return _Runs(tmp_path_factory.mktemp("zoo"))


def test_converter_comes_from_the_llama_cpp_python_sdist():
    conv = zoo.llamacpp_converter()
    assert (conv / "convert_hf_to_gguf.py").is_file() and (conv / "conversion" / "base.py").is_file()
    assert (conv / "gguf-py" / "gguf" / "__init__.py").is_file()


def _maxdiff(a: list, b: list) -> float:
    return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) for x, y in zip(a, b))


@pytest.mark.parametrize("name", _params("full"))
def test_full_equals_stock_bit_for_bit(runs, name):
    stock = runs.probe(name, "stock")
    full = runs.probe(name, "full")
    assert full["info"]["slots"] == full["info"]["n_expert"] == 8
    for a, b in zip(full["logits"], stock["logits"]):
        assert a.shape == b.shape and np.isfinite(b).all()
        assert np.array_equal(a, b), f"max |full - stock| = {np.max(np.abs(a - b)):.3g}"


@pytest.mark.parametrize("name", _params("exact"))
def test_exact_equals_stock(runs, name):
    stock = runs.probe(name, "stock", n_batch=1)
    exact = runs.probe(name, "exact")
    assert exact["info"]["policy"] == "exact" and exact["info"]["slots"] == zoo.EXPERTS_PER_LAYER
    # 4 of 8 resident: the router really moved experts in, or (prompts in one graph) computed them outside it
    assert exact["info"]["swaps"] + exact["info"]["streamed"] > 0
    assert exact["info"]["streams"] == (name not in MICRO_BATCHED)
    assert exact["info"]["streamed"] > 0 or name in MICRO_BATCHED
    d = _maxdiff(exact["logits"], stock["logits"])
    assert d <= EXACT_ATOL, f"max |exact - stock| = {d:.3g}"


@pytest.mark.parametrize("name", _params("policies"))
def test_swapmoe_and_static_run(runs, name):
    for mode in ("swapmoe", "static"):
        r = runs.probe(name, mode)
        assert r["info"]["slots"] == zoo.EXPERTS_PER_LAYER
        assert all(np.isfinite(x).all() for x in r["logits"]), mode


@pytest.mark.parametrize("name", _params("swapmoe"))
def test_scheduler_reads_in_c_as_in_python(runs, name):
    """Decode steps whose router inputs the graph writes into the tap's capture area (redirected by the
    C filter) and the scheduler scores every F steps in C give what reading them in Python on every
    step gives: the same swaps, the same logits (redirecting changes nothing the graph computes), the
    same importance scores up to float rounding (the router matmul over F tokens rounds the last bits
    differently from one token's; the kernel's softmax too), the same hit rate."""
    c, py = runs.probe(name, "decode-c"), runs.probe(name, "decode-py")
    assert c["info"]["captured"] > 0 and py["info"]["captured"] == 0
    assert c["info"]["redirected"] > 0
    assert c["info"]["swaps"] == py["info"]["swaps"]
    for a, b in zip(c["logits"], py["logits"]):
        assert np.array_equal(a, b)
    for a, b in zip(c["scores"], py["scores"]):
        assert np.allclose(a, b, rtol=1e-5, atol=1e-9 * max(1.0, np.abs(b).max()))
    assert c["info"]["hit_rate"] == pytest.approx(py["info"]["hit_rate"], rel=1e-6)


def test_a_converter_failure_names_its_cause():
    """kimi-linear: llama.cpp's converter wants Moonshot's own config (`linear_attn_config`), which
    transformers' KimiLinearConfig does not write; the failure is reported with its cause, not hidden."""
    with pytest.raises(zoo.ZooError, match="convert: KeyError: 'linear_attn_config'"):
        zoo.build("kimi-linear")


def test_every_per_expert_array_is_a_slot_row():
    """Arrays with an n_expert dimension are remapped to the resident experts like the expert weights
    (Hunyuan v3 writes its selection bias as `blk.N.exp_probs_b`, without a suffix: issue 27)."""
    from swapmoe_gguf.llamacpp.vmodel import row_kind

    n = 8
    assert row_kind("blk.1.ffn_gate_inp.weight", (n, 64), n) == "router"
    assert row_kind("blk.1.ffn_gate_inp.bias", (n,), n) == "router_bias"
    assert row_kind("blk.1.exp_probs_b.bias", (n,), n) == "selection_bias"
    assert row_kind("blk.1.exp_probs_b", (n,), n) == "selection_bias"
    assert row_kind("blk.1.exp_probs_b.bias", (1, n), n) == "selection_bias"  # ERNIE's shape
    assert row_kind("blk.1.ffn_down_exps.scale", (n,), n) == "other"        # per-expert scales
    assert row_kind("blk.1.ffn_gate_inp_shexp.weight", (n,), n) is None      # the shared expert's gate
    assert row_kind("blk.1.attn_sinks.weight", (n,), n) is None              # n_head == n_expert by chance
    assert row_kind("blk.1.exp_probs_b", (16,), n) is None
