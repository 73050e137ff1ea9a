"""The Virtual Experts model: a llama.cpp model with S expert slots per MoE layer.

Built with `llama_model_init_from_user` from the swap-ready GGUF's metadata, with
`<arch>.expert_count` set to S, so llama.cpp allocates [S, ...] expert tensors and an [S, n_embd]
router: its own graph then routes every token among the resident experts only (SwapMoE's
masked gating, at no extra cost). Slot s of layer l holds expert `slot_map[l][s]`; a swap copies
the expert's slices and router row into the slot with `ggml_backend_tensor_set`, which works
for CPU and GPU buffers alike.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from .errors import LayoutError, SwapMoEError
from .expert_store import ExpertStore, StagedExpert
from .gguf_info import GGUFInfo, TensorEntry, dequantize, read_gguf
from .ggml import GGML_TYPE_F32, ggml

log = logging.getLogger(__name__)

# Per-expert tensors that are not `*_exps.*`: one row per expert, selected in slot order.
ROW_TENSORS = ("ffn_gate_inp.weight", "ffn_gate_inp.bias", "exp_probs_b.bias")


@dataclass(frozen=True)
class Neutral:
    """Value for a tensor llama.cpp creates although the file lacks it (it then asks us to fill it)."""

    suffix: str
    value: float


# llama_model_init_from_user creates every optional tensor of the architecture; absent ones
# must be neutral or the output is NaN. Per architecture, with a default for all.
NEUTRAL_TENSORS: dict[str, tuple[Neutral, ...]] = {
    "default": (Neutral(".bias", 0.0), Neutral(".input_scale", 1.0), Neutral(".scale", 1.0),
                Neutral("rope_freqs.weight", 1.0)),
}
# Absent tensors that are another tensor's copy (tied embeddings).
ALIAS_TENSORS = {"output.weight": "token_embd.weight"}


class ModelBuildError(SwapMoEError):
    pass


class VirtualExpertModel:
    """Owns the llama_model pointer, its slot map and the handles needed to swap."""

    def __init__(self, path: str | Path, slots: int, *, initial: dict[int, list[int]] | None = None,
                 n_gpu_layers: int = 0, staging_buffers: int = 2, info: GGUFInfo | None = None):
        self.info = info = info if info is not None else read_gguf(path)  # reuse the caller's parse
        problem = info.layout_problem()
        if problem:
            raise LayoutError(f"{info.path}: not a swap-ready GGUF ({problem}); "
                              f"run `swapmoe convert {info.path} -o NEW.gguf` first")
        info.check_loadable()
        k, n = info.params.n_expert_used, info.n_expert
        if not k <= slots <= n:
            raise SwapMoEError(f"experts per layer must be between top-k={k} and n_expert={n}, got {slots}")
        self.slots, self.n_expert, self.top_k = slots, n, k
        self.store = ExpertStore(info, staging_buffers=staging_buffers)
        self.moe_layers = info.moe_layers
        self.slot_map = {l: list((initial or {}).get(l) or self._default_set(l)) for l in self.moe_layers}
        for l, experts in self.slot_map.items():
            if len(experts) != slots or len(set(experts)) != slots or not all(0 <= e < n for e in experts):
                raise SwapMoEError(f"layer {l}: initial set {experts} must be {slots} distinct experts < {n}")
        # [n_moe_layer, n_expert] booleans, kept in step with slot_map (read on every decode step)
        self.resident_mask = np.zeros((len(self.moe_layers), n), dtype=bool)
        for i, l in enumerate(self.moe_layers):
            self.resident_mask[i, self.slot_map[l]] = True
        self._by_name = {t.name: t for t in info.tensors}
        # Row tensors (router, per-expert biases) stay in RAM whole: small, and the scheduler needs
        # the full router to score experts that are not resident.
        self.rows: dict[str, np.ndarray] = {}      # name -> [n_expert, row_bytes] raw
        self.router: dict[int, np.ndarray] = {}    # layer -> [n_expert, n_embd] f32, the FULL router
        for t in info.tensors:
            if t.block in self.slot_map and t.name.endswith(ROW_TENSORS) and t.shape[0] == n:
                raw = self._pread(t.offset, t.nbytes).reshape(n, -1)
                self.rows[t.name] = raw
                if t.name.endswith("ffn_gate_inp.weight"):
                    self.router[t.block] = dequantize(raw, t.qtype, t.shape)  # type: ignore[index]
        self.rows_by_layer: dict[int, list[str]] = {}
        for name in self.rows:
            self.rows_by_layer.setdefault(self._by_name[name].block, []).append(name)  # type: ignore[arg-type]
        self.handles: dict[str, int] = {}
        self._fill_error: BaseException | None = None
        self._neutral = NEUTRAL_TENSORS.get(info.arch, NEUTRAL_TENSORS["default"])
        self.absent_filled: list[str] = []

        g = ggml()
        meta = g.gguf_open_meta(str(info.path))
        try:
            g.gguf_set_u32(meta, f"{info.arch}.expert_count", slots)
            for name, src in ALIAS_TENSORS.items():  # tied embeddings: the copy keeps the source's type
                if name not in self._by_name and src in self._by_name:
                    g.gguf_declare_tensor(meta, name, int(self._by_name[src].qtype), self._by_name[src].shape)
            # Keep the ctypes callback alive for the model's lifetime (llama.cpp may keep the pointer).
            self._cb = llama_cpp.llama_model_set_tensor_data_t(self._fill)
            params = llama_cpp.llama_model_default_params()
            params.n_gpu_layers = n_gpu_layers
            self.model = llama_cpp.llama_model_init_from_user(meta, self._cb, None, params)
        finally:
            self._meta = meta  # freed in close(): the model may reference its strings
        if self._fill_error is not None:
            self.close()
            raise self._fill_error
        if not self.model:
            self.close()
            raise ModelBuildError(f"{info.path}: llama.cpp could not build the model with {slots} expert slots")

    def _default_set(self, layer: int) -> list[int]:
        """Before any routing is known: the experts with the largest weight norms."""
        norms = self.info.expert_norms[self.info.moe_layers.index(layer)]  # type: ignore[index]
        return sorted(np.argsort(-norms, kind="stable")[: self.slots].tolist())

    def _pread(self, offset: int, n: int) -> np.ndarray:
        buf = np.empty(n, dtype=np.uint8)
        if os.preadv(self.store.fd, [buf], offset) != n:
            raise LayoutError(f"{self.info.path}: short read at {offset} (file truncated?)")
        return buf

    # called by llama.cpp, once per tensor, while the model is built --------------------------
    def _fill(self, tptr: int, _ud: int) -> None:
        if self._fill_error is not None:
            return
        try:
            self._fill_one(tptr)
        except BaseException as e:  # cannot propagate through C: re-raised after init returns
            self._fill_error = e

    def _fill_one(self, tptr: int) -> None:
        g = ggml()
        name, nbytes = g.name(tptr), g.nbytes(tptr)
        t = self._by_name.get(name)
        if t is None:
            self._fill_absent(tptr, name, nbytes)
            return
        layer = t.block
        if t.is_expert and layer in self.slot_map:
            if nbytes != self.slots * t.expert_nbytes:
                raise ModelBuildError(f"{name}: llama.cpp wants {nbytes} bytes for {self.slots} slots, "
                                      f"the file has {t.expert_nbytes} per expert")
            self.handles[name] = tptr
            scratch = np.empty(t.expert_nbytes, dtype=np.uint8)
            for s, e in enumerate(self.slot_map[layer]):
                self.store.read_slice(t, e, scratch)
                g.set(tptr, scratch, s * t.expert_nbytes)
        elif name in self.rows:
            rows = self.rows[name]
            self.handles[name] = tptr
            g.set(tptr, rows[self.slot_map[layer]])  # type: ignore[index]
        elif nbytes == t.nbytes:
            g.set(tptr, self._pread(t.offset, t.nbytes))
        else:
            raise ModelBuildError(f"{name}: llama.cpp wants {nbytes} bytes, the file has {t.nbytes}")

    def _fill_absent(self, tptr: int, name: str, nbytes: int) -> None:
        g = ggml()
        alias = ALIAS_TENSORS.get(name)
        if alias in self._by_name and self._by_name[alias].nbytes == nbytes:  # tied embeddings
            src = self._by_name[alias]
            g.set(tptr, self._pread(src.offset, src.nbytes))
        else:
            rule = next((r for r in self._neutral if name.endswith(r.suffix)), None)
            if rule is None or g.tensor(tptr).type != GGML_TYPE_F32:
                raise ModelBuildError(f"{self.info.path}: llama.cpp asked for {name}, which the file lacks and "
                                      "for which no neutral value is known")
            g.set(tptr, np.full(nbytes // 4, rule.value, dtype=np.float32))
        self.absent_filled.append(name)

    # swapping -------------------------------------------------------------------------------
    def layer_tensors(self, layer: int) -> list[TensorEntry]:
        return self.store.layers[layer]

    def commit(self, slot: int, staged: StagedExpert) -> None:
        """Copy a staged expert into `slot` of its layer (between decode calls only)."""
        g, layer, e = ggml(), staged.layer, staged.expert
        for name, view in staged.parts.items():
            g.set(self.handles[name], view, slot * view.nbytes)
        for name in self.rows_by_layer.get(layer, ()):
            rows = self.rows[name]
            g.set(self.handles[name], rows[e], slot * rows.shape[1])
        i = self.moe_layers.index(layer)
        self.resident_mask[i, self.slot_map[layer][slot]] = False
        self.resident_mask[i, e] = True
        self.slot_map[layer][slot] = e

    def swap(self, layer: int, slot: int, expert: int) -> None:
        """Synchronous swap: read, then commit. (The scheduler reads ahead instead.)"""
        staged = self.store.read(layer, expert)
        try:
            self.commit(slot, staged)
        finally:
            self.store.release(staged)

    def resident(self, layer: int) -> list[int]:
        return list(self.slot_map[layer])

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot across all MoE layers."""
        return sum(self.store.expert_nbytes.values())

    def close(self) -> None:
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None
        if getattr(self, "_meta", None):
            ggml().gguf_free(self._meta)
            self._meta = None
        self.store.close()
