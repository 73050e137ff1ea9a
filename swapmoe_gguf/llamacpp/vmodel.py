"""The Virtual Experts model: a llama.cpp model with S expert slots per MoE layer.

Built with `llama_model_init_from_user` from the swap-ready GGUF's metadata, with
`<arch>.expert_count` set to S, so llama.cpp allocates [S, ...] expert tensors and an [S, n_embd]
router: its own graph then routes every token among the resident experts only (SwapMoE's
masked gating, at no extra cost). Slot s of layer l holds expert `slot_map[l][s]`; a swap copies
the expert's slices and router row into the slot with `ggml_backend_tensor_set`, which works
for CPU and GPU buffers alike.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import llama_cpp
import numpy as np

from ..base.errors import LayoutError, SwapMoEError
from ..fileformat.info import GGUFInfo, TensorEntry, dequantize
from ..fileformat.reader import read_gguf
from ..store.expert_store import ExpertStore, StagedExpert
from .absent import ALIAS_TENSORS, NEUTRAL_TENSORS, unlink_absent
from .ggml import GGML_TYPE_F32, GGMLTensor, ggml
from .repack import BuftOverride, Repacker, RepackPlan, is_repack_tensor

log = logging.getLogger(__name__)

# Per-expert tensors that are not stacked `*_exps.*` weights: one row per expert, selected in slot
# order. Named by what follows `blk.N.`; a converter may write a tensor without a suffix (Hunyuan v3's
# `blk.N.exp_probs_b`, from an HF name that has none), and 1-D per-expert arrays of an `*_exps.*`
# tensor (scales) are rows too.
_ROW_NAME = re.compile(r"^blk\.\d+\.(?:(?P<kind>ffn_gate_inp|exp_probs_b)(?:\.(?P<suffix>weight|bias))?|\w+_exps\.\w+)$")


def row_kind(name: str, shape: tuple[int, ...], n_expert: int) -> str | None:
    """"router", "router_bias", "selection_bias" or "other" for a per-expert row tensor (one row per
    expert: [n_expert, ...], or [1, n_expert] as ERNIE's exp_probs_b); None for any other tensor."""
    m = _ROW_NAME.match(name)
    if m is None or not (shape[0] == n_expert or tuple(shape) == (1, n_expert)):
        return None
    if m["kind"] == "exp_probs_b":
        return "selection_bias"
    if m["kind"] == "ffn_gate_inp":
        return "router_bias" if m["suffix"] == "bias" else "router"
    return "other"


_HUGE_PAGE, _MADV_HUGEPAGE = 2 << 20, 14


@functools.cache
def _madvise() -> Any:
    """libc's madvise, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def advise_huge_pages(addr: int, nbytes: int) -> None:
    """Ask Linux for transparent huge pages on [addr, addr + nbytes) before its first write (THP in
    `madvise` mode, the default of most distributions, gives them only to regions that ask). Decode
    reads every resident weight once per token; 2 MiB pages spare the TLB misses of 4 KiB ones
    (measured 1-8 % faster decode here, interleaved). Stock llama.cpp's mmap'd file pages cannot have them."""
    fn = _madvise()
    lo, hi = -(-addr // _HUGE_PAGE) * _HUGE_PAGE, (addr + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if fn is not None and hi > lo and fn(lo, hi - lo, _MADV_HUGEPAGE) != 0:
        log.debug("madvise(MADV_HUGEPAGE) failed: errno %d", ctypes.get_errno())


def _fused_shape(gate: TensorEntry, n_expert: int) -> tuple[int, ...]:
    """Numpy shape of llama.cpp's fused gate+up expert tensor: [n_expert, 2 * n_ff, n_embd]."""
    return (n_expert, 2 * gate.shape[1], *gate.shape[2:])


class ModelBuildError(SwapMoEError):
    pass


class VirtualExpertModel:
    """Owns the llama_model pointer, its slot map and the handles needed to swap."""

    def __init__(self, path: str | Path, slots: int, *, initial: dict[int, list[int]] | None = None,
                 n_gpu_layers: int = 0, staging_buffers: int = 2, info: GGUFInfo | None = None,
                 repack: bool = True, reserved_buffers: int = 0, tensor_split: Sequence[float] | None = None,
                 overrides: Sequence[tuple[str, int]] = ()):
        """`n_gpu_layers`, `tensor_split` and `overrides` ((regex, buffer type) pairs: llama.cpp's
        `-ot`, `--cpu-moe`) place tensors as llama.cpp does; slot tensors go wherever llama.cpp puts
        their layer's expert tensors, and swaps write them there with `ggml_backend_tensor_set`."""
        self.info = info = info if info is not None else read_gguf(path)  # reuse the caller's parse
        problem = info.run_problem()  # a GGUF that is not swap-ready still runs, read in place
        if problem:
            raise LayoutError(f"{info.path}: cannot run this GGUF ({problem})")
        info.check_loadable()
        if info.expert_norms is None:  # not converted: norms computed once, then from a cached sidecar
            from ..fileformat.norms import ensure_expert_norms

            ensure_expert_norms(info)
        k, n = info.params.n_expert_used, info.n_expert
        if not k <= slots <= n:
            raise SwapMoEError(f"experts per layer must be between top-k={k} and n_expert={n}, got {slots}")
        self.slots, self.n_expert, self.top_k = slots, n, k
        self.store = ExpertStore(info, staging_buffers=staging_buffers, reserved=reserved_buffers)
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
        self.router_bias: dict[int, np.ndarray] = {}     # layer -> [n_expert] added to the router logits
        self.selection_bias: dict[int, np.ndarray] = {}  # layer -> [n_expert] exp_probs_b (ranking only)
        for t in info.tensors:
            kind = None if t.is_expert or t.block not in self.slot_map else row_kind(t.name, t.shape, n)
            if kind is not None:
                raw = self._pread(t.offset, t.nbytes, t.file).reshape(n, -1)
                self.rows[t.name] = raw
                if kind == "other":
                    continue
                values = dequantize(raw, t.qtype, t.shape)
                if kind == "router":
                    self.router[t.block] = values  # type: ignore[index]
                elif kind == "router_bias":
                    self.router_bias[t.block] = values.reshape(n)  # type: ignore[index]
                else:
                    self.selection_bias[t.block] = values.reshape(n)  # type: ignore[index]
        if self.router and len({w.shape for w in self.router.values()}) == 1:
            # one [n_moe_layer, n_expert, n_embd] array, so that the router tap scores every layer of a
            # decode step in one batched matmul (router.FullRouter)
            stack = np.stack([self.router[l] for l in sorted(self.router)])
            self.router = {l: stack[i] for i, l in enumerate(sorted(self.router))}
        self.rows_by_layer: dict[int, list[str]] = {}
        for name in self.rows:
            self.rows_by_layer.setdefault(self._by_name[name].block, []).append(name)  # type: ignore[arg-type]
        self.handles: dict[str, int] = {}
        self._fill_error: BaseException | None = None
        self._neutral = NEUTRAL_TENSORS.get(info.arch, NEUTRAL_TENSORS["default"])
        self.absent_filled: list[str] = []
        self.provisional: list[str] = []  # absent, no neutral value: must turn out unused by the graph
        self.unlinked = 0  # pointers to absent tensors set back to NULL (absent.py)
        self._present: dict[int, dict[str, int]] = {}  # layer -> {suffix: address}: tensors the file has
        self._absent: set[int] = set()             # addresses of tensors the file lacks (not aliases)
        self._requested: set[str] = set()          # every tensor llama.cpp created
        self._advised: set[int] = set()            # weight buffers seen (host ones given MADV_HUGEPAGE)

        # llama.cpp prefers a fused gate+up expert tensor where the architecture has one and creates
        # it (not the separate ones) in this mode: filled per slot with the expert's gate, then up rows.
        self.fused = self._fused_gate_up()
        # where each expert tensor's slice of slot s goes: name -> (tensor handle name, offset in slot, slot stride)
        self.placement: dict[str, tuple[str, int, int]] = {}
        # CPU-only models: the weights ggml-cpu repacks go to its CPU_REPACK buffer, as in stock llama.cpp
        # (never with a device: the slots of offloaded layers live in the device's buffers, and a model
        # with overrides puts tensors where the user says)
        self.repacker = Repacker() if repack and n_gpu_layers == 0 and not overrides else None
        self.repacked: dict[str, tuple[int, int, int]] = {}  # handle -> (type, ne0, ne1) of one slot
        g = ggml()
        meta = g.gguf_open_meta(str(info.path))
        try:
            g.gguf_set_u32(meta, f"{info.arch}.expert_count", slots)
            if slots < n and info.params.n_expert_groups > 1:
                # Masked gating among S resident experts has no groups (S need not split into them);
                # `exact` still reproduces the full model's grouped choice (routing.py).
                g.gguf_set_u32(meta, f"{info.arch}.expert_group_count", 1)
                g.gguf_set_u32(meta, f"{info.arch}.expert_group_used_count", 1)
            nextn = info.int(f"{info.arch}.nextn_predict_layers", 0)
            if nextn > 0:
                # Multi-token-prediction blocks (never run by plain decoding): llama.cpp asks the file
                # whether it holds them, which a model built from metadata cannot answer (it then aborts);
                # build the trunk alone, as llama.cpp's own decoding uses it
                g.gguf_set_u32(meta, f"{info.arch}.block_count", info.params.n_layer - nextn)
                g.gguf_set_u32(meta, f"{info.arch}.nextn_predict_layers", 0)
                self._truncate_layer_arrays(meta, info.params.n_layer - nextn)
            for fused, (gate, _up) in self.fused.items():
                t = self._by_name[gate]
                g.gguf_declare_tensor(meta, fused, int(t.qtype), _fused_shape(t, t.shape[0]))
            for t in info.tensors:  # a split GGUF: tensors of the other shards are not in the first's metadata
                if t.file:
                    g.gguf_declare_tensor(meta, t.name, int(t.qtype), t.shape)
            for name, src in ALIAS_TENSORS.items():  # tied embeddings: the copy keeps the source's type
                if name not in self._by_name and src in self._by_name:
                    g.gguf_declare_tensor(meta, name, int(self._by_name[src].qtype), self._by_name[src].shape)
            # Keep the ctypes callback alive for the model's lifetime (llama.cpp may keep the pointer).
            self._cb = llama_cpp.llama_model_set_tensor_data_t(self._fill)
            params = llama_cpp.llama_model_default_params()
            params.n_gpu_layers = n_gpu_layers
            self._repack_plan = self._plan_repack()
            self._overrides = self._repack_plan.overrides
            if overrides:  # NULL-terminated array; the patterns are kept alive with it
                self._patterns = [p.encode() for p, _ in overrides]
                self._overrides = (BuftOverride * (len(overrides) + 1))(
                    *[BuftOverride(pat, buft) for pat, (_, buft) in zip(self._patterns, overrides)])
            if self._overrides is not None:
                params.tensor_buft_overrides = ctypes.cast(self._overrides, ctypes.c_void_p)
            if tensor_split:  # llama.cpp reads llama_max_devices() floats
                n_max = llama_cpp.llama_max_devices()
                if len(tensor_split) > n_max:
                    raise SwapMoEError(f"--tensor-split: at most {n_max} proportions, got {len(tensor_split)}")
                self._split = (ctypes.c_float * n_max)(*tensor_split)
                params.tensor_split = ctypes.cast(self._split, ctypes.POINTER(ctypes.c_float))
            self.model = llama_cpp.llama_model_init_from_user(meta, self._cb, None, params)
        finally:
            self._meta = meta  # freed in close(): the model may reference its strings
        if self._fill_error is not None:
            self.close()
            if nextn > 0 and isinstance(self._fill_error, ModelBuildError):
                raise ModelBuildError(f"{info.path}: {info.arch} declares {nextn} multi-token-prediction block(s); "
                                      f"the model without them could not be built ({self._fill_error})") from None
            raise self._fill_error
        if not self.model:
            self.close()
            raise ModelBuildError(f"{info.path}: llama.cpp could not build the model with {slots} expert slots")
        self._check_all_created(info.params.n_layer - nextn)
        self.unlinked = unlink_absent(ctypes.cast(self.model, ctypes.c_void_p).value or 0,
                                      info.params.n_layer - nextn, self._present, self._absent)

    def _check_all_created(self, n_layer: int) -> None:
        """Refuse a model for which llama.cpp did not create some of the file's tensors: its loader then
        built another structure than the file's (Jamba: a layer is MoE when `ffn_gate_inp` exists, and
        in this mode every optional tensor exists, so its dense FFN weights are never asked for)."""
        fused = {n for pair in self.fused.values() for n in pair}
        missed = [t.name for t in self.info.tensors if t.name not in self._requested and t.name not in fused
                  and (t.block is None or t.block < n_layer)]
        if missed:
            self.close()
            raise ModelBuildError(f"{self.info.path}: {self.info.arch}: llama.cpp built this model without the file's "
                                  f"{missed[0]}{f' (and {len(missed) - 1} more)' if len(missed) > 1 else ''}: its "
                                  "loader chose another layer structure because optional tensors exist when a model "
                                  "is built from metadata; this file cannot run with expert slots")

    def _truncate_layer_arrays(self, meta: int, n_layer: int) -> None:
        """Per-layer arrays (`<arch>.*` of block_count entries) cut to the first `n_layer` layers."""
        from gguf import GGUFValueType as V

        dtypes = {V.UINT8: np.uint8, V.INT8: np.int8, V.UINT16: np.uint16, V.INT16: np.int16, V.UINT32: np.uint32,
                  V.INT32: np.int32, V.FLOAT32: np.float32, V.BOOL: np.uint8, V.UINT64: np.uint64,
                  V.INT64: np.int64, V.FLOAT64: np.float64}
        for key, field in self.info.reader.fields.items():
            if not key.startswith(f"{self.info.arch}.") or field.types[0] != V.ARRAY:
                continue
            sub, values = field.types[-1], self.info.get(key)
            if sub in dtypes and isinstance(values, list) and len(values) == self.info.params.n_layer:
                ggml().gguf_set_array(meta, key, int(sub), np.asarray(values[:n_layer], dtype=dtypes[sub]))

    def _plan_repack(self) -> RepackPlan:
        """Tensors (as llama.cpp creates them, slot-sized) that ggml-cpu would repack."""
        if self.repacker is None or not self.repacker.available:
            return RepackPlan((), None)
        created = [(t.name, t.qtype, (self.slots, *t.shape[1:]) if t.is_expert else t.shape) for t in self.info.tensors]
        created += [(fused, self._by_name[gate].qtype, _fused_shape(self._by_name[gate], self.slots))
                    for fused, (gate, _up) in self.fused.items()]
        plan = self.repacker.plan([(n, int(q), s) for n, q, s in created])
        if plan.names:
            log.info("CPU weight repacking for %d tensors (%s)", len(plan.names),
                     ", ".join(sorted({q.name for n, q, _ in created if n in plan.names})))
        return plan

    def _write_slot(self, tptr: int, handle: str, slot: int, stride: int, raw: np.ndarray) -> None:
        """One expert's plain bytes into `slot` of a stacked tensor (through ggml's repacking if repacked)."""
        if handle in self.repacked:
            self.repacker.write_slot(tptr, slot * stride, raw, *self.repacked[handle])  # type: ignore[union-attr]
        else:
            ggml().set(tptr, raw, slot * stride)

    def _fused_gate_up(self) -> dict[str, tuple[str, str]]:
        """fused name -> (gate, up) for MoE layers whose file has separate gate and up expert tensors."""
        out = {}
        for l in self.moe_layers:
            gate, up = f"blk.{l}.ffn_gate_exps.weight", f"blk.{l}.ffn_up_exps.weight"
            fused = f"blk.{l}.ffn_gate_up_exps.weight"
            tg, tu = self._by_name.get(gate), self._by_name.get(up)
            if tg is None or tu is None or fused in self._by_name:
                continue
            if tg.qtype == tu.qtype and tg.shape == tu.shape:
                out[fused] = (gate, up)
        return out

    def _default_set(self, layer: int) -> list[int]:
        """Before any routing is known: the experts with the largest weight norms."""
        norms = self.info.expert_norms[self.info.moe_layers.index(layer)]  # type: ignore[index]
        return sorted(np.argsort(-norms, kind="stable")[: self.slots].tolist())

    def _pread(self, offset: int, n: int, file: int = 0) -> np.ndarray:
        """`n` bytes at `offset` of file `file` (`TensorEntry.file`: the shard of a split GGUF)."""
        buf = np.empty(n, dtype=np.uint8)
        if os.preadv(self.store.fds[file], [buf], offset) != n:
            raise LayoutError(f"{self.info.paths[file]}: short read at {offset} (file truncated?)")
        return buf

    # called by llama.cpp, once per tensor, while the model is built --------------------------
    def _fill(self, tptr: int, _ud: int) -> None:
        if self._fill_error is not None:
            return
        try:
            self._fill_one(tptr)
        except BaseException as e:  # cannot propagate through C: re-raised after init returns
            self._fill_error = e

    def _advise(self, tptr: int) -> None:
        """Huge pages for each host weight buffer, asked for before llama.cpp's first write into it."""
        buf = GGMLTensor.from_address(tptr).buffer
        if buf and buf not in self._advised:
            self._advised.add(buf)
            g = ggml()
            if g.lib.ggml_backend_buffer_is_host(buf):
                advise_huge_pages(g.lib.ggml_backend_buffer_get_base(buf), g.lib.ggml_backend_buffer_get_size(buf))

    def _fill_one(self, tptr: int) -> None:
        self._advise(tptr)
        g = ggml()
        name, nbytes = g.name(tptr), g.nbytes(tptr)
        t = self._by_name.get(name)
        self._requested.add(name)
        if t is not None or name in self.fused:
            block = t.block if t is not None else self._by_name[self.fused[name][0]].block
            if block is not None:
                self._present.setdefault(block, {})[name.split(".", 2)[-1]] = tptr
        if t is None and name in self.fused:
            self._fill_fused(tptr, name, nbytes)
            return
        if t is None:
            self._fill_absent(tptr, name, nbytes)
            return
        layer = t.block
        if t.is_expert and layer in self.slot_map:
            if nbytes != self.slots * t.expert_nbytes:
                raise ModelBuildError(f"{name}: llama.cpp wants {nbytes} bytes for {self.slots} slots, "
                                      f"the file has {t.expert_nbytes} per expert")
            self.handles[name] = tptr
            self.placement[name] = (name, 0, t.expert_nbytes)
            if is_repack_tensor(tptr, self.repacker.buft if self.repacker else None):
                self.repacked[name] = (int(t.qtype), t.shape[-1], t.shape[-2])
            scratch = np.empty(t.expert_nbytes, dtype=np.uint8)
            for s, e in enumerate(self.slot_map[layer]):
                self.store.read_slice(t, e, scratch)
                self._write_slot(tptr, name, s, t.expert_nbytes, scratch)
        elif name in self.rows:
            rows = self.rows[name]
            if nbytes != self.slots * rows.shape[1]:
                raise ModelBuildError(f"{name}: llama.cpp wants {nbytes} bytes, expected {self.slots} slots of "
                                      f"{rows.shape[1]} bytes (the file has {t.nbytes} for {self.n_expert} experts)")
            self.handles[name] = tptr
            g.set(tptr, rows[self.slot_map[layer]])  # type: ignore[index]
        elif nbytes == t.nbytes:
            g.set(tptr, self._pread(t.offset, t.nbytes, t.file))
        else:
            raise ModelBuildError(f"{name}: llama.cpp wants {nbytes} bytes, the file has {t.nbytes}")

    def _fill_fused(self, tptr: int, name: str, nbytes: int) -> None:
        gate, up = (self._by_name[n] for n in self.fused[name])
        part = gate.expert_nbytes
        if nbytes != self.slots * 2 * part:
            raise ModelBuildError(f"{self.info.path}: {name}: llama.cpp wants {nbytes} bytes for {self.slots} slots, "
                                  f"gate + up have {2 * part} per expert")
        self.handles[name] = tptr
        self.placement[gate.name] = (name, 0, 2 * part)
        self.placement[up.name] = (name, part, 2 * part)
        if is_repack_tensor(tptr, self.repacker.buft if self.repacker else None):
            self.repacked[name] = (int(gate.qtype), gate.shape[-1], 2 * gate.shape[-2])
        scratch = np.empty(2 * part, dtype=np.uint8)  # [gate rows | up rows] of one expert
        for s, e in enumerate(self.slot_map[gate.block]):  # type: ignore[index]
            self.store.read_slice(gate, e, scratch[:part])
            self.store.read_slice(up, e, scratch[part:])
            self._write_slot(tptr, name, s, 2 * part, scratch)

    def _fill_absent(self, tptr: int, name: str, nbytes: int) -> None:
        g = ggml()
        alias = ALIAS_TENSORS.get(name)
        if alias in self._by_name and self._by_name[alias].nbytes == nbytes:  # tied embeddings
            src = self._by_name[alias]
            g.set(tptr, self._pread(src.offset, src.nbytes, src.file))
        else:
            rule = next((r for r in self._neutral if name.endswith(r.suffix)), None)
            if rule is None or g.tensor(tptr).type != GGML_TYPE_F32:
                # llama.cpp creates every optional tensor in this mode, also ones its graph skips when
                # others exist (a legacy alternative): zeros for now; the runtime refuses the model if
                # its graph reads one of these (`check_unused_absent`)
                g.set(tptr, np.zeros(nbytes, dtype=np.uint8))
                self.provisional.append(name)
                self._absent.add(tptr)
                return
            tt = g.tensor(tptr)
            if rule.identity and tt.ne[0] == tt.ne[1] and tt.ne[2] == tt.ne[3] == 1:
                g.set(tptr, np.eye(tt.ne[0], dtype=np.float32))  # x @ I == x exactly in f32
            elif rule.identity:
                raise ModelBuildError(f"{self.info.path}: {self.info.arch}: {name} is absent and not square "
                                      f"({tt.ne[0]} x {tt.ne[1]}): no neutral value")
            else:
                g.set(tptr, np.full(nbytes // 4, rule.value, dtype=np.float32))
            self._absent.add(tptr)
        self.absent_filled.append(name)

    def check_unused_absent(self, graph_inputs: set[str]) -> None:
        """Refuse the model if llama.cpp's graph reads a tensor the file lacks and that has no neutral value."""
        used = [n for n in self.provisional if n in graph_inputs]
        if used:
            raise ModelBuildError(f"{self.info.path}: {self.info.arch}: llama.cpp's graph uses {used[0]}"
                                  f"{f' (and {len(used) - 1} more)' if len(used) > 1 else ''}, which the file lacks "
                                  "and for which no neutral value exists; this file cannot run with expert slots")
        if self.provisional:
            log.debug("absent tensors llama.cpp created but its graph does not use: %s", self.provisional)

    # swapping -------------------------------------------------------------------------------
    def layer_tensors(self, layer: int) -> list[TensorEntry]:
        return self.store.layers[layer]

    def commit(self, slot: int, staged: StagedExpert) -> None:
        """Copy a staged expert into `slot` of its layer (between decode calls only)."""
        g, layer, e = ggml(), staged.layer, staged.expert
        assembled: dict[str, list[tuple[int, np.ndarray]]] = {}  # repacked handle -> (offset in slot, bytes)
        for name, view in staged.parts.items():
            handle, off, stride = self.placement[name]
            if handle in self.repacked:  # whole slot at once, through ggml's repacking
                assembled.setdefault(handle, []).append((off, view))
            else:
                g.set(self.handles[handle], view, slot * stride + off)
        for handle, parts in assembled.items():  # a fused gate+up slot: gate rows, then up rows
            raw = parts[0][1] if len(parts) == 1 else np.concatenate([v for _, v in sorted(parts, key=lambda p: p[0])])
            self._write_slot(self.handles[handle], handle, slot, raw.nbytes, raw)
        for name in self.rows_by_layer.get(layer, ()):
            rows = self.rows[name]
            g.set(self.handles[name], rows[e], slot * rows.shape[1])
        i = self.moe_layers.index(layer)
        self.resident_mask[i, self.slot_map[layer][slot]] = False
        self.resident_mask[i, e] = True
        self.slot_map[layer][slot] = e

    def swap(self, layer: int, slot: int, expert: int) -> None:
        """Synchronous swap: read, then commit. (The scheduler reads ahead instead.)"""
        staged = self.store.read(layer, expert, sync=True)
        try:
            self.commit(slot, staged)
        finally:
            self.store.release(staged)

    def resident(self, layer: int) -> list[int]:
        return list(self.slot_map[layer])

    def buffer_bytes(self) -> dict[str, int]:
        """Bytes of the model's weight buffers (slots included) per buffer type name: "CPU",
        "CPU_REPACK", "RPC0[127.0.0.1:50052]", "CUDA0"... (as allocated, not estimated)."""
        g, out = ggml(), {}
        for buf in self._advised:
            name = g.buft_name(g.lib.ggml_backend_buffer_get_type(buf))
            out[name] = out.get(name, 0) + int(g.lib.ggml_backend_buffer_get_size(buf))
        return out

    def slot_buffer(self, name: str) -> str:
        """The buffer type name holding slot tensor `name` (where its swaps are written)."""
        g = ggml()
        return g.buft_name(g.lib.ggml_backend_buffer_get_type(GGMLTensor.from_address(self.handles[name]).buffer))

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot across all MoE layers."""
        return sum(self.store.expert_nbytes.values())

    def close(self) -> None:
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None
        if getattr(self, "repacker", None) is not None:
            self.repacker.close()
        if getattr(self, "_meta", None):
            ggml().gguf_free(self._meta)
            self._meta = None
        self.store.close()
