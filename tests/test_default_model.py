"""Training script (tiny config), the exported checkpoint through our converter, and `swapmoe eval`."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, SHAKESPEARE, hf_logits, llama_logits, run_cli
from swapmoe_gguf.converters import convert

TEXT = SHAKESPEARE


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "ckpt"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "train_default_moe.py"), "--tiny", "--text", str(TEXT),
                        "--out", str(out), "--max-steps", "30"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_training_loss_falls_and_card_is_written(trained):
    log = json.loads((trained / "training_log.json").read_text())
    losses = [rec["loss"] for rec in log["log"]]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.3, losses
    assert log["stats"]["held_out_ppl"] > 1 and len(log["stats"]["expert_usage_entropy_bits"]) == 2
    assert "Held-out perplexity" in (trained / "README.md").read_text()


def test_exported_checkpoint_converts_and_matches_transformers(trained, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "m.gguf"
    convert(trained, out, "f32", progress=False)
    tok = AutoTokenizer.from_pretrained(trained)
    toks = [tok.encode("First Citizen:\nBefore we proceed any further, hear me speak.")]
    ref, got = hf_logits(trained, toks)[0], llama_logits(out, toks)[0]
    assert np.abs(ref - got).max() <= 1e-3 * max(1.0, np.abs(ref).max())


def test_eval_full_against_itself_and_exact(trained, tmp_path):
    from swapmoe_gguf.evaluate import chunk_tokens, evaluate, run_eval
    from swapmoe_gguf.runtime import SwapMoELlama

    out = tmp_path / "m.gguf"
    convert(trained, out, "f16", progress=False)
    text = TEXT.read_text()[-30000:]
    full = SwapMoELlama(str(out), policy="full", n_ctx=136, n_batch=128, n_threads=2)
    try:
        chunks = chunk_tokens(full, text, 128, 3)
        res, ref = evaluate(full, chunks)
        again, _ = evaluate(full, chunks, ref)
    finally:
        full.close()
    assert again.kl == pytest.approx(0.0, abs=1e-9) and again.top1_agreement == 1.0
    assert again.ppl == pytest.approx(res.ppl)
    results = run_eval(str(out), text, policies=["exact", "static"], experts_per_layer=2, memory_budget=None,
                       ctx=128, chunks=3)
    by = {r.policy: r for r in results}
    assert by["exact"].kl < 1e-3 and by["exact"].ppl == pytest.approx(by["full"].ppl, rel=1e-3)
    assert by["static"].kl > by["exact"].kl
    cli = run_cli("eval", "-m", str(out), "--text", str(TEXT), "--experts-per-layer", "2", "-c", "128",
                  "--chunks", "2")
    assert cli.returncode == 0, cli.stderr
    assert "| full | 4/4 |" in cli.stdout and "| swapmoe | 2/4 |" in cli.stdout and "| static | 2/4 |" in cli.stdout
