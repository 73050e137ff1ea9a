"""Streaming GGUF writer for the swap-ready layout.

gguf-py's `GGUFWriter` writes the header, metadata and tensor infos; tensor data is streamed
here chunk by chunk (one expert slice at a time for stacked expert tensors), so memory stays
near one tensor whatever the model size. Values only known after the data has been streamed
(the per-expert norms) are reserved as zero arrays and patched in place at the end.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFValueType, GGUFWriter
from tqdm import tqdm

from ..base.errors import ConvertError
from ..fileformat.constants import EXPERT_TENSOR_MARK

log = logging.getLogger(__name__)


@dataclass
class PlannedTensor:
    """One output tensor: its final name, numpy-order shape, type, size and a data producer.

    `produce()` yields encoded arrays whose bytes, concatenated, are the tensor's data. For a
    stacked expert tensor (`n_expert > 0`) it yields one array per expert, in expert order.
    """

    name: str
    shape: tuple[int, ...]
    qtype: Q
    nbytes: int
    produce: Callable[[], Iterator[np.ndarray]]
    n_expert: int = 0

    @property
    def is_expert(self) -> bool:
        return self.n_expert > 0 and EXPERT_TENSOR_MARK in self.name

    @property
    def expert_nbytes(self) -> int:
        return self.nbytes // self.n_expert if self.n_expert else 0


@dataclass
class SwapReadyWriter:
    path: Path
    arch: str
    alignment: int
    tensors: list[PlannedTensor] = field(default_factory=list)
    _late: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.gw = GGUFWriter(self.path, self.arch)
        if self.alignment != 32:
            self.gw.add_custom_alignment(self.alignment)

    def add(self, t: PlannedTensor) -> None:
        self.tensors.append(t)

    def reserve_f32_array(self, key: str, n: int) -> None:
        """Write `n` zeros now; `patch()` fills them once the data is written."""
        self.gw.add_key_value(key, [0.0] * n, GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
        self._late[key] = n

    def write(self, progress: bool | None = None) -> None:
        gw = self.gw
        for t in self.tensors:
            gw.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        gw.write_header_to_file()
        gw.write_kv_data_to_file()
        gw.write_ti_data_to_file()
        fout = gw.fout[0]
        total = sum(t.nbytes for t in self.tensors)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=None if progress is None else not progress)
        try:
            for t in self.tensors:
                gw.write_padding(fout, fout.tell())
                written = 0
                bar.set_postfix_str(t.name, refresh=False)
                for chunk in t.produce():
                    b = np.ascontiguousarray(chunk)
                    if t.n_expert and b.nbytes != t.expert_nbytes:
                        raise ConvertError(f"{t.name}: expert slice is {b.nbytes} bytes, expected {t.expert_nbytes}")
                    b.tofile(fout)
                    written += b.nbytes
                    bar.update(b.nbytes)
                if written != t.nbytes:
                    raise ConvertError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
                gw.write_padding(fout, written)
        finally:
            bar.close()
        gw.flush()
        gw.close()

    def patch(self, key: str, values: np.ndarray) -> None:
        """Fill an array reserved with `reserve_f32_array` in the written file."""
        values = np.asarray(values, dtype=np.float32).ravel()
        if values.size != self._late[key]:
            raise ConvertError(f"{key}: {values.size} values for {self._late[key]} reserved")
        reader = GGUFReader(self.path, "r+")
        fld = reader.fields[key]
        for v, idx in zip(values, fld.data):
            fld.parts[idx][0] = v
        reader.data.flush()
        del reader, fld
