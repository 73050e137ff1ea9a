"""Write small Hugging Face-format MoE checkpoints with numpy alone (no torch, no hub).

Used by `swapmoe demo` (until the trained default model ships) and by the conversion
benchmark, which needs a checkpoint of a few hundred MB. The tensors follow the published
Mixtral naming; the tokenizer is byte-level BPE with a handful of merges.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

import numpy as np
from gguf.vocab import bytes_to_unicode

_ST_DTYPE = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint16): "BF16"}


def save_safetensors(path: Path, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
                     make: Callable[[str], np.ndarray]) -> None:
    """Stream tensors into a safetensors file; `make(name)` is called once per tensor, in order.
    A uint16 dtype is stored as BF16 (its bit pattern)."""
    header, off = {}, 0
    for name, (shape, dtype) in specs.items():
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _ST_DTYPE[np.dtype(dtype)], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for name, (shape, dtype) in specs.items():
            arr = np.ascontiguousarray(make(name), dtype=dtype)
            assert arr.shape == tuple(shape), (name, arr.shape, shape)
            arr.tofile(f)


def write_byte_tokenizer(directory: Path) -> int:
    """A byte-level BPE tokenizer.json (256 byte tokens, a few merges, <s> and </s>); returns its size."""
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: i for i, b in enumerate(range(256))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("Ġ", "a"), ("o", "n")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    added = [{"id": len(vocab) + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(("<s>", "</s>"))]
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
    }
    (directory / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}"}))
    return len(vocab) + len(added)


def write_tiny_mixtral(directory: Path, *, hidden: int = 128, ffn: int = 512, layers: int = 2, experts: int = 8,
                       top_k: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0, std: float = 0.08,
                       dtype: np.dtype = np.dtype(np.float32)) -> Path:
    """A random Mixtral checkpoint (published tensor names, one safetensors file)."""
    directory.mkdir(parents=True, exist_ok=True)
    n_vocab = write_byte_tokenizer(directory)
    head_dim = hidden // heads
    cfg = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "num_local_experts": experts, "num_experts_per_tok": top_k,
        "vocab_size": n_vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": n_vocab - 2, "eos_token_id": n_vocab - 1,
        "torch_dtype": {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                        np.dtype(np.uint16): "bfloat16"}[np.dtype(dtype)],
    }
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        "model.embed_tokens.weight": ((n_vocab, hidden), dtype), "lm_head.weight": ((n_vocab, hidden), dtype),
        "model.norm.weight": ((hidden,), dtype)}
    for l in range(layers):
        p = f"model.layers.{l}"
        specs |= {f"{p}.input_layernorm.weight": ((hidden,), dtype),
                  f"{p}.post_attention_layernorm.weight": ((hidden,), dtype),
                  f"{p}.self_attn.q_proj.weight": ((hidden, hidden), dtype),
                  f"{p}.self_attn.k_proj.weight": ((kv_heads * head_dim, hidden), dtype),
                  f"{p}.self_attn.v_proj.weight": ((kv_heads * head_dim, hidden), dtype),
                  f"{p}.self_attn.o_proj.weight": ((hidden, hidden), dtype),
                  f"{p}.block_sparse_moe.gate.weight": ((experts, hidden), dtype)}
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            specs |= {f"{q}.w1.weight": ((ffn, hidden), dtype), f"{q}.w2.weight": ((hidden, ffn), dtype),
                      f"{q}.w3.weight": ((ffn, hidden), dtype)}
    rng = np.random.default_rng(seed)

    def make(name: str) -> np.ndarray:
        shape = specs[name][0]
        x = (1.0 + 0.1 * rng.standard_normal(shape)) if name.endswith("norm.weight") else std * rng.standard_normal(shape)
        x = x.astype(np.float32)
        if np.dtype(dtype) == np.uint16:  # bf16: keep the top 16 bits (round to nearest even)
            u = x.view(np.uint32)
            return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        return x

    save_safetensors(directory / "model.safetensors", specs, make)
    return directory
