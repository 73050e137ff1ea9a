"""Training script (tiny config, two domains), the exported checkpoint through our converter, and
`swapmoe eval` on one text and on a mixed-domain request stream."""
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
    """Two domains: the Shakespeare head and this package's own Python source."""
    tmp = tmp_path_factory.mktemp("train")
    code = tmp / "python.txt"
    code.write_text("\n\n".join(p.read_text() for p in sorted((REPO / "swapmoe_gguf").rglob("*.py"))))
    out = tmp / "ckpt"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "train_default_moe.py"), "--tiny", "--text", str(TEXT),
                        "--text", str(code), "--out", str(out), "--max-steps", "30"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_training_loss_falls_and_card_is_written(trained):
    log = json.loads((trained / "training_log.json").read_text())
    losses = [rec["loss"] for rec in log["log"]]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.3, losses
    domains = ["tinyshakespeare-head", "python"]
    assert sorted(log["stats"]["held_out_ppl"]) == sorted(domains)
    assert all(1 < p < 300 for p in log["stats"]["held_out_ppl"].values())  # vocab 300: below uniform
    usage = log["usage"]
    assert usage["domains"] == domains and len(usage["share"]) == 2 and len(usage["share"][0]) == 2  # [domain, layer]
    shares = np.array(usage["share"])                                      # [domain, layer, expert]
    assert np.allclose(shares.sum(-1), 1.0, atol=1e-3)  # rounded to 4 places in the log
    assert all(0 < b <= usage["max_entropy_bits"] for b in usage["entropy_bits"]["all"])
    card = (trained / "README.md").read_text()
    assert "Held-out perplexity per domain" in card and "python" in card and "entropy" in card
    assert sorted(p.name for p in (trained / "heldout").iterdir()) == sorted(f"{d}.txt" for d in domains)
    calib = (trained / "calibration.txt").read_text()
    assert "def " in calib and "\n\n" in calib  # a slice of each domain


def test_exported_checkpoint_converts_and_matches_transformers(trained, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "m.gguf"
    convert(trained, out, "f32", progress=False)
    tok = AutoTokenizer.from_pretrained(trained)
    toks = [tok.encode("First Citizen:\nBefore we proceed any further, hear me speak.")]
    ref, got = hf_logits(trained, toks)[0], llama_logits(out, toks)[0]
    assert np.abs(ref - got).max() <= 1e-3 * max(1.0, np.abs(ref).max())


def test_eval_full_against_itself_and_exact(trained, tmp_path):
    from swapmoe_gguf.commands.evaluate import Chunk, chunk_tokens, evaluate, run_eval
    from swapmoe_gguf.runtime import SwapMoELlama

    out = tmp_path / "m.gguf"
    convert(trained, out, "f16", progress=False)
    text = TEXT.read_text()[-30000:]
    full = SwapMoELlama(str(out), policy="full", n_ctx=136, n_batch=128, n_threads=2)
    try:
        chunks = [Chunk("text", t) for t in chunk_tokens(full, text, 128, 3)]
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
    assert "| full | 8/8 |" in cli.stdout and "| swapmoe | 2/8 |" in cli.stdout and "| static | 2/8 |" in cli.stdout


def test_eval_mixed_stream_interleaves_domains_and_reports_each(trained, tmp_path):
    from swapmoe_gguf.commands.evaluate import render, run_eval, stream_chunks
    from swapmoe_gguf.runtime import SwapMoELlama

    out = tmp_path / "m.gguf"
    convert(trained, out, "f16", progress=False)
    texts = {p.stem: p.read_text() for p in sorted((trained / "heldout").iterdir())}
    full = SwapMoELlama(str(out), policy="full", n_ctx=72, n_batch=64, n_threads=2)
    try:
        stream = stream_chunks(full, texts, 64, 8, switch_every=2)
    finally:
        full.close()
    assert [c.domain for c in stream] == ["python", "python", "tinyshakespeare-head", "tinyshakespeare-head"] * 2
    assert all(len(c.tokens) == 64 for c in stream) and len({tuple(c.tokens) for c in stream}) == 8
    res = run_eval(str(out), texts, policies=["static", "exact"], experts_per_layer=2, memory_budget=None,
                   ctx=64, chunks=8, switch_every=2)
    by = {r.policy: r for r in res}
    for r in res:
        assert [d.domain for d in r.domains] == ["python", "tinyshakespeare-head"]
        assert sum(d.chunks for d in r.domains) == r.chunks == 8
        # the stream's perplexity is the geometric mean of the domains' (equal token counts)
        assert r.ppl == pytest.approx(float(np.sqrt(np.prod([d.ppl for d in r.domains]))), rel=1e-6)
    assert by["exact"].kl < 1e-3 and all(d.kl < 1e-3 for d in by["exact"].domains)
    assert by["static"].kl > by["exact"].kl
    table = render(res)
    assert "per domain" in table and "| static | 2/8 |" in table
    cli = run_cli("eval", "-m", str(out), *sum((["--text", str(p)] for p in sorted((trained / "heldout").iterdir())), []),
                  "--experts-per-layer", "2", "-c", "64", "--chunks", "4", "--switch-every", "1")
    assert cli.returncode == 0, cli.stderr
    assert "per domain" in cli.stdout and "tinyshakespeare-head" in cli.stdout
    short = tmp_path / "short.txt"
    short.write_text("too short")
    for args, needle in ((["--text", str(short), "--text", str(TEXT)], "short has "),
                         (["--text", str(tmp_path / "missing.txt")], "missing.txt: cannot read"),
                         (["--switch-every", "0"], "--switch-every must be at least 1")):
        bad = run_cli("eval", "-m", str(out), *args, "--experts-per-layer", "2", "-c", "64", "--chunks", "2")
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and needle in lines[0], bad.stderr
