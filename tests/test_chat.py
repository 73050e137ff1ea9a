"""`swapmoe chat`: one-shot (-p, stdin, --raw) and interactive through a pseudo-terminal."""
from __future__ import annotations

import sys

import pexpect
import pytest

from conftest import run_cli


@pytest.fixture(scope="module")
def model(tiny_gguf) -> str:
    return tiny_gguf


def test_one_shot_prompt_prints_answer_and_status(model):
    r = run_cli("chat", "-m", model, "--experts-per-layer", "3", "-p", "the expert", "-n", "12", "--temp", "0",
                "-c", "512")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    status = [l for l in r.stderr.splitlines() if l.startswith("[")]
    assert status and "tok/s" in status[-1] and "3/8 experts/layer" in status[-1] and "hit" in status[-1]


def test_model_without_chat_template_continues_the_text(stories_moe):
    from swapmoe_gguf.fileformat.reader import read_gguf

    assert read_gguf(stories_moe).get("tokenizer.chat_template") is None
    r = run_cli("chat", "-m", str(stories_moe), "-p", "Once upon a time", "--temp", "0")
    assert r.returncode == 0, r.stderr
    # said once; the text is continued, not wrapped in a chat format the model never saw; 256 tokens by default
    assert r.stderr.count("no chat template") == 1 and "[256 tok," in r.stderr
    assert r.stdout.strip()


def test_context_defaults_to_the_training_context(model, tmp_path):
    from swapmoe_gguf.fileformat.reader import read_gguf
    from swapmoe_gguf.serving.settings import DEFAULT_CTX, ModelSettings, default_ctx

    trained = read_gguf(model).params.n_ctx_train
    assert default_ctx(model) == min(DEFAULT_CTX, trained)
    llm = ModelSettings(model=model, experts_per_layer=3).load()
    try:
        assert llm.n_ctx() == min(DEFAULT_CTX, trained)
    finally:
        llm.close()
    assert default_ctx(str(tmp_path / "missing.gguf")) == DEFAULT_CTX


def test_raw_prints_only_generated_text_and_matches_api(model):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "swapmoe_gguf", "chat", "-m", model, "--raw", "-n", "10", "--temp", "0",
                        "-c", "512", "--policy", "full"], input="the river ran", capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    from swapmoe_gguf.runtime import SwapMoELlama

    llm = SwapMoELlama(model, policy="full", n_ctx=512, n_threads=1)
    try:
        # streamed, as the CLI does (random weights emit broken UTF-8, which streaming drops the same way)
        ref = "".join(c["choices"][0]["text"] for c in
                      llm.create_completion("the river ran", max_tokens=10, temperature=0.0, stream=True))
    finally:
        llm.close()
    assert r.stdout == ref + "\n"
    assert "tok/s" not in r.stdout


def test_no_prompt_on_empty_stdin_is_a_clean_error(model):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "swapmoe_gguf", "chat", "-m", model], input="", capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("swapmoe: error: no prompt")


def _chat_terminal(model: str, *args: str, timeout: int = 60) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "swapmoe_gguf", "chat", "-m", model, *args], encoding="utf-8",
                         timeout=timeout)


def test_interactive_session_in_a_terminal(model):
    child = _chat_terminal(model, "--experts-per-layer", "3", "--temp", "0", "-c", "1024", "-n", "12")
    try:
        child.expect("> ")
        child.sendline("hello there")
        child.expect(r"\[\d+ tok, [\d.]+ tok/s")   # the answer's status line
        child.expect("> ")
        child.sendline("/stats")
        child.expect("experts resident per layer")
        child.expect("> ")
        child.sendline("/budget 100%")
        child.expect(r"8 of 8 experts per layer, policy full")
        child.expect("> ")
        child.sendline("/budget nonsense")
        child.expect("budget unchanged")
        child.expect("> ")
        child.sendline("/reset")
        child.expect("conversation reset")
        child.expect("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_an_answer_not_the_chat(model):
    child = _chat_terminal(model, "--temp", "1.0", "-c", "4096", "-n", "3500", "-s", "3", "--ignore-eos", timeout=90)
    try:
        child.expect("> ")
        child.sendline("tell me everything")
        import time

        time.sleep(1.0)  # 3500 tokens without end-of-text: the answer is still streaming
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.expect("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_n_predict_is_exact_inside_a_utf8_character(model):
    """-n counts tokens as llama-cli does, also while the text ends inside a UTF-8 character (where
    llama-cpp-python's own max_tokens test is skipped): a bias forcing a 3-byte lead byte forever."""
    from swapmoe_gguf.serving.generate import stream
    from swapmoe_gguf.runtime import SwapMoELlama
    from swapmoe_gguf.serving.settings import SamplingSettings

    llm = SwapMoELlama(model, policy="static", experts_per_layer=3, n_ctx=256, n_threads=1, verbose=False)
    try:
        lead = next(i for i in range(llm.n_vocab()) if llm.detokenize([i]) == b"\xe2")
        recs = list(stream(llm, prompt="tell me", sampling=SamplingSettings(n_predict=10, temp=0.0),
                           logit_bias={lead: 100.0}))
    finally:
        llm.close()
    assert recs[-1].finish_reason == "length" and recs[-1].n_generated == 10
