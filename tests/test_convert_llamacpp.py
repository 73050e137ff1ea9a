"""`swapmoe convert HF_DIR --engine llamacpp`: llama.cpp's own converter classes, our writer.

For every architecture of the zoo (tests/zoo.py: tiny random checkpoints built with transformers),
the swap-ready file written in one pass has the tensors of llama.cpp's own conversion of the same
checkpoint (same names, shapes, types; same bytes: the zoo's types are f32 and q8_0), page-aligned
data and the `swapmoe.*` keys, and `full` on it gives stock llama.cpp's logits on llama.cpp's file,
bit for bit. Broken checkpoints get one line naming the file, exit 2, and no output.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import zoo
from conftest import run_cli
from swapmoe_gguf.fileformat.constants import PAGE_ALIGNMENT, SwapKeys
from swapmoe_gguf.fileformat.reader import read_gguf

# llama.cpp's converter itself fails on this checkpoint (test_arch_zoo: Moonshot's config keys)
NOT_CONVERTED = {"kimi-linear"}
NAMES = [n for n in zoo.RECIPES if n not in NOT_CONVERTED]
# `full` cannot build these with expert slots (test_arch_zoo.KNOWN)
FULL_KNOWN = {"jamba": "jamba: llama.cpp's loader picks dense or MoE layers by an optional tensor's presence"}


class _Ours:
    def __init__(self, root: Path):
        self.root, self.cache = root, {}

    def get(self, name: str) -> Path:
        if name not in self.cache:
            try:
                self.cache[name] = zoo.convert_ours(name, self.root / f"{name}.gguf")
            except zoo.ZooError as e:
                self.cache[name] = e
        got = self.cache[name]
        if isinstance(got, zoo.ZooError):
            raise AssertionError(f"{name}: {got}")
        return got


@pytest.fixture(scope="session")
def ours(tmp_path_factory) -> _Ours:  # type: ignore[no-untyped-def]
    return _Ours(tmp_path_factory.mktemp("ours"))


def _llamacpp(name: str) -> Path:
    try:
        return zoo.build(name)
    except zoo.ZooError as e:
        raise AssertionError(f"llama.cpp's own conversion of {name}: {e}") from None


def _data(info, t) -> bytes:  # type: ignore[no-untyped-def]
    with open(info.paths[t.file], "rb") as f:
        f.seek(t.offset)
        return f.read(t.nbytes)


@pytest.mark.parametrize("name", NAMES)
def test_tensors_equal_llamacpp_conversion(ours, name):
    mine, theirs = read_gguf(ours.get(name)), read_gguf(_llamacpp(name))
    assert [t.name for t in mine.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(mine.tensors, theirs.tensors):
        assert (a.shape, a.qtype) == (b.shape, b.qtype), a.name
        assert _data(mine, a) == _data(theirs, b), f"{a.name}: bytes differ"
        assert a.offset % PAGE_ALIGNMENT == 0, a.name
    assert mine.swap_ready and mine.arch == theirs.arch
    assert mine.get(SwapKeys.EXPERT_COUNT) == theirs.n_expert and mine.moe_layers == theirs.moe_layers
    # the hyper-parameters are llama.cpp's: every key of its file, same value (general.* aside)
    for key in theirs.reader.fields:
        if key.startswith(f"{theirs.arch}."):
            assert mine.get(key) == theirs.get(key), key
    norms = mine.expert_norms
    assert norms is not None and norms.shape == (len(mine.moe_layers), mine.n_expert) and (norms > 0).all()


def test_expert_norms_are_those_of_the_weights(ours):
    """swapmoe.expert_norms: ||E_i|| of gate, up and down of expert i, from the written F32 data."""
    info = read_gguf(ours.get("qwen3moe"))
    norms = info.expert_norms
    for li, layer in enumerate(info.moe_layers):
        sq = np.zeros(info.n_expert)
        for t in info.layer_expert_tensors(layer):
            if t.name.endswith(("gate_exps.weight", "up_exps.weight", "down_exps.weight")):
                w = np.frombuffer(_data(info, t), dtype=np.float32).reshape(t.shape).astype(np.float64)
                sq += (w.reshape(info.n_expert, -1) ** 2).sum(axis=1)
        np.testing.assert_allclose(norms[li], np.sqrt(sq), rtol=1e-5)


def _full_param(name: str):  # type: ignore[no-untyped-def]
    if name in FULL_KNOWN:
        return pytest.param(name, marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=FULL_KNOWN[name]))
    return name


@pytest.mark.parametrize("name", [_full_param(n) for n in NAMES])
def test_full_on_our_file_equals_stock_on_llamacpps(ours, tmp_path, name):
    stock = zoo.probe("stock", _llamacpp(name), tmp_path / "stock.npz")
    assert stock["ok"], stock["error"]
    full = zoo.probe("full", ours.get(name), tmp_path / "full.npz")
    assert full["ok"], full["error"]
    for a, b in zip(full["logits"], stock["logits"]):
        assert a.shape == b.shape and np.isfinite(b).all()
        assert np.array_equal(a, b), f"max |full - stock| = {np.max(np.abs(a - b)):.3g}"


# ------------------------------------------------------------------------------------------------
# broken checkpoints: one line naming the file, exit 2, nothing written
# ------------------------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    return {"SWAPMOE_LLAMACPP_CONVERTER": str(zoo.llamacpp_converter())}


def _refused(src: Path, out: Path, *match: str) -> str:
    r = run_cli("convert", src, "-o", out, "--engine", "llamacpp", "--vocab", "sentencepiece", "--no-progress",
                env=_env(), timeout=600)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("swapmoe: error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    for m in match:
        assert m in lines[0], lines[0]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), list(out.parent.iterdir())
    return lines[0]


def _copy(name: str, dst: Path) -> Path:
    shutil.copytree(zoo.hf_checkpoint(name), dst)
    return dst


def test_missing_shard_is_named(tmp_path):
    src = _copy("mixtral", tmp_path / "hf")
    st = src / "model.safetensors"
    # a sharded checkpoint whose second shard is missing
    (src / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {}, "weight_map": {**{k: "model-00001-of-00002.safetensors" for k in _names(st)},
                                       "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    st.rename(src / "model-00001-of-00002.safetensors")
    _refused(src, tmp_path / "out.gguf", "model-00002-of-00002.safetensors")


def _names(st: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(st), "np") as f:
        return [k for k in f.keys() if k != "lm_head.weight"]


def test_unknown_architecture(tmp_path):
    src = _copy("mixtral", tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "architectures": ["FrobnicatorForCausalLM"]}))
    _refused(src, tmp_path / "out.gguf", "FrobnicatorForCausalLM", "not known to llama.cpp's converter",
             str(src / "config.json"))


def test_dense_model_is_not_moe(tmp_path):
    import torch
    import transformers

    src = tmp_path / "dense"
    cfg = transformers.LlamaConfig(**{**zoo.BASE, "intermediate_size": 64})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).float().save_pretrained(src)
    shutil.copy(zoo.TOKENIZER, src / "tokenizer.model")
    _refused(src, tmp_path / "out.gguf", "without routed experts", str(src))


def test_wrong_dtype_is_named(tmp_path):
    """A tensor of a dtype no converter knows (a damaged or foreign safetensors header): refused."""
    src = _copy("mixtral", tmp_path / "hf")
    st = src / "model.safetensors"
    raw = bytearray(st.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["model.embed_tokens.weight"]["dtype"] = "Q3X"  # same length as "F32": offsets unchanged
    new = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(new) == n
    raw[8:8 + n] = new
    st.write_bytes(bytes(raw))
    _refused(src, tmp_path / "out.gguf", str(src))


def test_offline_without_cache_refuses_in_one_line(tmp_path):
    src = _copy("mixtral", tmp_path / "hf")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path),
           "SWAPMOE_LLAMACPP_CONVERTER": ""}
    r = run_cli("convert", src, "-o", tmp_path / "o.gguf", "--engine", "llamacpp", env=env, timeout=600)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "fetching llama.cpp's converter" not in ln]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "pip could not fetch" in lines[0] and "SWAPMOE_LLAMACPP_CONVERTER" in lines[0], lines[0]
    assert not (tmp_path / "o.gguf").exists()


def test_types_through_llamacpps_quantizer(ours, tmp_path):
    """--type q4_k_m: llama.cpp's quantizer on our F16 intermediate, then the swap-ready layout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = tmp_path / "q4km.gguf"
    r = run_cli("convert", zoo.hf_checkpoint("qwen3moe"), "-o", out, "--engine", "llamacpp", "--vocab",
                "sentencepiece", "--type", "q4_k_m", "--no-progress", env={**env, **_env()}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    info = read_gguf(out)
    assert info.swap_ready and info.expert_norms is not None
    assert {t.qtype.name for t in info.tensors if t.is_expert} <= {"Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q5_0", "Q4_0",
                                                                    "Q5_1", "Q4_1", "IQ4_NL"}
    assert not list(tmp_path.glob(".*partial*"))


# the hand-written converter (converters/archs.py) stays the default for its 5 architectures: it needs
# neither torch nor the network, streams one expert at a time, and writes llama.cpp's bytes
BUILTIN = ["mixtral", "qwen3moe", "qwen2moe", "olmoe", "granitemoe", "mixtral-q8_0"]


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_engine_writes_llamacpps_tensors(tmp_path, name):
    from swapmoe_gguf.converters import convert

    out = tmp_path / "builtin.gguf"
    convert(zoo.hf_checkpoint(name), out, zoo.RECIPES[name].outtype, progress=False, engine="builtin")
    mine, theirs = read_gguf(out), read_gguf(_llamacpp(name))
    assert {t.name for t in mine.tensors} == {t.name for t in theirs.tensors}
    by_name = {t.name: t for t in mine.tensors}
    for b in theirs.tensors:
        a = by_name[b.name]
        assert (a.shape, a.qtype) == (b.shape, b.qtype), a.name
        assert _data(mine, a) == _data(theirs, b), f"{a.name}: bytes differ"


def test_auto_engine_picks_llamacpp_beyond_the_builtin_five(tmp_path):
    from swapmoe_gguf.converters import _use_llamacpp

    assert not _use_llamacpp(zoo.hf_checkpoint("mixtral"), "auto", None, "q8_0")
    assert _use_llamacpp(zoo.hf_checkpoint("mixtral"), "auto", None, "q5_k_s")  # a type only llama.cpp's path has
    assert _use_llamacpp(zoo.hf_checkpoint("dots1"), "auto", None, "f16")


# ------------------------------------------------------------------------------------------------
# --imatrix: llama.cpp's importance matrix formats, used by its quantizer
# ------------------------------------------------------------------------------------------------

def _imatrix_for(gguf: Path, out: Path, seed: int = 0) -> Path:
    """A GGUF importance matrix (llama-imatrix's format) for every 2-D+ weight of `gguf`."""
    import gguf as g

    info = read_gguf(gguf)
    rng = np.random.default_rng(seed)
    w = g.GGUFWriter(out, arch="imatrix")
    w.add_key_value("imatrix.datasets", ["random"], g.GGUFValueType.ARRAY, g.GGUFValueType.STRING)
    w.add_uint32("imatrix.chunk_count", 4)
    w.add_uint32("imatrix.chunk_size", 64)
    for t in info.tensors:
        if len(t.shape) < 2 or not t.name.endswith(".weight"):
            continue
        n_mat = t.shape[0] if t.is_expert else 1
        w.add_tensor(f"{t.name}.in_sum2", (rng.random((n_mat, t.shape[-1])) ** 4 * 256).astype(np.float32))
        w.add_tensor(f"{t.name}.counts", np.full((n_mat, 1), 256, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_imatrix_changes_what_llamacpps_quantizer_writes(tmp_path, monkeypatch):
    from swapmoe_gguf.converters import convert
    from swapmoe_gguf.converters.llamacpp_hf import LlamaCppOptions

    hf, opts = zoo.hf_checkpoint("qwen3moe"), LlamaCppOptions(vocab="sentencepiece")
    monkeypatch.setenv("SWAPMOE_LLAMACPP_CONVERTER", str(zoo.llamacpp_converter()))
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    convert(hf, plain, "q4_0", progress=False, engine="llamacpp", llamacpp=opts)
    imat = _imatrix_for(plain, tmp_path / "imatrix.gguf")
    convert(hf, weighted, "q4_0", progress=False, engine="llamacpp", llamacpp=opts, imatrix=imat)
    a, b = read_gguf(plain), read_gguf(weighted)
    assert a.swap_ready and b.swap_ready
    experts = [(x, y) for x, y in zip(a.tensors, b.tensors) if x.is_expert]
    assert experts and all(x.qtype == y.qtype and x.qtype.name == "Q4_0" for x, y in experts)
    assert all(_data(a, x) != _data(b, y) for x, y in experts), "the importance matrix was not used"


def test_imatrix_legacy_format_reads_as_llama_quantize_does(tmp_path):
    import struct

    from swapmoe_gguf.converters.imatrix import load_imatrix

    p = tmp_path / "old.dat"
    vals = np.arange(1, 9, dtype=np.float32)
    name = b"blk.0.attn_q.weight"
    p.write_bytes(struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 4, 8)
                  + vals.tobytes() + struct.pack("<i", 10) + struct.pack("<i", 4) + b"wiki")
    got = load_imatrix(p)
    np.testing.assert_array_equal(got["blk.0.attn_q.weight"], vals / 4)


@pytest.mark.parametrize("content,needle", [(b"GGUF" + b"\0" * 20, "not a readable GGUF importance matrix"),
                                            (b"\x05\0\0\0garbage", "importance matrix")])
def test_bad_imatrix_refused_before_converting(tmp_path, content, needle):
    bad = tmp_path / "bad.imatrix"
    bad.write_bytes(content)
    out = tmp_path / "o.gguf"
    r = run_cli("convert", zoo.hf_checkpoint("qwen3moe"), "-o", out, "--type", "q4_k_m", "--imatrix", bad,
                "--engine", "llamacpp", env=_env())
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0] and str(bad) in lines[0], r.stderr
    assert not out.exists()


def test_types_that_need_an_imatrix_say_so(tmp_path):
    r = run_cli("convert", zoo.hf_checkpoint("qwen3moe"), "-o", tmp_path / "o.gguf", "--type", "iq2_xxs",
                "--engine", "llamacpp", env=_env())
    assert r.returncode == 2 and "needs an importance matrix" in r.stderr and not (tmp_path / "o.gguf").exists()


def test_tokenizer_as_llamacpp_writes_it(tmp_path, monkeypatch):
    """--vocab auto: the architecture's own tokenizer code (Mixtral's: sentencepiece), its special tokens
    and chat template from tokenizer_config.json, as llama.cpp's converter writes them."""
    from swapmoe_gguf.converters import convert

    monkeypatch.setenv("SWAPMOE_LLAMACPP_CONVERTER", str(zoo.llamacpp_converter()))
    src = _copy("mixtral", tmp_path / "hf")
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>",
                                                           "eos_token": "</s>", "add_bos_token": True}))
    out = tmp_path / "o.gguf"
    convert(src, out, "f32", progress=False, engine="llamacpp")
    mine, theirs = read_gguf(out), read_gguf(_llamacpp("mixtral"))
    assert mine.get("tokenizer.ggml.model") == "llama"
    assert mine.get("tokenizer.ggml.tokens") == theirs.get("tokenizer.ggml.tokens")
    assert mine.get("tokenizer.chat_template") == template
    assert mine.get("tokenizer.ggml.add_bos_token") is True
    assert mine.get("tokenizer.ggml.bos_token_id") == 1


def test_bf16_norms_from_the_written_experts(ours, tmp_path, monkeypatch):
    """--type bf16 (encoded by llama.cpp's converter): the norms come from the bf16 expert slices."""
    from swapmoe_gguf.converters import convert
    from swapmoe_gguf.converters.llamacpp_hf import LlamaCppOptions

    monkeypatch.setenv("SWAPMOE_LLAMACPP_CONVERTER", str(zoo.llamacpp_converter()))
    out = tmp_path / "bf16.gguf"
    convert(zoo.hf_checkpoint("qwen3moe"), out, "bf16", progress=False, engine="llamacpp",
            llamacpp=LlamaCppOptions(vocab="sentencepiece"))
    info, ref = read_gguf(out), read_gguf(ours.get("qwen3moe"))
    assert {t.qtype.name for t in info.tensors if t.is_expert} == {"BF16"}
    np.testing.assert_allclose(info.expert_norms, ref.expert_norms, rtol=1e-2)
