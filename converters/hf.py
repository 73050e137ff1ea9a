"""Hugging Face checkpoint directory -> GGUF, streaming one tensor (one expert) at a time.

The expert stacking is written once, here: per-expert checkpoint tensors
(`...experts.<e>.<proj>.weight`) and already-stacked ones (`FusedExperts`) both become
llama.cpp's `blk.N.ffn_{gate,up,down}_exps.weight` of shape [n_expert, rows, cols], whose data
is written as n_expert consecutive slices while ||E_i|| accumulates from the float weights.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from gguf import GGML_QUANT_VERSION, get_tensor_name_map

from ..base.errors import ConvertError
from ..fileformat.constants import SwapKeys
from ..fileformat.info import block_of
from ..fileformat.norms import ExpertNorms, counts_for_norm
from . import archs as _archs  # noqa: F401  (registers the architectures)
from .layout import add_expert_keys, add_layout_keys, moe_layers_of
from .quant import OutType, encode, nbytes, tensor_type
from .registry import HFConfig, MoEArch, lookup
from .safetensors_io import Checkpoint
from .vocab import add_vocab
from .writer import PlannedTensor, SwapReadyWriter

log = logging.getLogger(__name__)

_EXPERT = re.compile(r"^(?P<pre>.+)\.experts\.(?P<e>\d+)\.(?P<proj>\w+)\.(?P<suf>weight|bias)$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class HFPlan:
    src: Path
    arch: MoEArch
    ckpt: Checkpoint
    tensors: list[PlannedTensor] = field(default_factory=list)
    norms: ExpertNorms | None = None

    @property
    def moe_layers(self) -> list[int]:
        return moe_layers_of(self.tensors)


def _sort_key(t: PlannedTensor) -> tuple[int, str]:
    b = block_of(t.name)
    if b is not None:
        return (b, t.name)
    return (-1 if t.name.startswith("token_embd") else 1 << 30, t.name)


def plan_hf(src: Path, out: OutType) -> HFPlan:
    cfg = HFConfig.load(src)
    arch = lookup(cfg)
    ckpt = Checkpoint(src)
    plan = HFPlan(src, arch, ckpt)
    tmap = get_tensor_name_map(arch.gguf_arch, arch.n_layer)
    experts: dict[str, dict[int, str]] = {}        # gguf name -> {expert: hf name}
    singles: list[tuple[str, str]] = []            # (gguf name, hf name)
    fused: list[tuple[str, str, int, int]] = []    # (gguf name, hf name, part, n_parts)

    for name in ckpt.names():
        if any(ig in name for ig in arch.ignored):
            continue
        if m := _EXPERT.match(name):
            gname = tmap.get_name(f"{m['pre']}.experts.{m['proj']}.{m['suf']}", try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise ConvertError(f"{src}: expert tensor {name!r} has no llama.cpp counterpart in {arch.arch_name}")
            e = int(m["e"])
            if e >= arch.n_expert:
                raise ConvertError(f"{src}: tensor {name!r} is expert {e}, but config.json declares {arch.n_expert} experts")
            experts.setdefault(gname, {})[e] = name
        elif f := next((f for f in arch.fused if name.endswith(f.hf_suffix)), None):
            bid = int(_LAYER.search(name).group(1))  # type: ignore[union-attr]
            fused += [(f"blk.{bid}.{kind}.weight", name, i, len(f.kinds)) for i, kind in enumerate(f.kinds)]
        elif gname := tmap.get_name(name, try_suffixes=(".weight", ".bias")):
            singles.append((gname, name))
        else:
            raise ConvertError(f"{src}: tensor {name!r} has no llama.cpp counterpart in {arch.arch_name}")

    for gname, hf in singles:
        shape = ckpt.shape(hf)
        _check_single(plan, gname, hf, shape)
        plan.tensors.append(_single(plan, gname, hf, shape, out))
    for gname, by_expert in experts.items():
        plan.tensors.append(_stacked(plan, gname, by_expert, out))
    for gname, hf, part, n_parts in fused:
        plan.tensors.append(_fused(plan, gname, hf, part, n_parts, out))
    if not any(t.is_expert for t in plan.tensors):
        raise ConvertError(f"{src}: no expert tensors found although config.json declares {arch.n_expert} experts")
    plan.tensors.sort(key=_sort_key)
    plan.norms = ExpertNorms(plan.moe_layers, arch.n_expert)
    return plan


def _check_single(plan: HFPlan, gname: str, hf: str, shape: tuple[int, ...]) -> None:
    a = plan.arch
    want: tuple[int, ...] | None = None
    if gname.endswith("ffn_gate_inp.weight"):
        want = (a.n_expert, a.n_embd)
    elif gname == "token_embd.weight":
        want = (a.cfg.int("vocab_size"), a.n_embd)
    if want is not None and tuple(shape) != want:
        raise ConvertError(f"{plan.src}: tensor {hf!r} has shape {list(shape)}, expected {list(want)} from config.json")


def _single(plan: HFPlan, gname: str, hf: str, shape: tuple[int, ...], out: OutType) -> PlannedTensor:
    qtype = tensor_type(gname, shape, out)

    def produce() -> Iterator[np.ndarray]:
        yield encode(plan.arch.transform(gname, plan.ckpt.get(hf)), qtype)

    return PlannedTensor(gname, shape, qtype, nbytes(shape, qtype), produce)


def _expert_tensor(plan: HFPlan, gname: str, shape: tuple[int, ...], out: OutType,
                   slices: Callable[[], Iterator[np.ndarray]]) -> PlannedTensor:
    """A stacked [n_expert, *shape] tensor whose per-expert float slices come from `slices`."""
    a = plan.arch
    want_in = a.n_embd if ("gate" in gname or "up" in gname) else None
    if gname.endswith("down_exps.weight") and shape[0] != a.n_embd or want_in and shape[-1] != want_in:
        raise ConvertError(f"{plan.src}: expert tensor {gname} has per-expert shape {list(shape)}, "
                           f"which does not fit hidden_size={a.n_embd}")
    stacked = (a.n_expert, *shape)
    qtype = tensor_type(gname, stacked, out)
    layer = block_of(gname)
    norm = counts_for_norm(gname)

    def produce() -> Iterator[np.ndarray]:
        for e, x in enumerate(slices()):
            x = a.transform(gname, x)
            if norm and plan.norms is not None:
                plan.norms.add(layer, e, x)  # type: ignore[arg-type]
            yield encode(x, qtype)

    return PlannedTensor(gname, stacked, qtype, nbytes(stacked, qtype), produce, n_expert=a.n_expert)


def _stacked(plan: HFPlan, gname: str, by_expert: dict[int, str], out: OutType) -> PlannedTensor:
    n = plan.arch.n_expert
    missing = sorted(set(range(n)) - set(by_expert))
    if missing:
        some = next(iter(by_expert.values()))
        raise ConvertError(f"{plan.src}: expert {missing[0]} of {gname} is missing "
                           f"(have {len(by_expert)} of {n}, e.g. {some!r})")
    shapes = {plan.ckpt.shape(by_expert[e]) for e in range(n)}
    if len(shapes) != 1:
        raise ConvertError(f"{plan.src}: experts of {gname} have different shapes: {sorted(map(list, shapes))}")
    return _expert_tensor(plan, gname, shapes.pop(), out,
                          lambda: (plan.ckpt.get(by_expert[e]) for e in range(n)))


def _fused(plan: HFPlan, gname: str, hf: str, part: int, n_parts: int, out: OutType) -> PlannedTensor:
    shape = plan.ckpt.shape(hf)  # [n_expert, n_parts * rows, cols]
    if len(shape) != 3 or shape[0] != plan.arch.n_expert or shape[1] % n_parts:
        raise ConvertError(f"{plan.src}: tensor {hf!r} has shape {list(shape)}, expected "
                           f"[{plan.arch.n_expert}, {n_parts}*rows, cols]")
    rows = shape[1] // n_parts

    def slices() -> Iterator[np.ndarray]:
        full = plan.ckpt.get(hf)
        for e in range(shape[0]):
            yield full[e, part * rows:(part + 1) * rows]

    return _expert_tensor(plan, gname, (rows, shape[2]), out, slices)


def write_hf(plan: HFPlan, dst: Path, out: OutType, alignment: int, final: bool, progress: bool | None) -> bool | None:
    """Write the plan; `final` adds the swap-ready layout keys. Returns slice alignment (final only)."""
    a = plan.arch
    w = SwapReadyWriter(dst, a.arch_name, alignment)
    gw = w.gw
    gw.add_name(plan.src.resolve().name)
    a.add_hparams(gw)
    gw.add_file_type(int(out.ftype))
    gw.add_quantization_version(GGML_QUANT_VERSION)
    add_vocab(gw, plan.src, a.cfg.int("vocab_size"))
    for t in plan.tensors:
        w.add(t)
    aligned = add_layout_keys(w) if final else None
    add_expert_keys(w, plan.moe_layers, a.n_expert, f"hf:{a.hf_name}", None)
    w.write(progress)
    assert plan.norms is not None
    w.patch(SwapKeys.EXPERT_NORMS, plan.norms.values())
    return aligned
