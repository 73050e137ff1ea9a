"""The swap-ready layout: page-aligned expert slices, swapmoe metadata, byte-exact re-layout."""
from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

from conftest import llama_logits, run_cli
from swapmoe_gguf.fileformat.constants import PAGE_ALIGNMENT
from swapmoe_gguf.converters import convert
from swapmoe_gguf.fileformat.reader import read_gguf


def _tensor_hashes(path) -> dict[str, str]:
    info = read_gguf(path)
    with open(path, "rb") as f:
        out = {}
        for t in info.tensors:
            f.seek(t.offset)
            out[t.name] = hashlib.sha256(f.read(t.nbytes)).hexdigest()
    return out


def test_every_expert_slice_is_page_aligned(hf_models, tmp_path):
    for qtype in ("f16", "q4_0"):
        out = tmp_path / f"m-{qtype}.gguf"
        res = convert(hf_models["mixtral"], out, qtype, progress=False)
        info = read_gguf(out)
        assert info.alignment == PAGE_ALIGNMENT
        assert info.expert_tensors, "no expert tensors found"
        if qtype == "f16":  # [4, 128, 64] f16 slices are 16 KiB: every one starts on a page
            assert res.slices_aligned and info.slices_aligned
        for t in info.expert_tensors:
            assert t.offset % PAGE_ALIGNMENT == 0
            for e in range(info.n_expert):
                start, end = t.expert_range(e)
                assert end - start == t.expert_nbytes
                if info.slices_aligned:
                    assert start % PAGE_ALIGNMENT == 0


def test_unalignable_slices_are_reported(hf_models, tmp_path):
    # q8_0 of a [64, 128] expert is 8704 bytes: no layout can put every slice on a page.
    out = tmp_path / "q.gguf"
    r = run_cli("convert", hf_models["mixtral"], "-o", out, "--type", "q8_0")
    assert r.returncode == 0, r.stderr
    assert "not a multiple of the 4096-byte page" in r.stderr
    s = run_cli("inspect", out)
    assert "swap-ready:" in s.stdout and "yes, but" in s.stdout


@pytest.mark.parametrize("source", ["stories", "converted"])
def test_relayout_keeps_bytes_and_logits(source, stories_moe, hf_models, tmp_path):
    if source == "stories":
        src = tmp_path / "in.gguf"
        shutil.copy(stories_moe, src)
        tokens = [[1, 365, 211, 263, 93, 292], [1, 318, 170, 402]]
    else:  # a stock-layout (32-byte aligned) file, as llama.cpp's own tools write them
        mid = tmp_path / "mid.gguf"
        convert(hf_models["qwen2moe"], mid, "f16", progress=False)
        src = tmp_path / "in.gguf"
        _write_unaligned_copy(mid, src)
        tokens = [[5, 17, 42, 99, 7], [200, 3, 64]]
    assert not read_gguf(src).swap_ready
    out = tmp_path / "out.gguf"
    res = convert(src, out, progress=False)
    assert res.written
    info = read_gguf(out)
    assert info.swap_ready and info.alignment == PAGE_ALIGNMENT
    assert _tensor_hashes(src) == _tensor_hashes(out)
    before, after = llama_logits(src, tokens), llama_logits(out, tokens)
    for b, a in zip(before, after):
        assert np.array_equal(b, a)
    # Running it again on the output reports the layout instead of rewriting.
    again = run_cli("convert", out, "-o", tmp_path / "again.gguf")
    assert again.returncode == 0 and "already swap-ready" in again.stdout
    assert not (tmp_path / "again.gguf").exists()


def _write_unaligned_copy(src, dst) -> None:
    """Re-write a GGUF with gguf-py's default 32-byte alignment and no swapmoe keys."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if k.startswith(("GGUF.", "general.alignment", "general.architecture", "swapmoe.")):
            continue
        t = f.types
        w.add_key_value(k, f.contents(), t[0], t[-1] if len(t) > 1 else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=tuple(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_kquant_output_is_swap_ready_and_loads(hf_models, tmp_path):
    out = tmp_path / "k.gguf"
    res = convert(hf_models["qwen3moe"], out, "q4_k_m", progress=False)
    info = read_gguf(out)
    assert res.written and info.swap_ready
    assert info.alignment == PAGE_ALIGNMENT
    assert info.get("general.file_type") == 15  # MOSTLY_Q4_K_M
    assert info.expert_norms is not None and np.all(info.expert_norms > 0)
    assert not list(tmp_path.glob(".*partial*")), "intermediate files left behind"
    logits = llama_logits(out, [[5, 17, 42]])[0]
    assert np.isfinite(logits).all() and logits.std() > 0.1


def test_inspect_reports_sizes(hf_models, tmp_path):
    import json

    out = tmp_path / "i.gguf"
    convert(hf_models["olmoe"], out, "f16", progress=False)
    r = run_cli("inspect", out, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["architecture"], s["layers"], s["experts"], s["experts_used"]) == ("olmoe", 2, 4, 2)
    # olmoe expert: gate+up [64, 64] and down [64, 64] at f16 = 3 * 64 * 64 * 2 bytes
    assert s["expert_bytes"] == 3 * 64 * 64 * 2
    assert s["min_weight_bytes_topk"] == s["non_expert_bytes"] + 2 * 2 * s["expert_bytes"]
    assert s["all_experts_weight_bytes"] == s["non_expert_bytes"] + 2 * 4 * s["expert_bytes"]
    assert s["swap_ready"] and s["slices_page_aligned"]
    human = run_cli("inspect", out).stdout
    for label in ("architecture:", "per-expert size:", "non-expert size:", "swap-ready:", "min memory"):
        assert label in human
