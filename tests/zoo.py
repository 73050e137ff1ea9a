"""Architecture zoo: tiny random MoE checkpoints converted by llama.cpp's OWN converter.

Each recipe builds a small random Hugging Face model (transformers' config classes +
`save_pretrained`, float32, 8 experts, top-2) and converts it with `convert_hf_to_gguf.py` of the
llama.cpp that llama-cpp-python==0.3.36 vendors (taken from its sdist with pip, never from a model
hub). Results are cached under $SWAPMOE_TEST_CACHE (default ~/.cache/swapmoe-gguf-tests), keyed by
a hash of the recipe and of the library versions; every cache entry is written to a temporary
directory and renamed into place.

Also a small probe CLI, run in a subprocess by the tests and by bench/arch_matrix.py because
llama.cpp may abort the process on an unsupported model:

    python tests/zoo.py probe MODE GGUF OUT.npz [--n-batch N]

MODE is `stock` (llama_cpp.Llama on the file) or a SwapMoELlama policy: `full`, `exact`,
`swapmoe`, `static` (the last three at EXPERTS_PER_LAYER experts per layer). OUT.npz holds one
[n_tokens, n_vocab] array of logits (every position) per prompt of PROMPTS.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tests" / "data" / "tok512.model"
LLAMA_CPP_PYTHON = "0.3.36"
ZOO_VERSION = 2  # bump when the recipes' construction changes in a way the hash does not see
EXPERTS_PER_LAYER = 4

# token ids of the 512-token sentencepiece vocabulary (1 = <s>)
PROMPTS = [
    [1, 365, 211, 263, 93, 17, 42],
    [1, 5, 9, 30, 2, 7, 8, 11, 300, 412],
    [1, 100, 200, 300, 400, 500, 20, 31, 44, 71, 99, 128],
]
RUN_KW = dict(n_ctx=128, n_threads=2, logits_all=True, type_k=0, type_v=0, flash_attn=True, verbose=False, seed=0)


class ZooError(RuntimeError):
    """A step failed: `stage` (build, convert, ...) and the most telling line of its output."""

    def __init__(self, stage: str, line: str, output: str = ""):
        super().__init__(f"{stage}: {line}")
        self.stage, self.line, self.output = stage, line, output


def cache_root() -> Path:
    env = os.environ.get("SWAPMOE_TEST_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "swapmoe-gguf-tests"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _atomic_dir(final: Path, fill) -> Path:  # type: ignore[no-untyped-def]
    """Build `final` with fill(tmpdir) in a sibling temp dir, then rename it into place."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        fill(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------------
# llama.cpp's converter, from the llama-cpp-python sdist
# ------------------------------------------------------------------------------------------------

def llamacpp_converter() -> Path:
    """A directory with convert_hf_to_gguf.py, conversion/ and gguf-py/ of llama-cpp-python==0.3.36."""
    return _from_sdist(f"llama.cpp-converter-{LLAMA_CPP_PYTHON}",
                       ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/", "LICENSE"),
                       "convert_hf_to_gguf.py")


def llamacpp_server_tests() -> Path:
    """llama-server's own pytest suite (`tools/server/tests/`) of llama-cpp-python==0.3.36, with the
    chat templates its template tests read (`models/templates/`)."""
    return _from_sdist(f"llama.cpp-server-tests-{LLAMA_CPP_PYTHON}",
                       ("tools/server/tests/", "models/templates/", "LICENSE"), "tools/server/tests/utils.py")


def _from_sdist(dirname: str, wanted: tuple[str, ...], must_have: str) -> Path:
    """Files of the vendored llama.cpp under these prefixes, extracted once into the test cache."""
    final = cache_root() / dirname

    def fill(tmp: Path) -> None:
        dl = tmp / ".sdist"  # pip keeps its own cache of the download
        dl.mkdir()
        name = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        if not (dl / name).is_file():
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                   f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(dl)],
                                  capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0 and (dl / name).is_file(), (
                f"pip could not download the llama-cpp-python=={LLAMA_CPP_PYTHON} sdist (needed for llama.cpp's "
                f"{must_have}): rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(dl / name) as tf:
            members = []
            for m in tf.getmembers():
                if not m.name.startswith(prefix):
                    continue
                rel = m.name[len(prefix):]
                if (m.isfile() or m.isdir()) and rel.startswith(wanted) and ".." not in rel.split("/"):
                    m = copy.copy(m)
                    m.name = rel
                    members.append(m)
            assert any(m.name == must_have for m in members), f"{name} has no {prefix}{must_have}"
            tf.extractall(tmp, members=members, filter="data")
        shutil.rmtree(dl)

    return _atomic_dir(final, fill)


# ------------------------------------------------------------------------------------------------
# recipes
# ------------------------------------------------------------------------------------------------

BASE = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1,
            eos_token_id=2, pad_token_id=None)


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    config: str            # transformers config class
    model: str             # transformers model class (its name is the `architectures` entry)
    hparams: dict[str, Any]
    convert_args: tuple[str, ...] = ()
    seed: int = 0
    what: str = ""         # what it exercises
    config_json: dict[str, Any] = dataclasses.field(default_factory=dict)  # written over config.json after saving
    outtype: str = "f32"   # convert_hf_to_gguf.py --outtype

    def key(self) -> str:
        import torch
        import transformers

        blob = json.dumps([ZOO_VERSION, LLAMA_CPP_PYTHON, transformers.__version__, torch.__version__,
                           self._fields(), _file_sha(TOKENIZER)], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


    def _fields(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["outtype"] == "f32":  # keys of F32 recipes as before the field existed
            del d["outtype"]
        return d


def _file_sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "missing"


def _r(name: str, config: str, model: str, what: str, convert_args: tuple[str, ...] = (),
       config_json: dict[str, Any] | None = None, **hp: Any) -> Recipe:
    return Recipe(name, config, model, {**BASE, **hp}, convert_args, what=what, config_json=config_json or {})


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    _r("mixtral", "MixtralConfig", "MixtralForCausalLM", "softmax top-2, renormalised",
       num_local_experts=8, num_experts_per_tok=2, intermediate_size=64),
    _r("qwen3moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "softmax, norm_topk_prob, QK-norm",
       num_experts=8, num_experts_per_tok=2, intermediate_size=128, moe_intermediate_size=64, head_dim=16,
       norm_topk_prob=True),
    _r("gpt-oss", "GptOssConfig", "GptOssForCausalLM", "softmax over selected, router bias, expert biases, sinks, SWA",
       num_local_experts=8, num_experts_per_tok=2, intermediate_size=64, head_dim=16, sliding_window=8,
       layer_types=["sliding_attention", "full_attention"]),
    _r("deepseek-v3", "DeepseekV3Config", "DeepseekV3ForCausalLM",
       "sigmoid, e_score_correction_bias, groups, routed_scaling_factor, norm_topk_prob, MLA, dense layer 0, shared",
       num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
       num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
       first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
       v_head_dim=16, num_key_value_heads=4, num_mtp_layers=0,
       scoring_func="sigmoid", topk_method="noaux_tc"),  # as DeepSeek-V3's own config.json (transformers omits them)
    _r("deepseek-v2", "DeepseekV2Config", "DeepseekV2ForCausalLM",
       "softmax greedy, routed_scaling_factor, MLA, dense layer 0, 2 shared experts",
       num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2,
       num_experts_per_tok=2, routed_scaling_factor=1.5, norm_topk_prob=False, topk_method="greedy",
       first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
       v_head_dim=16, num_key_value_heads=4),
    _r("glm4moe", "Glm4MoeConfig", "Glm4MoeForCausalLM",
       "sigmoid, e_score_correction_bias, routed_scaling_factor, dense layer 0, shared expert, QK-norm",
       num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
       num_experts_per_tok=2, routed_scaling_factor=1.8, norm_topk_prob=True, first_k_dense_replace=1,
       use_qk_norm=True, head_dim=16, num_mtp_layers=0),
    _r("glm4moe-mtp-decl", "Glm4MoeConfig", "Glm4MoeForCausalLM",
       "as glm4moe, config.json declares 1 MTP layer (GLM-4.5's own): the GGUF has nextn_predict_layers=1, no MTP weights",
       num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
       num_experts_per_tok=2, routed_scaling_factor=1.8, norm_topk_prob=True, first_k_dense_replace=1,
       use_qk_norm=True, head_dim=16, num_mtp_layers=0, config_json={"num_nextn_predict_layers": 1}),
    _r("ernie4.5-moe", "Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM",
       "softmax + e_score_correction_bias (selection only), moe_norm_min, dense layer 0, 2 shared experts",
       num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32, moe_num_experts=8, moe_k=2,
       moe_num_shared_experts=2, moe_layer_start_index=1),
    _r("llama4", "Llama4TextConfig", "Llama4ForCausalLM", "sigmoid top-k weights on the input, shared expert, NoPE layers",
       num_hidden_layers=4, intermediate_size=64, intermediate_size_mlp=128, num_local_experts=8,
       num_experts_per_tok=2, head_dim=16, interleave_moe_layer_step=1, attention_chunk_size=64),
    _r("qwen3next", "Qwen3NextConfig", "Qwen3NextForCausalLM", "gated delta-net + attention, shared expert gate",
       ("--no-mtp",), num_hidden_layers=4, intermediate_size=128, moe_intermediate_size=32,
       shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=16, linear_key_head_dim=16,
       linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, norm_topk_prob=True),
    _r("qwen3next-fused", "Qwen3NextConfig", "Qwen3NextForCausalLM", "as qwen3next, --fuse-gate-up-exps",
       ("--no-mtp", "--fuse-gate-up-exps"), num_hidden_layers=4, intermediate_size=128, moe_intermediate_size=32,
       shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=16, linear_key_head_dim=16,
       linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, norm_topk_prob=True),
    _r("granite-hybrid", "GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
       "mamba2 + attention, shared MLP, multipliers",
       # transformers 5 saves layer_types as linear_attention/full_attention; llama.cpp's converter looks
       # for "attention" (as in IBM's own config.json) and would make every layer an SSM layer
       config_json={"layer_types": ["mamba", "attention"]},
       layer_types=["mamba", "attention"], intermediate_size=64, shared_intermediate_size=64, num_local_experts=8,
       num_experts_per_tok=2, mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_n_groups=1, mamba_expand=2,
       mamba_chunk_size=16, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0,
       attention_multiplier=0.2),
    _r("qwen2moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", "softmax, no renorm, gated shared expert",
       num_experts=8, num_experts_per_tok=2, intermediate_size=128, moe_intermediate_size=64,
       shared_expert_intermediate_size=128),
    _r("olmoe", "OlmoeConfig", "OlmoeForCausalLM", "softmax, no renorm, QK-norm",
       num_experts=8, num_experts_per_tok=2, intermediate_size=64, num_key_value_heads=4),
    _r("dots1", "Dots1Config", "Dots1ForCausalLM", "sigmoid + e_score_correction_bias, full MHA, dense layer 0, shared",
       num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
       num_experts_per_tok=2, routed_scaling_factor=1.5, norm_topk_prob=True, first_k_dense_replace=1,
       num_key_value_heads=4, head_dim=16, scoring_func="sigmoid"),  # as dots.llm1's config.json
    _r("minimax-m2", "MiniMaxM2Config", "MiniMaxM2ForCausalLM", "sigmoid + e_score_correction_bias, QK-norm",
       num_local_experts=8, num_experts_per_tok=2, intermediate_size=64, head_dim=16, rotary_dim=8,
       scoring_func="sigmoid", use_routing_bias=True),  # MiniMax-M2's config.json
    _r("granitemoe", "GraniteMoeConfig", "GraniteMoeForCausalLM", "softmax over selected, multipliers",
       num_local_experts=8, num_experts_per_tok=2, intermediate_size=64, embedding_multiplier=2.0,
       residual_multiplier=0.5, logits_scaling=2.0, attention_multiplier=0.2),
    _r("hunyuan-moe", "HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", "softmax, shared MLP, QK-norm",
       # llama.cpp's converter reads Tencent's per-layer lists, which transformers' config writes as ints
       config_json={"moe_topk": [2, 2], "moe_intermediate_size": [64, 64], "num_shared_expert": [1, 1]},
       num_experts=8, moe_topk=2, intermediate_size=64, moe_intermediate_size=64, num_shared_expert=1, head_dim=16,
       use_qk_norm=True),
    _r("lfm2-moe", "Lfm2MoeConfig", "Lfm2MoeForCausalLM", "sigmoid + expert bias, short conv, dense layer 0",
       num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
       num_dense_layers=1, layer_types=["conv", "full_attention", "conv"], tie_word_embeddings=True),
    _r("afmoe", "AfmoeConfig", "AfmoeForCausalLM", "sigmoid + expert bias, route_scale, dense layer 0, shared, SWA",
       num_hidden_layers=3, num_dense_layers=1, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
       num_experts_per_tok=2, num_shared_experts=1, route_scale=1.5, head_dim=16, global_attn_every_n_layers=2,
       sliding_window=8),
    _r("exaone-moe", "ExaoneMoeConfig", "ExaoneMoeForCausalLM", "sigmoid + correction bias, scale, dense layer 0, shared",
       num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
       num_experts_per_tok=2, num_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, sliding_window=8,
       scoring_func="sigmoid"),  # as K-EXAONE's config.json; llama.cpp requires expert_gating_func
    _r("jamba", "JambaConfig", "JambaForCausalLM", "mamba1 + attention, MoE every other layer",
       num_hidden_layers=4, intermediate_size=64, num_experts=8, num_experts_per_tok=2, expert_layer_period=2,
       expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, use_mamba_kernels=False, mamba_d_state=16),
    _r("qwen3.5-moe", "Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", "gated delta-net + attention, shared expert",
       ("--no-mtp",), num_hidden_layers=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
       num_experts=8, num_experts_per_tok=2, head_dim=64, linear_key_head_dim=16, linear_value_head_dim=16,
       linear_num_key_heads=2, linear_num_value_heads=4,
       # M-RoPE sections that fit the 16 rotated dims (the converter's default [11, 11, 10] needs head_dim 256)
       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                        "mrope_section": [3, 3, 2], "mrope_interleaved": True}),
    _r("nemotron-h", "NemotronHConfig", "NemotronHForCausalLM", "mamba2 + attention + MoE layers, relu2 experts, sigmoid",
       num_hidden_layers=4, layers_block_type=["linear_attention", "moe", "full_attention", "moe"], head_dim=16,
       intermediate_size=64, mamba_num_heads=4, mamba_head_dim=32, ssm_state_size=16, n_groups=1, expand=2,
       chunk_size=16, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32,
       moe_shared_expert_intermediate_size=32, num_experts_per_tok=2, routed_scaling_factor=2.5, norm_topk_prob=True),
    _r("glm4moe-lite", "Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", "MLA (DeepSeek-2 graph), sigmoid + bias, shared",
       num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
       num_experts_per_tok=2, routed_scaling_factor=1.8, norm_topk_prob=True, kv_lora_rank=32, q_lora_rank=32,
       qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4,
       mlp_layer_types=["dense", "sparse", "sparse"],
       # GLM-4.7-Flash's own config.json; the converter (DeepseekV2Model) reads it, not mlp_layer_types
       config_json={"first_k_dense_replace": 1}),
    _r("cohere2moe", "Cohere2MoeConfig", "Cohere2MoeForCausalLM", "softmax, LayerNorm, parallel block, SWA",
       intermediate_size=64, num_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=8,
       sliding_window_pattern=2, logit_scale=0.5, tie_word_embeddings=True),
    _r("granitemoe-shared", "GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", "granitemoe + shared MLP",
       num_local_experts=8, num_experts_per_tok=2, intermediate_size=64, shared_intermediate_size=64,
       embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0, attention_multiplier=0.2),
    _r("laguna", "LagunaConfig", "LagunaForCausalLM", "sigmoid?, shared expert, gated attention, SWA",
       intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8,
       num_experts_per_tok=2, head_dim=16, sliding_window=8, moe_routed_scaling_factor=1.5,
       mlp_layer_types=["dense", "sparse"]),
    _r("kimi-linear", "KimiLinearConfig", "KimiLinearForCausalLM", "KDA linear attention + MLA, sigmoid + bias",
       num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32, num_local_experts=8, n_shared_experts=1,
       num_experts_per_tok=2, routed_scaling_factor=2.0, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
       v_head_dim=16, num_key_value_heads=4, linear_head_dim=16, linear_num_heads=4,
       # every layer sparse: transformers names a dense layer's MLP block_sparse_moe.*, which the converter cannot map
       mlp_layer_types=["sparse", "sparse", "sparse"], layer_types=["linear_attention", "full_attention", "linear_attention"]),
    _r("mimo-v2-flash", "MiMoV2FlashConfig", "MiMoV2FlashForCausalLM", "sigmoid + bias, SWA with sinks, v_head_dim != head_dim",
       num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
       num_experts_per_tok=2, head_dim=24, v_head_dim=16, sliding_window=8,
       layer_types=["full_attention", "sliding_attention", "sliding_attention"],
       mlp_layer_types=["dense", "sparse", "sparse"], scoring_func="sigmoid",
       rope_parameters={t: {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
                        for t in ("full_attention", "sliding_attention")},
       # the converter reads Xiaomi's own keys, which transformers' config does not write
       config_json={"swa_head_dim": 24, "swa_v_head_dim": 16, "swa_num_attention_heads": 4,
                    "swa_num_key_value_heads": 4, "hybrid_layer_pattern": [0, 1, 1], "topk_method": "noaux_tc",
                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
    _r("deepseek-v3.2", "DeepseekV32Config", "DeepseekV32ForCausalLM", "DeepSeek-V3 routing + DSA indexer",
       ("--no-mtp",), num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
       n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
       first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
       v_head_dim=16, head_dim=16, num_key_value_heads=4, index_topk=4, index_head_dim=64, index_n_heads=4,
       scoring_func="sigmoid", topk_method="noaux_tc"),
    _r("granitemoe-swa", "GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM", "granitemoe with sliding-window layers",
       num_local_experts=8, num_experts_per_tok=2, intermediate_size=64, sliding_window=8,
       embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0, attention_multiplier=0.2),
    _r("hy-v3", "HYV3Config", "HYV3ForCausalLM",
       "sigmoid + selection bias written as blk.N.exp_probs_b (no suffix), scale, dense layer 0, shared, QK-norm",
       num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
       num_shared_experts=1, head_dim=16, router_scaling_factor=2.0, mlp_layer_types=["dense", "sparse", "sparse"]),
    _r("phimoe", "PhimoeConfig", "PhimoeForCausalLM", "sparsemixer top-2 (llama.cpp: softmax), LayerNorm, biases",
       # Microsoft's config.json names the class PhiMoEForCausalLM, which is what llama.cpp's converter knows
       config_json={"architectures": ["PhiMoEForCausalLM"]},
       num_local_experts=8, num_experts_per_tok=2, intermediate_size=64, attention_bias=True, lm_head_bias=True,
       router_jitter_noise=0.0, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "factor": 1.0,
                                                 "long_factor": [1.0] * 8, "short_factor": [1.0] * 8,
                                                 "original_max_position_embeddings": 256,
                                                 "short_mscale": 1.0, "long_mscale": 1.0}),
    _r("solar-open", "SolarOpenConfig", "SolarOpenForCausalLM", "sigmoid + correction bias, shared expert (GLM-4.5 graph)",
       moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
       routed_scaling_factor=1.5, head_dim=16),
    _r("glm-moe-dsa", "GlmMoeDsaConfig", "GlmMoeDsaForCausalLM", "GLM-5: MLA + DSA indexer, sigmoid + bias, dense layer 0",
       ("--no-mtp",), num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
       n_shared_experts=1, num_experts_per_tok=2, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=32,
       qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, head_dim=16, num_key_value_heads=4,
       index_topk=4, index_head_dim=64, index_n_heads=4, first_k_dense_replace=1,
       mlp_layer_types=["dense", "sparse", "sparse"]),
    Recipe("dbrx", "DbrxConfig", "DbrxForCausalLM",
           dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=256, vocab_size=512, initializer_range=0.1,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
                ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 8, "moe_top_k": 2}),
           what="softmax, renormalised, fused Wqkv with clamp"),
]}
# the same checkpoints, quantized by llama.cpp's converter (Q8_0 expert slices, F32 norms/routers)
for _base in ("mixtral", "deepseek-v3", "gpt-oss"):
    _q = dataclasses.replace(RECIPES[_base], name=f"{_base}-q8_0", outtype="q8_0",
                             what=f"as {_base}, --outtype q8_0")
    RECIPES[_q.name] = _q
# F16, as llama.cpp's converter encodes it (tests/test_convert_llamacpp.py compares the bytes)
for _base in ("mixtral", "deepseek-v3"):
    _q = dataclasses.replace(RECIPES[_base], name=f"{_base}-f16", outtype="f16", what=f"as {_base}, --outtype f16")
    RECIPES[_q.name] = _q


def _perturb(model: Any, n_expert: int) -> None:
    """Constant-initialised tensors (norms at 1 or 0, biases, sinks, correction biases) get noise, routers x4."""
    import torch

    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()]
        for name, t in tensors:
            if not t.is_floating_point() or t.numel() == 0:
                continue
            if not torch.isfinite(t).all():
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            flat = t.reshape(-1)
            low = name.lower()
            if "inv_freq" in low or "rotary" in low:
                continue
            if "sink" in low or (low.endswith("bias") and ("router" in low or ".gate." in low)):
                t.add_(0.5 * torch.randn(t.shape, generator=g))  # attention sinks, router biases: make them count
            elif t.numel() > 1 and bool((flat == flat[0]).all()) or t.numel() == 1:
                scale = 0.5 if ("bias" in low or "sink" in low) else 0.1
                t.add_(scale * torch.randn(t.shape, generator=g))
            elif (t.dim() == 2 and t.shape[0] == n_expert and ("gate" in low or "router" in low)
                  and "proj" not in low and "experts." not in low):
                t.mul_(4.0)  # decisive routing: top-k margins far above rounding noise


def _n_expert(h: dict[str, Any]) -> int:
    for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        if k in h:
            return int(h[k])
    if "ffn_config" in h:
        return int(h["ffn_config"]["moe_num_experts"])
    raise KeyError("expert count")


def build_hf(recipe: Recipe, directory: Path) -> Path:
    import torch
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    cfg = getattr(transformers, recipe.config)(**recipe.hparams)
    torch.manual_seed(recipe.seed)
    model = getattr(transformers, recipe.model)(cfg).float().eval()
    _perturb(model, _n_expert(recipe.hparams))
    model.save_pretrained(directory)
    if recipe.config_json:
        cfg_path = directory / "config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **recipe.config_json}, indent=2))
    shutil.copy(TOKENIZER, directory / "tokenizer.model")
    return directory


# run llama.cpp's converter with its own gguf-py; every architecture takes the sentencepiece vocab path
_WRAPPER = r"""
import runpy, sys
conv = sys.argv[1]
sys.path[0:0] = [conv, conv + "/gguf-py"]
import gguf
assert gguf.__file__.startswith(conv), f"wrong gguf-py: {gguf.__file__}"
import conversion
_orig = conversion.get_model_class
def _patched(name, mmproj=False):
    cls = _orig(name, mmproj)
    if not mmproj:
        cls.set_vocab = lambda self: self._set_vocab_sentencepiece()
    return cls
conversion.get_model_class = _patched
sys.argv = [conv + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def first_error_line(text: str) -> str:
    """The most telling line of a failed step's output (an exception, an assert, a load error)."""
    text = re.sub(r"/\S*?/vendor/llama\.cpp/", "", text)  # the build directory of the wheel says nothing
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pats = [r"GGML_ASSERT|GGML_ABORT|Assertion .* failed", r"error loading model|llama_model_load: error",
            r"^\w*(Error|Exception)\b.*:|^\w+\.\w*(Error|Exception)\b", r"\b(error|failed|fatal)\b"]
    for pat in pats:
        hits = [ln for ln in lines if re.search(pat, ln, re.I if pat.startswith(r"\b") else 0)]
        if hits:
            return hits[-1][:400] if "Error" in pat else hits[0][:400]
    return lines[-1][:400] if lines else "(no output)"


def build(name: str) -> Path:
    """The GGUF of recipe `name` as llama.cpp's converter writes it (cached); ZooError on failure."""
    recipe = RECIPES[name]
    final = cache_root() / "zoo" / f"{name}-{recipe.key()}"
    if (final / "model.gguf").is_file():
        return final / "model.gguf"
    conv = llamacpp_converter()
    assert TOKENIZER.is_file(), f"missing {TOKENIZER}"

    def fill(tmp: Path) -> None:
        try:
            build_hf(recipe, tmp / "hf")
        except Exception as e:  # noqa: BLE001
            raise ZooError("build", f"{type(e).__name__}: {e}".splitlines()[0][:300]) from e
        env = {k: v for k, v in os.environ.items() if k not in ("NO_LOCAL_GGUF", "PYTHONPATH")}
        env["PYTHONPATH"] = str(conv / "gguf-py")
        proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(conv), str(tmp / "hf"), "--outfile",
                               str(tmp / "model.gguf"), "--outtype", recipe.outtype, *recipe.convert_args],
                              capture_output=True, text=True, env=env, timeout=600)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0 or not (tmp / "model.gguf").is_file():
            raise ZooError("convert", first_error_line(out), out)
        (tmp / "convert.log").write_text(out)
        shutil.rmtree(tmp / "hf")  # the GGUF is what the tests need; the recipe rebuilds the rest

    _atomic_dir(final, fill)
    return final / "model.gguf"


def hf_checkpoint(name: str) -> Path:
    """The Hugging Face checkpoint of recipe `name` (cached; the same bytes `build` converts)."""
    recipe = RECIPES[name]
    final = cache_root() / "zoo-hf" / f"{name}-{recipe.key()}"

    def fill(tmp: Path) -> None:
        try:
            build_hf(recipe, tmp)
        except Exception as e:  # noqa: BLE001
            raise ZooError("build", f"{type(e).__name__}: {e}".splitlines()[0][:300]) from e

    return _atomic_dir(final, fill)


def convert_ours(name: str, out: Path) -> Path:
    """`swapmoe convert HF_DIR --engine llamacpp` of recipe `name`, with the zoo's options (its
    convert_args, its --outtype, every tokenizer read from tokenizer.model as `build` does)."""
    recipe = RECIPES[name]
    hf = hf_checkpoint(name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["SWAPMOE_LLAMACPP_CONVERTER"] = str(llamacpp_converter())
    args = ["--engine", "llamacpp", "--vocab", "sentencepiece", "--type", recipe.outtype, "--force", "--no-progress"]
    args += [a for a in recipe.convert_args if a in ("--no-mtp", "--fuse-gate-up-exps")]
    proc = subprocess.run([sys.executable, "-m", "swapmoe_gguf", "convert", str(hf), "-o", str(out), *args],
                          capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    if proc.returncode != 0 or not out.is_file():
        raise ZooError("swapmoe convert", first_error_line(proc.stdout + proc.stderr), proc.stdout + proc.stderr)
    return out


def _our_converter_hash() -> str:
    h = hashlib.sha256()
    for f in sorted((REPO / "converters").glob("*.py")) + [REPO / "swapmoe_gguf" / "gguf_info.py"]:
        h.update(f.name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b""))
    return h.hexdigest()[:12]


def relayout(src: Path) -> Path:
    """`swapmoe convert src -o <cached>`: the swap-ready re-layout, cached next to src and keyed by the
    source of our converter (converters/*.py), so an edit there re-runs it."""
    dst = src.parent / f"swapready-{_our_converter_hash()}.gguf"
    if dst.is_file():
        return dst
    # other worktrees share this cache with other converter sources (other hashes), possibly running
    # now: only re-layouts unused for a day are removed
    for old in src.parent.glob("swapready*.gguf"):
        try:
            if time.time() - old.stat().st_atime > 86400:
                old.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
    tmp = src.parent / f".swapready.{os.getpid()}.gguf"
    proc = subprocess.run([sys.executable, "-m", "swapmoe_gguf", "convert", str(src), "-o", str(tmp)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ZooError("relayout", first_error_line(proc.stdout + proc.stderr), proc.stdout + proc.stderr)
    os.replace(tmp, dst)
    return dst


# ------------------------------------------------------------------------------------------------
# probing (in a child process)
# ------------------------------------------------------------------------------------------------

def probe(mode: str, gguf: Path, out: Path, n_batch: int = 512, timeout: float = 300) -> dict[str, Any]:
    """Run `mode` on `gguf` in a child process; {'ok', 'error', 'logits': [arrays], 'info': {...}}."""
    import numpy as np

    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "probe", mode, str(gguf), str(out),
                           "--n-batch", str(n_batch)], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0 or not out.is_file():
        return {"ok": False, "error": first_error_line(text) + ("" if proc.returncode >= 0 else
                                                                f" [signal {-proc.returncode}]"),
                "output": text}
    with np.load(out, allow_pickle=False) as z:
        logits = [z[f"p{i}"] for i in range(len(PROMPTS))]
        scores = [z[f"s{i}"] for i in range(len(PROMPTS)) if f"s{i}" in z.files]
        info = json.loads(str(z["info"]))
    return {"ok": True, "error": "", "logits": logits, "scores": scores, "info": info, "output": text}


def _probe_main(mode: str, gguf: str, out: str, n_batch: int) -> None:
    import numpy as np

    sys.path.insert(0, str(REPO))
    info: dict[str, Any] = {}
    if mode == "stock":
        import llama_cpp

        # verbose: a load failure's reason is only in llama.cpp's log (Python just says "Failed to load")
        llm = llama_cpp.Llama(gguf, n_batch=n_batch, n_ubatch=n_batch, **{**RUN_KW, "verbose": True})
    else:
        from swapmoe_gguf.runtime import SwapMoELlama

        kw: dict[str, Any] = dict(policy=mode, **RUN_KW)
        if mode != "full":
            kw["experts_per_layer"] = EXPERTS_PER_LAYER
        llm = SwapMoELlama(gguf, n_batch=n_batch, n_ubatch=n_batch, **kw)
        info = {"policy": llm.policy_name, "slots": llm.vmodel.slots, "n_expert": llm.vmodel.n_expert}
    arrays = {}
    for i, toks in enumerate(PROMPTS):
        llm.reset()
        llm.eval(toks)
        arrays[f"p{i}"] = np.array(llm.scores[: len(toks)], dtype=np.float32)
    if mode != "stock":
        t = llm.telemetry()
        info.update(swaps=t.swaps, hit_rate=t.hit_rate, swap_failures=t.swap_failures,
                    overflows=getattr(llm.policy, "overflows", None), streamed=getattr(llm.policy, "streamed", 0),
                    streams=bool(llm.expert_ffn))
    llm.close()
    tmp = out + ".tmp.npz"
    np.savez(tmp, info=json.dumps(info), **arrays)
    os.replace(tmp, out)


DECODE_STEPS = 24


def _decode_main(mode: str, gguf: str, out: str) -> None:
    """`swapmoe` over PROMPTS, each followed by DECODE_STEPS teacher-forced decode steps; mode
    decode-c reads router inputs in C (the default), decode-py in Python (the tap's reference path).
    Finished reads are committed before every step, so swaps do not depend on I/O timing. Saves the
    last logits of every step, the swap sequence and the scheduler's scores after each prompt."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from swapmoe_gguf.runtime import SwapMoELlama

    llm = SwapMoELlama(gguf, policy="swapmoe", experts_per_layer=EXPERTS_PER_LAYER, **RUN_KW)
    if mode == "decode-py":
        llm.tap.capture_tokens = 0
    swaps: list[tuple[int, int, int]] = []
    request, before = llm.request_swap, llm._before_decode
    llm.request_swap = lambda l, s, e: (swaps.append((l, s, e)), request(l, s, e))[1]  # type: ignore[method-assign]
    llm._before_decode = lambda: (llm.apply_pending(wait=True), before())[1]  # type: ignore[method-assign]
    arrays = {}
    for i, toks in enumerate(PROMPTS):
        llm.reset()
        llm.eval(toks[:4])
        steps = []
        for tok in (toks * 4)[4:4 + DECODE_STEPS]:
            llm.eval([tok])
            steps.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
        llm.score_pending()
        t = llm.telemetry()
        arrays[f"p{i}"] = np.stack(steps)
        arrays[f"s{i}"] = llm.policy.scheduler.scores.copy()
    info = {"hit_rate": t.hit_rate, "captured": llm.tap.captured_steps, "redirected": llm.tap.redirected_inputs, "swaps": swaps}
    llm.close()
    tmp = out + ".tmp.npz"
    np.savez(tmp, info=json.dumps(info), **arrays)
    os.replace(tmp, out)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("mode", choices=["stock", "full", "exact", "swapmoe", "static", "decode-c", "decode-py"])
    p.add_argument("gguf")
    p.add_argument("out")
    p.add_argument("--n-batch", type=int, default=512)
    b = sub.add_parser("build")
    b.add_argument("names", nargs="*")
    a = ap.parse_args()
    if a.cmd == "probe" and a.mode.startswith("decode"):
        _decode_main(a.mode, a.gguf, a.out)
    elif a.cmd == "probe":
        _probe_main(a.mode, a.gguf, a.out, a.n_batch)
    else:
        for n in a.names or RECIPES:
            try:
                print(n, build(n))
            except ZooError as e:
                print(n, "FAILED", e)
