"""How the runtime does on every architecture of the zoo (tests/zoo.py): a markdown matrix.

For each recipe: llama.cpp's own converter writes a tiny random MoE GGUF; stock llama-cpp-python
runs it; `swapmoe convert` re-lays it out; SwapMoELlama `full` must equal stock bit for bit,
`exact` (4 of 8 experts per layer; a prompt in one graph with its missing experts computed outside it, or
micro-batches of S // k tokens where that FFN is not reproduced) must match stock decoded one token at a time, and `swapmoe` /
`static` at 4 experts per layer must run and give finite logits. Each run is its own process
(llama.cpp may abort on what it does not support).

    python bench/arch_matrix.py [NAME ...] [--out docs/architectures.md] [--json matrix.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import zoo  # noqa: E402


# What a reader of the table needs to know: recipe adjustments (the checkpoint's own config.json carries
# keys transformers' config classes do not write) and, for failures, the cause in llama.cpp's terms
# (file:line of the llama.cpp that llama-cpp-python 0.3.36 vendors).
NOTES = {
    "deepseek-v3": "config.json gets `scoring_func: sigmoid`, `topk_method: noaux_tc` as DeepSeek-V3's own: "
                   "without them the converter writes no `expert_gating_func` and llama.cpp's DEEPSEEK2 loader "
                   "falls back to softmax (the model would silently not be sigmoid-gated).",
    "dots1": "config.json gets `scoring_func: sigmoid`; without `expert_gating_func` llama.cpp aborts in "
             "build_moe_ffn (`llama-graph.cpp:2072: fatal error`, gating NONE).",
    "minimax-m2": "config.json gets `scoring_func: sigmoid`, `rotary_dim` (same abort as dots1 without it).",
    "exaone-moe": "config.json gets `scoring_func: sigmoid` (llama.cpp requires `expert_gating_func` for EXAONE_MOE).",
    "granite-hybrid": "config.json `layer_types` rewritten to `mamba`/`attention` (IBM's names): transformers 5 "
                      "saves `linear_attention`/`full_attention`, which the converter does not recognise, so it "
                      "marks every layer SSM and llama.cpp then fails `tensor 'blk.1.ssm_in.weight' not found`.",
    "hunyuan-moe": "config.json gets Tencent's per-layer lists (`moe_topk`, `moe_intermediate_size`, "
                   "`num_shared_expert`); with transformers' ints the converter fails `TypeError: 'int' object is "
                   "not iterable`.",
    "glm4moe-lite": "config.json gets `first_k_dense_replace: 1` (transformers writes `mlp_layer_types`); "
                    "otherwise llama.cpp: `tensor 'blk.0.ffn_gate_inp.weight' not found`.",
    "qwen3.5-moe": "rope `mrope_section` [3,3,2] so the sections fit 16 rotated dims; the converter's default "
                   "[11,11,10] aborts ggml (`ops.cpp:6232: GGML_ASSERT(sect_dims <= ne0)`).",
    "kimi-linear": "converter needs Moonshot's own config (`linear_attn_config`), which transformers' "
                   "KimiLinearConfig does not write; a dense first layer is also saved as `block_sparse_moe.*`, "
                   "which the converter cannot map. Not pursued.",
    "glm4moe-mtp-decl": "GLM-4.5's config.json declares `num_nextn_predict_layers: 1`, so the GGUF says "
                        "`nextn_predict_layers=1`, `block_count=4` (trunk only here; real GLM-4.5 GGUFs also carry "
                        "the MTP weights). glm4-moe.cpp:34-39 marks the MTP block's tensors TENSOR_SKIP when "
                        "`!ml.load_mtp`; the virtual path of create_tensor (llama-model-loader.cpp:1292, "
                        "`files.empty()`) only honours TENSOR_SKIP_IF_VIRTUAL, so buft_for_tensor returns null "
                        "for SKIP (:1178) and `GGML_ASSERT(buft != nullptr)` (:1329) aborts. Same code in "
                        "deepseek2.cpp:61-66, mimo2.cpp:28-35, qwen3next.cpp:40, qwen35moe.cpp:41: real "
                        "DeepSeek-V3/GLM-4.5/Qwen3-Next GGUFs with MTP layers would abort the same way. Fixed "
                        "(vmodel.py): the slot model is built trunk-only, `<arch>.nextn_predict_layers = 0`, "
                        "`block_count -= n_nextn`, per-layer arrays cut (decoding never uses the MTP blocks).",
    "mimo-v2-flash": "config.json gets Xiaomi's keys (`hybrid_layer_pattern`, `swa_*`, `topk_method`, flat "
                     "`rope_parameters`); the converter hard-codes 3 MTP layers (`_n_nextn = 3`, mimo.py) so "
                     "the GGUF declares `nextn_predict_layers=3`: stock skips them. Built trunk-only (see "
                     "glm4moe-mtp-decl). Its graph reads `attn_sinks` when the tensor exists; the file has none "
                     "and `llama_model_init_from_user` creates it, so it ran only since absent tensors are "
                     "unlinked again (absent.py): the pointer is NULL, as in stock.",
    "deepseek-v3.2": "`index_head_dim` 64 (32 made stock llama.cpp abort: `ggml.c:3354: GGML_ASSERT(ggml_can_mul_mat(a, b))`).",
    "jamba": "jamba.cpp:88 creates `ffn_gate_inp` with TENSOR_NOT_REQUIRED and picks MoE vs dense per layer by its "
             "presence (jamba.cpp:90, :152) while loading. `llama_model_init_from_user` creates every optional "
             "tensor (llama-model-loader.cpp: it returns null only for a dimension <= 0), so the dense layers 0 and "
             "2 are built as MoE layers and their dense FFN weights are never created; unlinking the absent router "
             "afterwards (absent.py) cannot change what was built. Refused at build: llama.cpp did not create "
             "tensors the file has.",
    "nemotron-h": "nemotron-h.cpp:122-123 creates `ffn_latent_down`/`ffn_latent_up` (TENSOR_NOT_REQUIRED, "
                  "{n_embd, n_embd} when `moe_latent_size` is 0) and the graph multiplies by them when present "
                  "(nemotron-h.cpp:295, :320). With init_from_user they always exist; an identity matrix is the "
                  "neutral value (exact in F32, two extra n_embd x n_embd matmuls per MoE layer). Checked by hand: "
                  "this file plus F32 identity `ffn_latent_down/up` gives stock logits identical to the "
                  "original's. The runtime fills them so (absent.py's neutral table) and then unlinks them: the "
                  "pointers are NULL again, as in stock, and the two matmuls are gone.",
}


def _maxdiff(a: list, b: list, last_only: bool = False) -> float:
    import numpy as np

    d = 0.0
    for x, y in zip(a, b):
        if last_only:
            x, y = x[-1:], y[-1:]
        if x.shape != y.shape:
            return float("inf")
        d = max(d, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
    return d


def run_one(name: str, work: Path) -> dict:
    import numpy as np

    row: dict = {"arch": name, "what": zoo.RECIPES[name].what, "converts": False, "stock": None, "relayout": None,
                 "full": None, "full_diff": None, "exact": None, "exact_diff": None, "exact_last_diff": None,
                 "swapmoe": None, "static": None, "error": "", "errors": {}}

    def fail(stage: str, line: str) -> None:
        line = re.sub(r"/\S+/([^/\s]+\.gguf)", r"\1", line)  # cache paths say nothing
        row["errors"][stage] = line
        if not row["error"]:
            row["error"] = f"{stage}: {line}"

    t0 = time.time()
    try:
        src = zoo.build(name)
        row["converts"] = True
    except zoo.ZooError as e:
        fail(e.stage, e.line)
        return row
    stock = zoo.probe("stock", src, work / f"{name}-stock.npz")
    row["stock"] = stock["ok"]
    if not stock["ok"]:
        fail("stock", stock["error"])
    try:
        dst = zoo.relayout(src)
        row["relayout"] = True
    except zoo.ZooError as e:
        row["relayout"] = False
        fail("relayout", e.line)
        return row
    full = zoo.probe("full", dst, work / f"{name}-full.npz")
    row["full"] = full["ok"]
    if not full["ok"]:
        fail("full", full["error"])
    elif stock["ok"]:
        row["full_diff"] = _maxdiff(full["logits"], stock["logits"])
    stock1 = zoo.probe("stock", src, work / f"{name}-stock1.npz", n_batch=1) if stock["ok"] else None
    exact = zoo.probe("exact", dst, work / f"{name}-exact.npz")
    row["exact"] = exact["ok"]
    if not exact["ok"]:
        fail("exact", exact["error"])
    elif stock1 and stock1["ok"]:
        row["exact_diff"] = _maxdiff(exact["logits"], stock1["logits"])
        row["exact_last_diff"] = _maxdiff(exact["logits"], stock1["logits"], last_only=True)
        row["exact_info"] = exact["info"]
    for pol in ("swapmoe", "static"):
        r = zoo.probe(pol, dst, work / f"{name}-{pol}.npz")
        finite = r["ok"] and all(bool(np.isfinite(x).all()) for x in r["logits"])
        row[pol] = finite
        if not r["ok"]:
            fail(pol, r["error"])
        elif not finite:
            fail(pol, "non-finite logits")
    row["seconds"] = round(time.time() - t0, 1)
    return row


def _cell(v: object) -> str:
    return {True: "yes", False: "**no**", None: "–"}.get(v, str(v)) if isinstance(v, (bool, type(None))) else str(v)


def _diff(ok: object, d: float | None) -> str:
    if not ok:
        return _cell(ok)
    if d is None:
        return "ran (no stock)"
    return ("yes (0)" if d == 0 else f"**no** ({d:.3g})")


def table(rows: list[dict]) -> str:
    out = ["| arch | converts | stock runs | full bit-exact (max diff) | exact max diff (last token) | "
           "swapmoe / static run | first error |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["exact"] and r["exact_diff"] is not None:
            how = "one graph" if r.get("exact_info", {}).get("streams") else "S // k"
            ex = f"{r['exact_diff']:.3g} ({r['exact_last_diff']:.3g}), {how}"
        else:
            ex = _cell(r["exact"])
        sw = f"{_cell(r['swapmoe'])} / {_cell(r['static'])}"
        err = r["error"].replace("|", "\\|")
        out.append(f"| {r['arch']} | {_cell(r['converts'])} | {_cell(r['stock'])} | {_diff(r['full'], r['full_diff'])}"
                   f" | {ex} | {sw} | {err} |")
    return "\n".join(out)


def write_doc(path: Path, rows: list[dict]) -> None:
    import torch
    import transformers

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, " \
              f"Python {platform.python_version()}"
    recipes = "\n".join(f"| {n} | `{r.model}` | {r.what} |" for n, r in zoo.RECIPES.items() if n in {x['arch'] for x in rows})
    details = []
    for r in rows:
        by_line: dict[str, list[str]] = {}
        for stage, line in r["errors"].items():
            by_line.setdefault(line, []).append(stage)
        for line, stages in by_line.items():
            details.append(f"* **{r['arch']}** / {', '.join(stages)}: `{line}`")
    notes = "\n".join(f"* **{n}**: {t}" for n, t in NOTES.items() if n in {x["arch"] for x in rows})
    text = f"""# Architectures: llama.cpp's own conversions on this runtime

Measured {now} on {machine}; llama-cpp-python {zoo.LLAMA_CPP_PYTHON} (CPU build), transformers
{transformers.__version__}, torch {torch.__version__}. Regenerate with `python bench/arch_matrix.py`.

Every model is a tiny random checkpoint (hidden 64, 2-4 layers, 8 experts, top-2, float32) built with
transformers' own classes and converted to F32 GGUF by `convert_hf_to_gguf.py` of the llama.cpp that
llama-cpp-python {zoo.LLAMA_CPP_PYTHON} vendors (tests/zoo.py; the sentencepiece vocab path with
`tests/data/tok512.model` for every architecture). Norms, biases, sinks and correction biases are moved
away from their initial values and routers scaled by 4, so their handling is really exercised.

Columns: *stock runs*: `llama_cpp.Llama` on the converted file; *full bit-exact*: `SwapMoELlama(policy="full")`
on the `swapmoe convert` re-layout vs stock, all positions of {len(zoo.PROMPTS)} prompts (max |diff|);
*exact*: `policy="exact"` with {zoo.EXPERTS_PER_LAYER} of 8 experts per layer vs stock decoding one
token at a time (n_batch=1) while `exact` runs each prompt in one graph, its missing experts computed
outside it (*one graph*), or, where `expert_compute.py` does not reproduce the expert FFN, in
micro-batches of S // k = 2 tokens (*S // k*), so the diff is float rounding of routing weights and
batch sizes; max |diff| over all positions (last token in brackets); *swapmoe / static*:
{zoo.EXPERTS_PER_LAYER} experts per layer, the run finishes with finite logits.

{table(rows)}

## Errors

{chr(10).join(details) if details else "none"}

## Notes (recipe adjustments, causes of failures)

{notes or "none"}

## Recipes

| recipe | HF class | what it exercises |
|---|---|---|
{recipes}
"""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="recipes (default: all)")
    ap.add_argument("--out", default=str(REPO / "docs" / "architectures.md"), help="markdown file ('' = none)")
    ap.add_argument("--json", default="", help="also write the rows as JSON")
    a = ap.parse_args()
    names = a.names or list(zoo.RECIPES)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for n in names:
            print(f"[{n}] ...", file=sys.stderr, flush=True)
            row = run_one(n, Path(work))
            print(f"[{n}] {row['error'] or 'ok'} ({row.get('seconds', '?')} s)", file=sys.stderr, flush=True)
            rows.append(row)
    print(table(rows))
    if a.out:
        write_doc(Path(a.out), rows)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
