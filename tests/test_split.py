"""Split GGUFs (llama.cpp's gguf-split shards): read as one set, converted to one swap-ready file,
partial sets refused (convert) or described (inspect)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import llama_logits, run_cli
from swapmoe_gguf.base.errors import GGUFFormatError
from swapmoe_gguf.fileformat.reader import read_gguf

TOKENS = [[1, 5, 9, 30, 2, 7], [3, 200, 17]]


def write_copy(src, dst: Path, *, shards: int = 1, keep_swapmoe: bool = False, exclude: tuple[str, ...] = (),
               split_max_tensors: int = 0) -> list[Path]:
    """Re-write a GGUF with gguf-py's writer as a downloaded model looks: 32-byte alignment, no
    swapmoe.* keys and, with `shards` > 1, split the way llama.cpp's gguf-split / convert_hf_to_gguf
    split (`<stem>-0000i-of-0000N.gguf`; all metadata in the first shard; split.no u16,
    split.count u16, split.tensors.count i32 in every shard). Tensor bytes are unchanged."""
    import gguf

    r = gguf.GGUFReader(src)
    n = len(r.tensors)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents(),
                        split_max_tensors=split_max_tensors or (-(-n // shards) if shards > 1 else 0))
    for k, f in r.fields.items():
        if k.startswith(("GGUF.", "general.alignment", "general.architecture", "split.")):
            continue
        if k.startswith("swapmoe.") and not keep_swapmoe:
            continue
        t = f.types
        w.add_key_value(k, f.contents(), t[0], t[-1] if len(t) > 1 else None)
    for t in r.tensors:
        if t.name in exclude:
            continue
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)  # data: numpy order (bytes for quants)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if shards == 1:
        return [dst]
    return [dst.with_name(f"{dst.stem}-{i + 1:05d}-of-{shards:05d}.gguf") for i in range(shards)]


def tensor_hashes(path) -> dict[str, str]:
    info = read_gguf(path)
    out = {}
    for t in info.tensors:
        with open(info.paths[t.file], "rb") as f:
            f.seek(t.offset)
            out[t.name] = hashlib.sha256(f.read(t.nbytes)).hexdigest()
    return out


@pytest.fixture(scope="module")
def split_set(tiny_gguf, tmp_path_factory) -> list[Path]:
    return write_copy(tiny_gguf, tmp_path_factory.mktemp("split") / "m.gguf", shards=2)


def _one_line_error(r, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("swapmoe: error:") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_split_set_is_read_whole(split_set, tiny_gguf):
    first, second = split_set
    assert first.is_file() and second.is_file()
    import gguf

    # the keys llama.cpp's loader checks
    r2 = gguf.GGUFReader(second)
    assert (r2.fields["split.no"].contents(), r2.fields["split.count"].contents()) == (1, 2)
    assert r2.fields["split.no"].types[0] == gguf.GGUFValueType.UINT16
    info = read_gguf(first)
    assert info.paths == [first, second] and info.split.count == 2 and not info.split.problem
    assert {t.file for t in info.tensors} == {0, 1}
    assert tensor_hashes(first) == tensor_hashes(tiny_gguf)
    assert not info.swap_ready and "split into 2 files" in info.layout_problem()
    assert info.run_problem() is None  # runs in place


def test_stock_loads_split_and_converted_file_is_bit_identical(split_set, tiny_gguf, tmp_path):
    first = split_set[0]
    stock_split = llama_logits(first, TOKENS)
    for a, b in zip(stock_split, llama_logits(Path(tiny_gguf), TOKENS)):
        assert np.array_equal(a, b)
    out = tmp_path / "joined.gguf"
    r = run_cli("convert", first, "-o", out)
    assert r.returncode == 0, r.stderr
    info = read_gguf(out)
    assert info.swap_ready and info.paths == [out] and not info.split.is_split
    assert info.get("split.count") is None and info.get("split.no") is None
    assert tensor_hashes(out) == tensor_hashes(first)
    for a, b in zip(llama_logits(out, TOKENS), stock_split):
        assert np.array_equal(a, b)
    assert not list(tmp_path.glob(".*partial*"))


def test_missing_shard_is_refused_and_inspect_says_so(split_set, tmp_path):
    lone = tmp_path / split_set[0].name
    shutil.copy(split_set[0], lone)
    missing = tmp_path / split_set[1].name
    with pytest.raises(GGUFFormatError, match="missing"):
        read_gguf(lone)
    out = tmp_path / "out.gguf"
    _one_line_error(run_cli("convert", lone, "-o", out), str(missing), "shard 2 of 2")
    assert sorted(p.name for p in tmp_path.iterdir()) == [lone.name], "something was left behind"
    # inspect describes the partial set and never calls it swap-ready
    r = run_cli("inspect", lone)
    assert r.returncode == 0, r.stderr
    assert "shard 1 of 2" in r.stdout and missing.name in r.stdout and "MISSING" in r.stdout
    ready = next(line for line in r.stdout.splitlines() if line.startswith("swap-ready:"))
    assert ready.split(":", 1)[1].strip().startswith("no:") and "yes" not in ready
    s = json.loads(run_cli("inspect", lone, "--json").stdout)
    assert s["swap_ready"] is False and s["runs_in_place"] is False
    assert s["split"] == {"shard": 1, "count": 2, "present": [str(lone)], "missing": [str(missing)], "complete": False}
    # and the runtime refuses it too, in one line
    _one_line_error(run_cli("chat", "-m", lone, "-p", "hi", "-n", "2"), str(missing))


def test_complete_set_inspect(split_set):
    r = run_cli("inspect", split_set[0], "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["split"]["complete"] and s["split"]["missing"] == [] and len(s["split"]["present"]) == 2
    assert s["swap_ready"] is False and s["runs_in_place"] is True
    assert s["file_bytes"] == sum(p.stat().st_size for p in split_set)
    human = run_cli("inspect", split_set[0]).stdout
    assert "shard 1 of 2" in human and "runs in place" in human


def test_non_first_shard_is_refused(split_set, tmp_path):
    out = tmp_path / "out.gguf"
    _one_line_error(run_cli("convert", split_set[1], "-o", out), "shard 2 of 2", str(split_set[0]))
    _one_line_error(run_cli("inspect", split_set[1]), str(split_set[0]))
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_shards_whose_counts_disagree_are_refused(tiny_gguf, tmp_path):
    for d in "abc":
        (tmp_path / d).mkdir()
    two = write_copy(tiny_gguf, tmp_path / "a" / "m.gguf", shards=2)
    three = write_copy(tiny_gguf, tmp_path / "b" / "m.gguf", shards=3)
    shutil.copy(three[1], two[1])  # claims split.count 3 under a -of-00002 name
    out = tmp_path / "out.gguf"
    _one_line_error(run_cli("convert", two[0], "-o", out), str(two[1]), "split.count 3")
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))
    # consistent split keys, but a tensor short of what split.tensors.count says
    last = read_gguf(tiny_gguf).tensors[-1].name
    fewer = write_copy(tiny_gguf, tmp_path / "c" / "m.gguf", shards=2, exclude=(last,))
    full = write_copy(tiny_gguf, tmp_path / "m.gguf", shards=2)
    shutil.copy(fewer[1], full[1])
    _one_line_error(run_cli("convert", full[0], "-o", out), "split.tensors.count")
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_split_name_that_hides_its_shards(split_set, tmp_path):
    renamed = tmp_path / "renamed.gguf"
    shutil.copy(split_set[0], renamed)
    _one_line_error(run_cli("convert", renamed, "-o", tmp_path / "o.gguf"), "-00001-of-00002.gguf")


def test_truncated_shard_is_named(split_set, tmp_path):
    import os

    copies = [tmp_path / p.name for p in split_set]
    for a, b in zip(split_set, copies):
        shutil.copy(a, b)
    os.truncate(copies[1], copies[1].stat().st_size - 100)
    _one_line_error(run_cli("convert", copies[0], "-o", tmp_path / "o.gguf"), str(copies[1]), "truncated")
    assert not (tmp_path / "o.gguf").exists() and not list(tmp_path.glob(".*partial*"))
