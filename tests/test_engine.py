"""The parallel generation engine (swapmoe_gguf/serving/engine.py) on a real model: slots batched into one
llama_decode give the same tokens as one request at a time, the prompt cache, stop words, grammars,
context shift, slot save/restore, the queue limit."""
from __future__ import annotations

import json

import pytest

from swapmoe_gguf.serving.engine import Done, Engine, EngineError, QueueFull, Request, SamplingParams, Token
from swapmoe_gguf.runtime import SwapMoELlama

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went", "One day, a girl"]


@pytest.fixture(scope="module")
def llm(stories_moe):
    m = SwapMoELlama(str(stories_moe), experts_per_layer=2, n_ctx=1024, n_batch=64, n_seq_max=4, verbose=False)
    yield m
    m.close()


@pytest.fixture()
def engine(llm):
    e = Engine(llm, 4, max_queue=2)
    yield e
    e.close()


def run(engine: Engine, req: Request) -> tuple[list[Token], Done]:
    evs = list(engine.submit(req).events())
    return [e for e in evs if isinstance(e, Token)], evs[-1]


def tok(llm, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    return llm.tokenize(text.encode(), add_bos=True, special=True)


def test_parallel_slots_equal_one_at_a_time(llm, engine):
    alone = [run(engine, Request(tok(llm, p), n_predict=24, sampling=GREEDY, cache_prompt=False))[1].text
             for p in PROMPTS]
    jobs = [engine.submit(Request(tok(llm, p), n_predict=24, sampling=GREEDY, cache_prompt=False)) for p in PROMPTS]
    together = [list(j.events())[-1] for j in jobs]
    assert [d.text for d in together] == alone
    assert len({d.slot for d in together}) == 4  # four sequences at once, one per slot
    assert engine.stats["busy_slots_sum"] / engine.stats["decode_calls"] > 1.5  # batched, not one by one
    # and the same as llama-cpp-python's own single-sequence generation
    ref = llm.create_completion(PROMPTS[0], max_tokens=24, temperature=0)["choices"][0]["text"]
    assert alone[0] == ref


def test_prompt_cache_reuses_the_common_prefix(llm, engine):
    prompt = tok(llm, "Once upon a time, in a big forest, there lived a small rabbit")
    _, first = run(engine, Request(prompt, n_predict=8, sampling=GREEDY, id_slot=1))
    _, again = run(engine, Request(prompt[:-2] + tok(llm, " fox")[1:], n_predict=8, sampling=GREEDY, id_slot=1))
    _, fresh = run(engine, Request(prompt[:-2] + tok(llm, " fox")[1:], n_predict=8, sampling=GREEDY,
                                   cache_prompt=False, id_slot=2))
    assert first.n_cached == 0 and again.n_cached == len(prompt) - 2
    assert again.timings["prompt_n"] == again.n_prompt - again.n_cached
    assert again.text == fresh.text  # reusing the cache changes nothing


def test_stop_word_is_held_back_and_cut(llm, engine):
    toks, full = run(engine, Request(tok(llm, PROMPTS[0]), n_predict=32, sampling=GREEDY))
    word = full.text[10:14]
    toks, d = run(engine, Request(tok(llm, PROMPTS[0]), n_predict=32, sampling=GREEDY, stop=[word]))
    assert d.stop_type == "word" and d.stopping_word == word and d.finish_reason == "stop"
    assert d.text == full.text[: full.text.index(word)]
    assert "".join(t.text for t in toks) == d.text  # the stream never showed the start of the stop word


def test_grammar_constrains_the_answer(llm, engine):
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    sp = SamplingParams(temperature=0.0, grammar=json_schema_to_gbnf(json.dumps(schema)))
    _, d = run(engine, Request(tok(llm, PROMPTS[1]), n_predict=64, sampling=sp))
    assert d.stop_type == "eos", d.text  # the grammar ended the object
    assert isinstance(json.loads(d.text)["n"], int)


def test_logprobs_are_the_models_distribution(llm, engine):
    sp = SamplingParams(temperature=0.0, n_probs=5)
    toks, d = run(engine, Request(tok(llm, PROMPTS[2]), n_predict=4, sampling=sp))
    for t in toks:
        assert t.top is not None and len(t.top) == 5
        assert t.top[0][0] == t.id and t.logprob == pytest.approx(t.top[0][1])  # greedy takes the top token
        assert all(a[1] >= b[1] for a, b in zip(t.top, t.top[1:])) and t.top[0][1] <= 0


def test_context_full_stops_or_shifts(llm):
    e = Engine(llm, 4)  # 256 tokens per slot
    try:
        _, d = run(e, Request(tok(llm, PROMPTS[0]), n_predict=-1, sampling=SamplingParams(temperature=1.0,
                                                                                            seed=3), ignore_eos=True))
        assert d.truncated and d.finish_reason == "length" and d.n_prompt + d.n_predicted == e.n_ctx_slot
        with pytest.raises(EngineError, match="exceeds the available context size"):
            e.submit(Request(list(range(1, 300))))
    finally:
        e.close()
    e = Engine(llm, 4, context_shift=True)
    try:
        _, d = run(e, Request(tok(llm, PROMPTS[0]), n_predict=400, sampling=SamplingParams(temperature=1.0, seed=3),
                              ignore_eos=True))
        assert d.truncated and d.n_predicted == 400  # went on past the slot's 256 tokens
    finally:
        e.close()


def test_slot_save_restore_erase(llm, engine, tmp_path):
    prompt = tok(llm, "What is the capital of France? The capital of France")
    _, d = run(engine, Request(prompt, n_predict=8, sampling=GREEDY, id_slot=1))
    n, size = engine.save_slot(1, str(tmp_path / "s1.bin"))
    assert n == len(prompt) + 8 - 1 and size > 0
    assert engine.restore_slot(0, str(tmp_path / "s1.bin"))[0] == n
    _, d0 = run(engine, Request(prompt, n_predict=8, sampling=GREEDY, id_slot=0))
    assert d0.n_cached == len(prompt) - 1 and d0.text == d.text  # the restored cache is used and right
    assert engine.erase_slot(0) > 0
    _, d0 = run(engine, Request(prompt, n_predict=8, sampling=GREEDY, id_slot=0))
    assert d0.n_cached == 0
    (tmp_path / "junk.bin").write_bytes(b"not a slot")
    with pytest.raises(EngineError, match="could not restore"):
        engine.restore_slot(3, str(tmp_path / "junk.bin"))


def test_queue_limit_and_cancel(llm, engine):
    long = Request(tok(llm, PROMPTS[0]), n_predict=200, sampling=GREEDY, ignore_eos=True)
    jobs = [engine.submit(long) for _ in range(6)]  # 4 slots + 2 waiting
    with pytest.raises(QueueFull):
        engine.submit(long)
    for j in jobs:
        j.cancel()
    for _ in range(200):  # cancelled requests free their slots at the next step
        if engine.n_busy == 0 and engine.n_waiting == 0:
            break
        import time

        time.sleep(0.01)
    assert engine.n_busy == 0
    assert run(engine, Request(tok(llm, PROMPTS[3]), n_predict=4, sampling=GREEDY))[1].n_predicted == 4


def test_exact_policy_with_parallel_slots_is_lossless(tiny_gguf):
    """`exact` under -np 2: each slot's tokens get the full model's experts even when the two
    sequences want different ones in the same batch (the union is scored, misses loaded)."""
    prompts = ["The quick brown fox", "Numbers like 12345"]
    full = SwapMoELlama(tiny_gguf, policy="full", n_ctx=512, verbose=False)
    try:
        ref = [full.create_completion(p, max_tokens=12, temperature=0)["choices"][0]["text"] for p in prompts]
    finally:
        full.close()
    ex = SwapMoELlama(tiny_gguf, policy="exact", experts_per_layer=4, n_ctx=512, n_seq_max=2, verbose=False)
    e = Engine(ex, 2)
    try:
        jobs = [e.submit(Request(tok(ex, p), n_predict=12, sampling=GREEDY)) for p in prompts]
        got = [list(j.events())[-1] for j in jobs]
        assert [d.text.replace("\ufffd", "") for d in got] == [r.replace("\ufffd", "") for r in ref]
        assert ex.telemetry().swaps > 0  # the two sequences' experts did not all fit at once
    finally:
        e.close()
        ex.close()
