"""The quality floor (`--max-dropped-mass`) between `swapmoe` and `exact`, and `exact` prompts in
micro-batches of S // k tokens, on the embedded default model (32 experts, top-4)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from swapmoe_gguf.demo import default_model, shipped_heldout
from swapmoe_gguf.errors import SwapMoEError
from swapmoe_gguf.evaluate import read_texts, run_eval
from swapmoe_gguf.runtime import SwapMoELlama
from swapmoe_gguf.scheduler import SchedulerConfig

KW = dict(n_ctx=256, n_threads=2, verbose=False, seed=1)


@pytest.fixture(scope="module")
def model() -> str:
    return str(default_model())


def test_floor_sits_between_swapmoe_and_exact(model):
    texts = read_texts([str(p) for p in shipped_heldout()])
    res = run_eval(model, texts, policies=["swapmoe", "exact"], experts_per_layer=16, memory_budget=None,
                   ctx=128, chunks=4, floors=(0.3,), switch_every=1)
    by = {r.label: r for r in res}
    assert set(by) == {"full", "swapmoe", "swapmoe (floor 0.3)", "exact"}
    swap, floor, exact = by["swapmoe"], by["swapmoe (floor 0.3)"], by["exact"]
    assert exact.kl < 1e-3
    # measured on this stream (128-token chunks): KL 0.173 -> 0.069; the floor loads what it needs
    assert exact.kl < floor.kl < 0.6 * swap.kl and floor.swaps > swap.swaps
    assert floor.ppl < swap.ppl


def test_floor_ends_are_swapmoe_and_exact(model):
    lossless = SwapMoELlama(model, experts_per_layer=16, max_dropped_mass=0.0, **KW)
    plain = SwapMoELlama(model, experts_per_layer=16, max_dropped_mass=1.0, **KW)
    try:
        assert lossless.policy_name == "exact" and plain.policy.floor is None
    finally:
        lossless.close()
        plain.close()
    for bad in (-0.1, 1.5):
        with pytest.raises(SwapMoEError, match="between 0 and 1"):
            SwapMoELlama(model, experts_per_layer=16, max_dropped_mass=bad, **KW)
    with pytest.raises(SwapMoEError, match="policy that swaps"):
        SwapMoELlama(model, policy="static", experts_per_layer=16, max_dropped_mass=0.5, **KW)


def test_exact_prompt_in_micro_batches_equals_full(model):
    """S = 16 of 32, top-4: `exact` prefills 4 tokens per graph (their experts always fit) and equals
    `full` at the same micro-batch."""
    prompt = list(range(40, 72))
    full = SwapMoELlama(model, policy="full", n_ubatch=4, logits_all=True, **KW)
    exact = SwapMoELlama(model, policy="exact", experts_per_layer=16, logits_all=True, **KW)
    try:
        assert exact.context_params.n_ubatch == 4
        full.eval(prompt)
        exact.eval(prompt)
        a, b = np.array(full.scores[: len(prompt)]), np.array(exact.scores[: len(prompt)])
        assert np.abs(a - b).max() <= 1e-3 * max(1.0, np.abs(a).max())
        assert exact.telemetry().swaps > 0 and exact.policy.overflows == 0
    finally:
        exact.close()
        full.close()


def test_floor_reads_never_wait_for_pending_swaps(model):
    """The floor reads on the decoding thread while the scheduler's background reads hold every
    staging buffer until the next step commits them: it has a buffer of its own (no deadlock)."""
    llm = SwapMoELlama(model, experts_per_layer=4, max_dropped_mass=0.2, staging_buffers=1,
                       scheduler=SchedulerConfig(interval=1, quota=4, margin=1.0, commit_rate=0.1), **KW)
    done: list[int] = []

    def run() -> None:
        for tok in llm.generate(list(range(60, 90)), temp=0.0):
            done.append(tok)
            if len(done) == 40:
                break

    try:
        th = threading.Thread(target=run, daemon=True)
        th.start()
        th.join(timeout=120)
        assert not th.is_alive(), f"generation stalled after {len(done)} tokens"
        assert len(done) == 40 and llm.policy.floor.acted > 0
        assert llm.vmodel.store.reserved == 1
    finally:
        if not th.is_alive():
            llm.close()
