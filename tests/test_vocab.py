"""Tokenizer conversion: llama.cpp tokenizes like the source tokenizer (BPE and sentencepiece)."""
from __future__ import annotations

import numpy as np

from conftest import PROMPTS, hf_logits, llama_logits, make_hf_model
from swapmoe_gguf.converters import convert
from swapmoe_gguf.fileformat.reader import read_gguf


def _llama_tokenize(path, text: str, add_bos: bool) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False, vocab_only=True)
    try:
        return llm.tokenize(text.encode(), add_bos=add_bos, special=False)
    finally:
        llm.close()


def test_bpe_tokenizer_matches_hf(hf_models, tmp_path):
    from transformers import AutoTokenizer

    for arch in ("qwen2moe", "olmoe"):
        out = tmp_path / f"{arch}.gguf"
        convert(hf_models[arch], out, "f16", progress=False)
        info = read_gguf(out)
        assert info.get("tokenizer.ggml.model") == "gpt2"
        assert info.get("tokenizer.ggml.pre") == "gpt-2"
        assert "messages" in info.get("tokenizer.chat_template")
        types, tokens = info.get("tokenizer.ggml.token_type"), info.get("tokenizer.ggml.tokens")
        assert types[tokens.index("</s>")] == 3 and types[tokens.index("<s>")] == 3  # CONTROL
        tok = AutoTokenizer.from_pretrained(hf_models[arch])
        for text in PROMPTS + ["  leading spaces\tand tabs\n\nnew lines 42!"]:
            assert _llama_tokenize(out, text, add_bos=False) == tok.encode(text, add_special_tokens=False), text


def test_sentencepiece_mixtral(tmp_path):
    """A Mixtral checkpoint with tokenizer.model (as published): tokens, scores and logits."""
    import sentencepiece as spm

    d = make_hf_model("mixtral", tmp_path / "spm", seed=7, spm=True)
    out = tmp_path / "spm.gguf"
    convert(d, out, "f32", progress=False)
    info = read_gguf(out)
    assert info.get("tokenizer.ggml.model") == "llama"
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    assert len(info.get("tokenizer.ggml.tokens")) == sp.vocab_size()
    for text in ("Once upon a time", "The little dog ran to the park."):
        assert _llama_tokenize(out, text, add_bos=True) == [sp.bos_id()] + sp.encode(text)
    toks = [[sp.bos_id()] + sp.encode("Once upon a time there was")]
    ref, got = hf_logits(d, toks)[0], llama_logits(out, toks)[0]
    assert np.abs(ref - got).max() <= 1e-3
