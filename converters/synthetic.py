"""A large synthetic MoE written straight to the swap-ready layout, for speed, memory and I/O figures.

Quality needs learned routing (the trained default model); speed needs size. This writes a
Mixtral-architecture (llama.cpp `llama` with expert tensors) Q8_0 GGUF of realistic per-layer
shapes (the default is Qwen3-30B-A3B-like: hidden 2048, 128 experts of 768, top-8) with random
weights: random int8 quants under sane fp16 block scales, produced one expert slice at a time by
the same streaming writer as the converter, so a multi-GB file costs one slice of memory.
Never use it for quality: its text is noise.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType as Q, LlamaFileType

from ..base.atomic import atomic_output
from ..base.errors import ConvertError
from ..fileformat.constants import PAGE_ALIGNMENT, SwapKeys
from ..fileformat.norms import ExpertNorms
from .archs import Mixtral
from .layout import add_expert_keys, add_layout_keys
from .quant import nbytes
from .registry import HFConfig
from .tiny_checkpoint import write_byte_tokenizer
from .vocab import add_vocab
from .writer import PlannedTensor, SwapReadyWriter

GENERATOR_VERSION = 2  # part of cached file names: bump when the generated weights change
_Q8_BLOCK, _Q8_BYTES = 32, 34
_WEIGHT_STD = 0.02                                 # dequantized weights: roughly N(0, 0.02) like trained models
_BYTE_STD = float(np.sqrt((np.arange(-128, 128) ** 2).mean()))  # RMS of a uniform random int8 (~73.9)
_SQ = (np.arange(256, dtype=np.int64).astype(np.uint8).view(np.int8).astype(np.int64)) ** 2  # byte -> q^2


@dataclass(frozen=True)
class SyntheticShape:
    layers: int = 4
    hidden: int = 2048
    ffn: int = 768           # per expert
    experts: int = 128
    top_k: int = 8
    heads: int = 16
    kv_heads: int = 4

    def check(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads or (self.hidden // self.heads) % 2:
            raise ConvertError(f"synthetic shape {self}: hidden must split into an even head size, heads into kv heads")
        if self.hidden % _Q8_BLOCK or self.ffn % _Q8_BLOCK:
            raise ConvertError(f"synthetic shape {self}: hidden and ffn must be multiples of {_Q8_BLOCK} (Q8_0)")
        if not 1 <= self.top_k <= self.experts or self.layers < 1:
            raise ConvertError(f"synthetic shape {self}: need 1 <= top_k <= experts and layers >= 1")

    def expert_bytes(self) -> int:
        return 3 * nbytes((self.ffn, self.hidden), Q.Q8_0)

    def file_bytes(self) -> int:
        """Approximate size of the written file (experts dominate)."""
        kv = self.hidden // self.heads * self.kv_heads
        attn = nbytes((2 * self.hidden + 2 * kv, self.hidden), Q.Q8_0)
        return self.layers * (self.experts * self.expert_bytes() + attn)


def _q8_0_random(rng: np.random.Generator, rows: int, cols: int, scale: float) -> tuple[np.ndarray, float]:
    """Random Q8_0 data for a [rows, cols] matrix and its exact squared Frobenius norm."""
    nb = rows * cols // _Q8_BLOCK
    out = np.empty((nb, _Q8_BYTES), dtype=np.uint8)                  # [n_block, 2 + 32]
    d = (scale * rng.uniform(0.8, 1.25, nb)).astype(np.float16)      # per-block scale
    out[:, :2] = d.view(np.uint8).reshape(nb, 2)
    out[:, 2:] = np.frombuffer(rng.bytes(nb * _Q8_BLOCK), dtype=np.uint8).reshape(nb, _Q8_BLOCK)
    q2 = _SQ[out[:, 2:]].sum(axis=1)                                 # [n_block] sum of q^2
    sq = float(np.dot(d.astype(np.float64) ** 2, q2))
    return out.reshape(rows, cols // _Q8_BLOCK * _Q8_BYTES), sq


def _config(shape: SyntheticShape, n_vocab: int) -> dict:
    return {"architectures": ["MixtralForCausalLM"], "hidden_size": shape.hidden, "intermediate_size": shape.ffn,
            "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads, "num_local_experts": shape.experts,
            "num_experts_per_tok": shape.top_k, "vocab_size": n_vocab, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 1e6}


def write_synthetic_moe(dst: str | Path, shape: SyntheticShape = SyntheticShape(), *, seed: int = 0,
                        force: bool = False, progress: bool | None = None) -> Path:
    """Write the synthetic model to `dst` (atomically); returns the path."""
    shape.check()
    dst = Path(dst)
    with tempfile.TemporaryDirectory(prefix="swapmoe-synth-") as tok_dir:
        n_vocab = write_byte_tokenizer(Path(tok_dir))
        arch = Mixtral(HFConfig(_config(shape, n_vocab), Path(tok_dir) / "config.json"), "MixtralForCausalLM")
        with atomic_output(dst, force) as tmp:
            _write(tmp, arch, shape, n_vocab, Path(tok_dir), seed, progress)
    return dst


def _write(tmp: Path, arch: Mixtral, s: SyntheticShape, n_vocab: int, tok_dir: Path, seed: int,
           progress: bool | None) -> None:
    rng = np.random.default_rng(seed)
    h, kv = s.hidden, s.hidden // s.heads * s.kv_heads
    norms = ExpertNorms(list(range(s.layers)), s.experts)
    # Experts differ in size (as trained ones do), so ||E_i|| in the importance score matters.
    expert_scale = _WEIGHT_STD / _BYTE_STD * rng.lognormal(0.0, 0.25, (s.layers, s.experts))

    def dense(name: str, shape: tuple[int, ...], qtype: Q = Q.Q8_0, std: float = _WEIGHT_STD) -> PlannedTensor:
        def produce() -> Iterator[np.ndarray]:
            if len(shape) == 1:
                yield (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
            elif qtype == Q.F32:  # router: nearly balanced, as load-balancing training leaves real ones
                row = rng.lognormal(0.0, 0.1, (shape[0], 1))
                yield (row * rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
            else:
                yield _q8_0_random(rng, shape[0], shape[1], std / _BYTE_STD)[0]
        return PlannedTensor(name, shape, qtype, nbytes(shape, qtype), produce)

    def experts(layer: int, kind: str, rows: int, cols: int) -> PlannedTensor:
        stacked = (s.experts, rows, cols)

        def produce() -> Iterator[np.ndarray]:
            for e in range(s.experts):
                data, sq = _q8_0_random(rng, rows, cols, float(expert_scale[layer, e]))
                norms.sq[layer, e] += sq
                yield data
        return PlannedTensor(f"blk.{layer}.{kind}.weight", stacked, Q.Q8_0, nbytes(stacked, Q.Q8_0), produce,
                             n_expert=s.experts)

    w = SwapReadyWriter(tmp, arch.arch_name, PAGE_ALIGNMENT)
    gw = w.gw
    gw.add_name(f"synthetic-moe-{s.layers}x{s.experts}x{s.ffn}")
    arch.add_hparams(gw)
    gw.add_file_type(int(LlamaFileType.MOSTLY_Q8_0))
    gw.add_quantization_version(GGML_QUANT_VERSION)
    gw.add_string("swapmoe.synthetic", str(asdict(s)))
    add_vocab(gw, tok_dir, n_vocab)
    w.add(dense("token_embd.weight", (n_vocab, h)))
    for l in range(s.layers):
        # Random attention averages over the context and would make every position's hidden state
        # (and so its routing) alike; a weak attention output keeps routing token by token, as in
        # trained models, so on-demand loading meets real misses.
        for name, shape, qtype, std in (
                ("attn_norm", (h,), Q.F32, 0), ("attn_q", (h, h), Q.Q8_0, _WEIGHT_STD),
                ("attn_k", (kv, h), Q.Q8_0, _WEIGHT_STD), ("attn_v", (kv, h), Q.Q8_0, _WEIGHT_STD),
                ("attn_output", (h, h), Q.Q8_0, _WEIGHT_STD / 20), ("ffn_norm", (h,), Q.F32, 0),
                ("ffn_gate_inp", (s.experts, h), Q.F32, 0)):
            w.add(dense(f"blk.{l}.{name}.weight", shape, qtype, std))
        w.add(experts(l, "ffn_gate_exps", s.ffn, h))
        w.add(experts(l, "ffn_up_exps", s.ffn, h))
        w.add(experts(l, "ffn_down_exps", h, s.ffn))
    w.add(dense("output_norm.weight", (h,), Q.F32))
    w.add(dense("output.weight", (n_vocab, h)))
    add_layout_keys(w)
    add_expert_keys(w, list(range(s.layers)), s.experts, "synthetic", None)
    w.write(progress)
    w.patch(SwapKeys.EXPERT_NORMS, norms.values())
