"""Architecture registry: one small class per Hugging Face MoE architecture.

    @register("MixtralForCausalLM")
    class Mixtral(MoEArch): ...

The shared machinery (tensor naming, expert stacking, streaming) lives in `hf.py` and is
written once; an architecture class only states what differs: its llama.cpp architecture,
its hyper-parameter keys, and any tensor transform or split.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter

from ..base.errors import ConvertError, NotMoEError, UnsupportedArchitectureError

_REGISTRY: dict[str, type["MoEArch"]] = {}
A = TypeVar("A", bound=type["MoEArch"])


def register(*hf_names: str) -> Callable[[A], A]:
    def deco(cls: A) -> A:
        for n in hf_names:
            _REGISTRY[n] = cls
        return cls
    return deco


def supported() -> list[str]:
    return sorted(_REGISTRY)


class HFConfig:
    """`config.json` with typed, alias-aware accessors (HF renames keys between versions)."""

    def __init__(self, data: dict[str, Any], path: Path):
        self.data, self.path = data, path

    @classmethod
    def load(cls, directory: Path) -> "HFConfig":
        path = directory / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConvertError(f"{path}: missing (not a Hugging Face checkpoint directory?)") from None
        except (OSError, ValueError) as e:
            raise ConvertError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConvertError(f"{path}: expected a JSON object")
        return cls(data, path)

    def get(self, *names: str, default: Any = None) -> Any:
        for n in names:
            if self.data.get(n) is not None:
                return self.data[n]
        rope = self.data.get("rope_parameters") or {}
        for n in names:
            if isinstance(rope, dict) and rope.get(n) is not None:
                return rope[n]
        return default

    def int(self, *names: str, default: int | None = None) -> int:
        v = self.get(*names, default=default)
        if v is None:
            raise ConvertError(f"{self.path}: missing {names[0]}")
        try:
            return int(v)
        except (TypeError, ValueError):
            raise ConvertError(f"{self.path}: {names[0]} should be an integer, got {v!r}") from None


def lookup(cfg: HFConfig) -> "MoEArch":
    archs = cfg.get("architectures")
    if not archs or not isinstance(archs, list):
        raise UnsupportedArchitectureError(f"{cfg.path}: no 'architectures' list; cannot tell which model this is")
    for name in archs:
        if name in _REGISTRY:
            return _REGISTRY[name](cfg, name)
    if _expert_count(cfg) in (None, 0, 1):
        raise NotMoEError(f"{cfg.path}: {', '.join(map(str, archs))} is not a Mixture-of-Experts model "
                          "(no expert count in config.json); nothing to swap, use llama.cpp directly")
    raise UnsupportedArchitectureError(
        f"{cfg.path}: architecture {', '.join(map(str, archs))} is not supported; "
        f"supported: {', '.join(supported())}")


# Where published configs keep the routed expert count (top level, or nested as DBRX's ffn_config).
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")


def _expert_count(cfg: HFConfig) -> int | None:
    n = cfg.get(*_EXPERT_COUNT_KEYS)
    for nested in ("ffn_config", "text_config", "moe_config"):
        sub = cfg.data.get(nested)
        if n is None and isinstance(sub, dict):
            n = next((sub[k] for k in _EXPERT_COUNT_KEYS if sub.get(k) is not None), None)
    if isinstance(n, list):  # per-layer counts (some configs): the largest
        n = max(n) if n else None
    try:
        return int(n) if n is not None else None
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class FusedExperts:
    """A checkpoint tensor that already stacks all experts ([n_expert, rows, cols]) and may
    concatenate several projections along its rows; split into equal parts in order."""

    hf_suffix: str            # e.g. "block_sparse_moe.input_linear.weight"
    kinds: tuple[str, ...]    # gguf tensor kinds, e.g. ("ffn_gate_exps", "ffn_up_exps")


class MoEArch:
    """Base class. Subclasses set `gguf_arch` and override hooks where the architecture differs."""

    gguf_arch: ClassVar[MODEL_ARCH]
    fused: ClassVar[tuple[FusedExperts, ...]] = ()
    # HF tensor-name fragments that are dropped (buffers, not weights).
    ignored: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)

    def __init__(self, cfg: HFConfig, hf_name: str):
        self.cfg, self.hf_name = cfg, hf_name
        self.n_layer = cfg.int("num_hidden_layers", "n_layer")
        self.n_embd = cfg.int("hidden_size", "d_model")
        self.n_head = cfg.int("num_attention_heads")
        self.n_head_kv = cfg.int("num_key_value_heads", default=self.n_head)
        self.head_dim = cfg.int("head_dim", default=self.n_embd // self.n_head)
        self.n_expert = cfg.int("num_local_experts", "num_experts", "n_routed_experts", default=0)
        self.n_expert_used = cfg.int("num_experts_per_tok", "moe_topk", default=0)
        if self.n_expert < 2 or self.n_expert_used < 1:
            raise NotMoEError(f"{cfg.path}: {hf_name} has no routed experts (expert count {self.n_expert}); "
                              "nothing to swap, use llama.cpp directly")
        if self.n_expert_used > self.n_expert:
            raise ConvertError(f"{cfg.path}: num_experts_per_tok={self.n_expert_used} exceeds the {self.n_expert} experts")
        self.check()

    @property
    def arch_name(self) -> str:
        return MODEL_ARCH_NAMES[self.gguf_arch]

    def check(self) -> None:
        """Refuse configurations llama.cpp cannot run for this architecture."""

    def add_hparams(self, gw: GGUFWriter) -> None:
        c = self.cfg
        gw.add_context_length(c.int("max_position_embeddings", default=4096))
        gw.add_embedding_length(self.n_embd)
        gw.add_block_count(self.n_layer)
        gw.add_feed_forward_length(c.int("intermediate_size"))
        gw.add_head_count(self.n_head)
        gw.add_head_count_kv(self.n_head_kv)
        gw.add_rope_freq_base(float(c.get("rope_theta", default=10000.0)))
        gw.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", default=1e-5)))
        gw.add_expert_count(self.n_expert)
        gw.add_expert_used_count(self.n_expert_used)
        if self.head_dim != self.n_embd // self.n_head:
            gw.add_key_length(self.head_dim)
            gw.add_value_length(self.head_dim)
        gw.add_vocab_size(c.int("vocab_size"))

    def transform(self, gguf_name: str, data: np.ndarray) -> np.ndarray:
        """Per-tensor data transform (e.g. the rotary permutation of llama-style q/k)."""
        return data
