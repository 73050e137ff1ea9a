"""llama.cpp's `GGUFWriter`, writing the swap-ready layout: the adapter its converter classes write into.

`llamacpp_child.py` puts `SwapReadyGGUFWriter` in place of `gguf.GGUFWriter` before a converter
class is instantiated, so every architecture's own code (tensor names, hyper-parameters, permutes,
expert merging, tokenizer) runs unchanged and its calls land here:

* tensors: the classes add lazy tensors; they are materialised one at a time while written, so memory
  stays near the largest tensor. Data starts on `alignment` (4096: page-aligned expert slices).
* the `swapmoe.*` keys are added when the header is written (all tensor infos are known by then);
  the expert norms are reserved as zeros and patched once the experts have streamed past.
* a checkpoint without routed experts is refused before the first byte is written.

Only run in the child process, where `gguf` is llama.cpp's own gguf-py (sdist of the pinned version).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LazyNumpyTensor, quants
from gguf.lazy import LazyBase

from ..base.errors import NotMoEError
from ..fileformat.constants import EXPERT_TENSOR_MARK, FORMAT_VERSION, PAGE_ALIGNMENT, SwapKeys
from ..fileformat.info import block_of
from ..fileformat.norms import ExpertNorms, counts_for_norm

log = logging.getLogger(__name__)


class SwapReadyGGUFWriter(GGUFWriter):
    """Set `configure(...)` on the class before the converter creates its writer."""

    alignment: int = PAGE_ALIGNMENT
    final: bool = True          # False: an intermediate for llama.cpp's quantizer (no layout keys)
    source: str = "hf"
    instances: list["SwapReadyGGUFWriter"] = []

    @classmethod
    def configure(cls, alignment: int, final: bool, source: str) -> None:
        cls.alignment, cls.final, cls.source = alignment, final, source

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.update(split_max_tensors=0, split_max_size=0, use_temp_file=False)  # one file, tensors in RAM lazily
        super().__init__(*args, **kwargs)
        if self.alignment != self.data_alignment:
            self.add_custom_alignment(self.alignment)
        self.n_expert = 0
        self.moe_layers: list[int] = []
        self.norms: ExpertNorms | None = None
        type(self).instances.append(self)

    # header: the swap-ready keys, from the complete list of tensor infos -------------------------
    def _expert_names(self) -> list[str]:
        infos = self.tensors[0]
        return [n for n, ti in infos.items()
                if EXPERT_TENSOR_MARK in n and len(ti.shape) >= 2 and ti.shape[0] == self.n_expert]

    def write_header_to_file(self, path: Any = None) -> None:
        kv = self.kv_data[0]
        count = kv.get(f"{self.arch}.expert_count")
        self.n_expert = int(count.value) if count is not None else 0
        experts = self._expert_names() if self.n_expert >= 2 else []
        if not experts:
            raise NotMoEError(f"{self.arch} model without routed experts (expert_count={self.n_expert}); "
                              "nothing to swap, use llama.cpp directly")
        self.moe_layers = sorted({b for n in experts if (b := block_of(n)) is not None})
        if self.final:
            aligned = all(self.tensors[0][n].nbytes // self.n_expert % PAGE_ALIGNMENT == 0 for n in experts)
            self.add_uint32(SwapKeys.FORMAT_VERSION, FORMAT_VERSION)
            self.add_uint32(SwapKeys.ALIGNMENT, self.data_alignment)
            self.add_bool(SwapKeys.SLICES_ALIGNED, aligned and self.data_alignment % PAGE_ALIGNMENT == 0)
        self.add_key_value(SwapKeys.MOE_LAYERS, self.moe_layers, GGUFValueType.ARRAY, GGUFValueType.INT32)
        self.add_uint32(SwapKeys.EXPERT_COUNT, self.n_expert)
        self.add_string(SwapKeys.SOURCE, self.source)
        self.add_key_value(SwapKeys.EXPERT_NORMS, [0.0] * (len(self.moe_layers) * self.n_expert),
                           GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
        self.norms = ExpertNorms(self.moe_layers, self.n_expert)
        super().write_header_to_file(path)

    # data: one tensor at a time, norms from the expert weights as they pass ---------------------
    def write_tensors_to_file(self, *, progress: bool = False) -> None:
        self.write_ti_data_to_file()
        assert self.fout is not None and len(self.fout) == 1
        fout = self.fout[0]
        self.write_padding(fout, fout.tell())
        infos = self.tensors[0]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc="converting", total=sum(ti.nbytes for ti in infos.values()), unit="B", unit_scale=True)
        experts = set(self._expert_names())
        for name, ti in infos.items():
            assert ti.tensor is not None
            data = ti.tensor
            if isinstance(data, LazyBase):
                data = LazyNumpyTensor.to_eager(data)  # this tensor only: the peak is the largest tensor
            if name in experts and counts_for_norm(name):
                self._add_norms(name, data, ti.dtype)
            start = fout.tell()
            data.tofile(fout)
            if fout.tell() - start != ti.nbytes:
                raise ValueError(f"tensor {name!r} wrote {fout.tell() - start} bytes, expected {ti.nbytes}")
            self.write_padding(fout, ti.nbytes)
            ti.tensor = None
            del data
            if bar is not None:
                bar.update(ti.nbytes)
        if bar is not None:
            bar.close()
        self.flush()
        self.state = type(self.state).WEIGHTS

    def _add_norms(self, name: str, data: Any, qtype: Any) -> None:
        """||E_i||^2 of each expert slice of `data` ([n_expert, ...]: floats, or quantized bytes)."""
        assert self.norms is not None
        layer = block_of(name)
        arr = np.asarray(data)
        for e in range(self.n_expert):
            x = arr[e]
            if x.dtype == np.uint8:
                x = quants.dequantize(x, qtype)
            self.norms.add(layer, e, x)  # type: ignore[arg-type]

    def close(self) -> None:
        path = self.path
        super().close()
        if self.norms is not None and path is not None and self.state is type(self.state).WEIGHTS:
            _patch_norms(path, self.norms.values())


def _patch_norms(path: Any, values: np.ndarray) -> None:
    """Fill the reserved `swapmoe.expert_norms` array of the written file in place."""
    reader = GGUFReader(path, "r+")
    fld = reader.fields[SwapKeys.EXPERT_NORMS]
    for v, idx in zip(values.ravel(), fld.data):
        fld.parts[idx][0] = v
    reader.data.flush()
    del reader, fld
