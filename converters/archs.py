"""The supported Hugging Face MoE architectures. Each class states only what differs."""
from __future__ import annotations

import numpy as np
from gguf import MODEL_ARCH, GGUFWriter

from ..base.errors import ConvertError
from .registry import FusedExperts, MoEArch, register


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved (NORM) rope order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _LlamaRope(MoEArch):
    """Architectures llama.cpp runs with interleaved (NORM) rope: q/k rows are permuted."""

    def transform(self, gguf_name: str, data: np.ndarray) -> np.ndarray:
        if gguf_name.endswith("attn_q.weight"):
            return _rope_permute(data, self.n_head)
        if gguf_name.endswith("attn_k.weight"):
            return _rope_permute(data, self.n_head_kv)
        return data


@register("MixtralForCausalLM")
class Mixtral(_LlamaRope):
    # llama.cpp runs Mixtral as the `llama` architecture with expert tensors.
    gguf_arch = MODEL_ARCH.LLAMA

    def add_hparams(self, gw: GGUFWriter) -> None:
        super().add_hparams(gw)
        gw.add_rope_dimension_count(self.head_dim)


class _QwenMoE(MoEArch):
    def check(self) -> None:
        if self.cfg.get("mlp_only_layers") or self.cfg.int("decoder_sparse_step", default=1) != 1:
            raise ConvertError(f"{self.cfg.path}: dense layers between MoE layers (mlp_only_layers / "
                               "decoder_sparse_step) are not supported by llama.cpp for this architecture")

    def add_hparams(self, gw: GGUFWriter) -> None:
        super().add_hparams(gw)
        gw.add_expert_feed_forward_length(self.cfg.int("moe_intermediate_size"))


@register("Qwen2MoeForCausalLM")
class Qwen2MoE(_QwenMoE):
    gguf_arch = MODEL_ARCH.QWEN2MOE

    def check(self) -> None:
        super().check()
        if self.cfg.get("norm_topk_prob"):
            raise ConvertError(f"{self.cfg.path}: norm_topk_prob=true is not what llama.cpp's qwen2moe computes")

    def add_hparams(self, gw: GGUFWriter) -> None:
        super().add_hparams(gw)
        gw.add_expert_shared_feed_forward_length(self.cfg.int("shared_expert_intermediate_size"))


@register("Qwen3MoeForCausalLM")
class Qwen3MoE(_QwenMoE):
    gguf_arch = MODEL_ARCH.QWEN3MOE

    def add_hparams(self, gw: GGUFWriter) -> None:
        super().add_hparams(gw)
        if self.head_dim == self.n_embd // self.n_head:  # Qwen3 states head_dim; llama.cpp wants it always
            gw.add_key_length(self.head_dim)
            gw.add_value_length(self.head_dim)
        gw.add_expert_weights_norm(bool(self.cfg.get("norm_topk_prob", default=False)))


@register("OlmoeForCausalLM")
class OLMoE(MoEArch):
    gguf_arch = MODEL_ARCH.OLMOE

    def check(self) -> None:
        if self.cfg.get("norm_topk_prob"):
            raise ConvertError(f"{self.cfg.path}: norm_topk_prob=true is not what llama.cpp's olmoe computes")
        if self.n_head_kv != self.n_head:  # llama.cpp's olmoe normalises k over the full hidden size
            raise ConvertError(f"{self.cfg.path}: llama.cpp's olmoe needs num_key_value_heads == num_attention_heads "
                               f"({self.n_head}), got {self.n_head_kv}")

    def add_hparams(self, gw: GGUFWriter) -> None:
        super().add_hparams(gw)
        if self.cfg.get("clip_qkv") is not None:
            gw.add_clamp_kqv(float(self.cfg.get("clip_qkv")))


@register("GraniteMoeForCausalLM")
class GraniteMoE(_LlamaRope):
    gguf_arch = MODEL_ARCH.GRANITE_MOE
    # Granite stores all experts of a projection in one tensor; input_linear is gate ++ up.
    fused = (FusedExperts("block_sparse_moe.input_linear.weight", ("ffn_gate_exps", "ffn_up_exps")),
             FusedExperts("block_sparse_moe.output_linear.weight", ("ffn_down_exps",)))

    def add_hparams(self, gw: GGUFWriter) -> None:
        super().add_hparams(gw)
        c = self.cfg
        gw.add_embedding_scale(float(c.get("embedding_multiplier", default=1.0)))
        gw.add_residual_scale(float(c.get("residual_multiplier", default=1.0)))
        gw.add_attention_scale(float(c.get("attention_multiplier", default=1.0 / self.head_dim ** 0.5)))
        gw.add_logit_scale(float(c.get("logits_scaling", default=1.0)))
