"""Tokenizer files of an HF checkpoint -> GGUF tokenizer metadata, via gguf-py's vocab helpers.

Supported: sentencepiece (`tokenizer.model`, llama.cpp model "llama"), byte-level BPE
(`tokenizer.json`, model "gpt2") and HF's llama-style byte-fallback BPE (model "llama").
llama.cpp identifies a BPE pre-tokenizer by name (`tokenizer.ggml.pre`); we read it off the
split regex in tokenizer.json rather than hashing sample encodings as llama.cpp's script does.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, TokenType
from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab, SpecialVocab

from ..base.errors import ConvertError

log = logging.getLogger(__name__)

# Split regexes of well-known BPE pre-tokenizers -> llama.cpp's name for them.
_PRE_BY_REGEX = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": "gpt-2",
}


def _bpe_pre(tokenizer_json: dict[str, Any]) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Split":
            regex = (step.get("pattern") or {}).get("Regex")
            if regex in _PRE_BY_REGEX:
                return _PRE_BY_REGEX[regex]
            log.warning("unknown BPE split regex; llama.cpp will use its default pre-tokenizer: %r", regex)
            return "default"
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            return "gpt-2"  # ByteLevel's built-in regex is GPT-2's
    return "default"


def add_vocab(gw: GGUFWriter, directory: Path, n_vocab: int) -> str:
    """Write tokenizer keys; returns the tokenizer model name. Pads to the model's vocab size."""
    tj_path = directory / "tokenizer.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8")) if tj_path.is_file() else None
    try:
        if (directory / "tokenizer.model").is_file():
            vocab: Any = SentencePieceVocab(directory)
            pre = "default"
        elif tj is not None and tj.get("model", {}).get("type") == "BPE" and tj["model"].get("byte_fallback"):
            vocab, pre = LlamaHfVocab(directory), "default"
        elif tj is not None:
            vocab, pre = BpeVocab(directory), _bpe_pre(tj)
        else:
            raise ConvertError(f"{directory}: no tokenizer.json or tokenizer.model")
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ConvertError(f"{directory}: unsupported tokenizer ({e})") from None
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    if tj is not None:  # mark the tokenizer's special added tokens as control tokens
        index = {t if isinstance(t, bytes) else t.encode("utf-8"): i for i, t in enumerate(tokens)}
        for added in tj.get("added_tokens", []):
            i = index.get(added["content"].encode("utf-8"))
            if i is not None:
                types[i] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    if len(tokens) > n_vocab:
        raise ConvertError(f"{directory}: tokenizer has {len(tokens)} tokens, config vocab_size is {n_vocab}")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)
    gw.add_tokenizer_model(vocab.tokenizer_model)
    gw.add_tokenizer_pre(pre)
    gw.add_token_list(tokens)
    gw.add_token_scores(scores)
    gw.add_token_types(types)
    SpecialVocab(directory, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens)).add_to_gguf(gw, quiet=True)
    return vocab.tokenizer_model
