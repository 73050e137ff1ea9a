"""Bad input: one clear line naming the problem and the file, exit code 2, nothing left behind."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import STORIES_DENSE, run_cli
from swapmoe_gguf.converters import convert
from swapmoe_gguf.converters.safetensors_io import Checkpoint
from swapmoe_gguf.converters.tiny_checkpoint import save_safetensors


def _fails_cleanly(r, *needles: str, out: Path | None = None) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("swapmoe: error: ")
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    if out is not None:
        assert not out.exists(), "output written despite the error"
        assert not list(out.parent.glob(f".{out.name}.*")), "temporary files left behind"


@pytest.fixture
def model(hf_models, tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(hf_models["mixtral"], d)
    return d


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def test_missing_architectures(model, tmp_path):
    _edit_config(model, architectures=None)
    out = tmp_path / "o.gguf"
    _fails_cleanly(run_cli("convert", model, "-o", out), "config.json", "architectures", out=out)


def test_unsupported_architecture(model, tmp_path):
    _edit_config(model, architectures=["FancyMoeForCausalLM"])
    out = tmp_path / "o.gguf"
    _fails_cleanly(run_cli("convert", model, "-o", out, "--engine", "builtin"), "FancyMoeForCausalLM", "not supported",
                   "MixtralForCausalLM", out=out)
    # the default engine hands it to llama.cpp's converter (the zoo's copy: fetched once), which does not know it
    import zoo

    env = {"SWAPMOE_LLAMACPP_CONVERTER": str(zoo.llamacpp_converter())}
    _fails_cleanly(run_cli("convert", model, "-o", out, env=env), "FancyMoeForCausalLM", "not supported",
                   "llama.cpp's converter", out=out)


@pytest.mark.parametrize("arch,changes", [
    ("DbrxForCausalLM", {"ffn_config": {"moe_num_experts": 16, "moe_top_k": 4}}),
    ("Ernie4_5_MoeForCausalLM", {"moe_num_experts": 64, "moe_k": 6}),
])
def test_unsupported_moe_is_not_called_dense(model, tmp_path, arch, changes):
    """MoE configs that keep the expert count under other keys get 'not supported', not 'not MoE', from the
    built-in converter (the default engine gives them to llama.cpp's converter, tests/test_convert_llamacpp.py)."""
    _edit_config(model, architectures=[arch], num_local_experts=None, num_experts_per_tok=None, **changes)
    out = tmp_path / "o.gguf"
    r = run_cli("convert", model, "-o", out, "--engine", "builtin")
    _fails_cleanly(r, arch, "not supported", out=out)
    assert "not a Mixture-of-Experts" not in r.stderr


def test_non_moe_checkpoint(model, tmp_path):
    _edit_config(model, architectures=["LlamaForCausalLM"], num_local_experts=None, num_experts_per_tok=None)
    out = tmp_path / "o.gguf"
    _fails_cleanly(run_cli("convert", model, "-o", out, "--engine", "builtin"), "not a Mixture-of-Experts", out=out)


def test_non_moe_gguf(tmp_path):
    dense = STORIES_DENSE
    assert dense.is_file()
    out = tmp_path / "o.gguf"
    _fails_cleanly(run_cli("convert", dense, "-o", out), "stories260K.gguf", "experts", out=out)


def test_missing_config(model, tmp_path):
    (model / "config.json").unlink()
    out = tmp_path / "o.gguf"
    _fails_cleanly(run_cli("convert", model, "-o", out), "config.json", "missing", out=out)


def _shard(model: Path) -> None:
    """Split model.safetensors into two shards with an index (as save_pretrained does for big models)."""
    ck = Checkpoint(model)
    names = ck.names()
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fn, part in halves.items():
        save_safetensors(model / fn, {n: (ck.shape(n), ck.get(n).dtype) for n in part}, ck.get)
    ck.close()
    (model / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {n: fn for fn, part in halves.items() for n in part}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_checkpoint_converts_like_single_file(model, hf_models, tmp_path):
    single = tmp_path / "single.gguf"
    convert(hf_models["mixtral"], single, "f16", progress=False)
    _shard(model)
    sharded = tmp_path / "sharded.gguf"
    convert(model, sharded, "f16", progress=False)
    # general.name differs (directory name); tensor data must not.
    from test_layout import _tensor_hashes

    assert _tensor_hashes(single) == _tensor_hashes(sharded)


def test_missing_shard(model, tmp_path):
    _shard(model)
    (model / "model-00002-of-00002.safetensors").unlink()
    out = tmp_path / "o.gguf"
    _fails_cleanly(run_cli("convert", model, "-o", out), "model-00002-of-00002.safetensors", "missing", out=out)


def test_truncated_safetensors(model, tmp_path):
    f = model / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.gguf"
    _fails_cleanly(run_cli("convert", model, "-o", out), "model.safetensors", "truncated", out=out)


def test_truncated_gguf(hf_models, tmp_path):
    good = tmp_path / "good.gguf"
    convert(hf_models["qwen2moe"], good, "f16", progress=False)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out = tmp_path / "o.gguf"
    _fails_cleanly(run_cli("convert", bad, "-o", out), "bad.gguf", "truncated", out=out)
    _fails_cleanly(run_cli("inspect", bad), "bad.gguf", "truncated")
    tiny = tmp_path / "tiny.gguf"
    tiny.write_bytes(good.read_bytes()[:100])  # cut inside the metadata
    _fails_cleanly(run_cli("inspect", tiny), "tiny.gguf")


def test_mismatched_expert_shapes(model, tmp_path):
    ck = Checkpoint(model)
    names = ck.names()
    bad_name = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    specs = {n: ((32, 64) if n == bad_name else ck.shape(n), ck.get(n).dtype) for n in names}
    arrays = {n: ck.get(n)[:32] if n == bad_name else ck.get(n) for n in names}
    ck.close()
    save_safetensors(model / "model.safetensors", specs, arrays.__getitem__)
    out = tmp_path / "o.gguf"
    _fails_cleanly(run_cli("convert", model, "-o", out), "blk.1.ffn_gate_exps", "different shapes", out=out)


def test_router_shape_mismatch(model, tmp_path):
    _edit_config(model, num_local_experts=8)
    out = tmp_path / "o.gguf"
    _fails_cleanly(run_cli("convert", model, "-o", out), "block_sparse_moe.gate.weight", "[8, 64]", out=out)


def test_unknown_type(model, tmp_path):
    out = tmp_path / "o.gguf"
    _fails_cleanly(run_cli("convert", model, "-o", out, "--type", "q3_xs"), "q3_xs", "q8_0", out=out)


def test_existing_output_needs_force(model, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"precious")
    _fails_cleanly(run_cli("convert", model, "-o", out), "already exists", "--force")
    assert out.read_bytes() == b"precious"
    r = run_cli("convert", model, "-o", out, "--force", "--type", "f16")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4] == b"GGUF"


def test_missing_input_and_bad_flags(tmp_path):
    _fails_cleanly(run_cli("convert", tmp_path / "nope", "-o", tmp_path / "o.gguf"), "nope", "no such file")
    _fails_cleanly(run_cli("inspect", tmp_path), "is a directory")
    _fails_cleanly(run_cli("convert", tmp_path), "-o")
    _fails_cleanly(run_cli("frobnicate"), "frobnicate")
