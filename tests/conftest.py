"""Shared fixtures: tiny real MoE checkpoints built offline with transformers, and references.

Every model here is made in the test session (transformers' config classes + save_pretrained,
a byte-level BPE tokenizer trained with `tokenizers`); nothing is downloaded.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"  # small licensed files the tests need (see tests/data/README.md)
STORIES_DENSE = DATA / "stories260K.gguf"
TOK512 = DATA / "tok512.model"
SHAKESPEARE = DATA / "tinyshakespeare-head.txt"

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
    "Experts route tokens; the router picks two of many experts for every token in the batch. "
    "Numbers like 12345 and 2024 appear too, with punctuation!? and newlines.\n"
)

# Small dimensions that every output type can encode (rows are multiples of 32).
ARCH_CONFIGS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                             intermediate_size=128)),
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                                intermediate_size=128, moe_intermediate_size=64,
                                                                shared_expert_intermediate_size=128)),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                                intermediate_size=128, moe_intermediate_size=64,
                                                                head_dim=32, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, intermediate_size=64,
                                                      num_key_value_heads=4)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                                     intermediate_size=64, embedding_multiplier=2.0,
                                                                     residual_multiplier=0.5, logits_scaling=2.0,
                                                                     attention_multiplier=0.2)),
}

PROMPTS = [
    "The quick brown fox",
    "To be, or not to be, that is",
    "Experts route tokens; the router picks",
    "Numbers like 12345 appear",
]


def train_tokenizer(directory: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([_CORPUS] * 4, vocab_size=400, min_frequency=1, special_tokens=["<s>", "</s>"],
                            show_progress=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    fast.save_pretrained(directory)


def make_hf_model(arch: str, directory: Path, seed: int = 0, layers: int = 2, spm: bool = False) -> Path:
    """A random tiny model of `arch`; `spm` ships karpathy's 512-token sentencepiece model instead of BPE."""
    import shutil

    import torch
    import transformers

    cfg_name, model_name, extra = ARCH_CONFIGS[arch]
    directory.mkdir(parents=True, exist_ok=True)
    if spm:
        shutil.copy(TOK512, directory / "tokenizer.model")
        n_vocab = 512
    else:
        train_tokenizer(directory)
        from transformers import AutoTokenizer

        n_vocab = len(AutoTokenizer.from_pretrained(directory))
    cfg = getattr(transformers, cfg_name)(
        **{"vocab_size": n_vocab, "hidden_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 256, "initializer_range": 0.2,
           "tie_word_embeddings": False, "bos_token_id": 1 if spm else n_vocab - 2,
           "eos_token_id": 2 if spm else n_vocab - 1,
           "pad_token_id": None, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).float().eval()
    with torch.no_grad():  # norms at 1 +- noise so that they matter but do not blow up
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "router.layer.weight")):
                p.mul_(4.0)  # decisive routing: top-k margins well above quantization noise
    model.save_pretrained(directory)
    return directory


def hf_logits(directory: Path, token_lists: list[list[int]]) -> list[np.ndarray]:
    """Last-token logits of transformers' float32 forward."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for toks in token_lists:
            out.append(model(torch.tensor([toks])).logits[0, -1].numpy().astype(np.float64))
    return out


def llama_logits(gguf_path: Path, token_lists: list[list[int]]) -> list[np.ndarray]:
    """Last-token logits of stock llama.cpp (llama-cpp-python) loading the file itself."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), n_ctx=256, n_batch=256, n_threads=2, verbose=False, seed=0,
                          logits_all=True, type_k=0, type_v=0)  # F32 KV cache: no f16 rounding there
    out = []
    for toks in token_lists:
        llm.reset()
        llm.eval(toks)
        out.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64))
    llm.close()
    return out


def hf_tokens(directory: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    return [tok.encode(p) for p in PROMPTS]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "swapmoe_gguf", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {arch: make_hf_model(arch, root / arch, seed=i) for i, arch in enumerate(ARCH_CONFIGS)}


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 8-expert Mixtral (hidden 256, experts of 512, 4 layers) as a swap-ready Q8_0 GGUF."""
    from swapmoe_gguf.converters import convert
    from swapmoe_gguf.converters.tiny_checkpoint import write_tiny_mixtral

    root = tmp_path_factory.mktemp("tiny")
    out = root / "m.gguf"
    convert(write_tiny_mixtral(root / "hf", hidden=256, ffn=512, layers=4, experts=8, heads=8, kv_heads=4), out,
            "q8_0", progress=False)
    return str(out)


def make_stories_moe(dense: Path, out: Path, n_expert: int = 4, n_used: int = 2, seed: int = 0) -> Path:
    """stories260K as a Mixtral-style MoE GGUF: every expert a copy of the dense FFN, a seeded random
    router (N(0, 0.02)), so greedy output equals the dense model's whatever the routing. Written with
    gguf-py; non-FFN tensors first, then per layer router, gate, up, down (llama.cpp's own order)."""
    import gguf

    r = gguf.GGUFReader(dense)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(out, arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), f.types[0], f.types[-1])
        else:
            w.add_key_value(key, f.contents(), f.types[0])
    w.add_expert_count(n_expert)
    w.add_expert_used_count(n_used)
    ffn = {t.name: t for t in r.tensors if t.name.split(".")[-2] in ("ffn_gate", "ffn_up", "ffn_down")}
    for t in r.tensors:
        if t.name not in ffn:
            w.add_tensor(t.name, np.array(t.data))
    rng = np.random.default_rng(seed)
    n_embd = int(r.fields[f"{arch}.embedding_length"].contents())
    for il in range(int(r.fields[f"{arch}.block_count"].contents())):
        w.add_tensor(f"blk.{il}.ffn_gate_inp.weight", (0.02 * rng.standard_normal((n_expert, n_embd))).astype(np.float32))
        for kind in ("gate", "up", "down"):
            dense_w = np.array(ffn[f"blk.{il}.ffn_{kind}.weight"].data)       # [n_out, n_in]
            w.add_tensor(f"blk.{il}.ffn_{kind}_exps.weight", np.stack([dense_w] * n_expert))  # [n_expert, n_out, n_in]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="session")
def stories_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama.cpp MoE GGUF (not swap-ready) built from the shipped dense stories260K."""
    return make_stories_moe(STORIES_DENSE, tmp_path_factory.mktemp("stories") / "stories260K-moe-copy4x2.gguf")


class Serving:
    """`swapmoe serve` in a subprocess on a free loopback port, ready when /health answers."""

    def __init__(self, model: str, *args: str, ctx: int = 512, env: dict[str, str] | None = None):
        import socket
        import time

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "swapmoe_gguf", "serve", "-m", model, "--port",
                                      str(self.port), "-c", str(ctx), "-t", "1", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if http("GET", self.url + "/health", timeout=1).status == 200:
                    return
            except OSError:
                time.sleep(0.1)
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read())
        self.stop()
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class HTTPResult:
    """A finished HTTP exchange (stdlib only), with the handful of accessors the tests need."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.content = status, headers, body

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self):  # type: ignore[no-untyped-def]
        import json

        return json.loads(self.content)


def http(method: str, url: str, *, json=None, content: bytes | None = None, headers: dict | None = None,  # type: ignore[no-untyped-def]
         timeout: float = 30, stream: bool = False):
    """One request with http.client. With stream=True, returns the open response (iterate its lines)."""
    import http.client
    import json as _json
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    body = _json.dumps(json).encode() if json is not None else content
    hdrs = {"content-type": "application/json", **(headers or {})} if body is not None else dict(headers or {})
    conn.request(method, u.path or "/", body=body, headers=hdrs)
    resp = conn.getresponse()
    if stream:
        resp.conn_ref = conn  # keep the connection; closing the response hangs up
        return resp
    data = resp.read()
    conn.close()
    return HTTPResult(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
