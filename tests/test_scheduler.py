"""The importance-aware scheduler on synthetic router traces (no model)."""
from __future__ import annotations

import numpy as np
import pytest

from swapmoe_gguf.llamacpp.routing import _softmax as softmax
from swapmoe_gguf.residency.scheduler import ImportanceScheduler, SchedulerConfig

N, S, K = 16, 4, 2


def _trace(rng, hot: list[int], n_tok: int) -> np.ndarray:
    logits = rng.normal(0, 1.0, (n_tok, N))
    logits[:, hot] += 3.0
    return softmax(logits)


def _run(sched: ImportanceScheduler, resident: dict[int, list[int]], probs: np.ndarray, quota: int) -> int:
    swaps = 0
    for t in range(probs.shape[0]):
        sched.observe(0, np.ones(1), probs[t:t + 1])
        if sched.tick(1):
            proposed = sched.propose(resident)
            assert len(proposed) <= quota
            assert len({p.slot for p in proposed}) == len(proposed)
            for p in proposed:
                assert resident[0][p.slot] == p.evicted and p.expert not in resident[0]
                resident[0][p.slot] = p.expert
            swaps += len(proposed)
    return swaps


@pytest.mark.parametrize("quota", [1, 2])
def test_converges_to_the_important_experts_and_then_stops(quota):
    rng = np.random.default_rng(0)
    sched = ImportanceScheduler([0], N, K, np.ones((1, N)), SchedulerConfig(decay=0.95, interval=4, quota=quota))
    resident = {0: [0, 1, 2, 5]}
    hot = [3, 7, 11, 12]
    first = _run(sched, resident, _trace(rng, hot, 400), quota)
    assert sorted(resident[0]) == hot
    assert first >= 4  # it had to replace all four
    assert _run(sched, resident, _trace(rng, hot, 400), quota) == 0  # stationary: no more swaps
    # the workload shifts: it follows
    _run(sched, resident, _trace(rng, [1, 4, 9, 15], 400), quota)
    assert sorted(resident[0]) == [1, 4, 9, 15]


def test_importance_weights_norms_and_hidden_size():
    """Eq. 1: ||x|| * g_i(x) * ||E_i|| — a small-norm expert loses to a large-norm one with the same gates."""
    sched = ImportanceScheduler([0], 4, 2, np.array([[1.0, 10.0, 1.0, 1.0]]), SchedulerConfig(decay=0.5))
    probs = np.array([[0.4, 0.4, 0.1, 0.1]])
    sched.observe(0, np.array([2.0]), probs)
    np.testing.assert_allclose(sched.scores[0], [2 * 0.4 * 1, 2 * 0.4 * 10, 0, 0])
    sched.observe(0, np.array([1.0]), np.array([[0.1, 0.1, 0.5, 0.3]]))  # decays the past by 0.5
    np.testing.assert_allclose(sched.scores[0], [0.4, 4.0, 0.5, 0.3])
    assert sched.target(0, 2) == [1, 2]


def test_multi_token_observe_equals_token_by_token():
    rng = np.random.default_rng(1)
    probs = _trace(rng, [0, 1], 9)
    xn = rng.uniform(0.5, 2, 9)
    a = ImportanceScheduler([0], N, K, np.ones((1, N)), SchedulerConfig(decay=0.9))
    b = ImportanceScheduler([0], N, K, np.ones((1, N)), SchedulerConfig(decay=0.9))
    a.observe(0, xn, probs)
    for t in range(9):
        b.observe(0, xn[t:t + 1], probs[t:t + 1])
    np.testing.assert_allclose(a.scores, b.scores)


def test_busy_slots_are_left_alone_and_margin_holds():
    sched = ImportanceScheduler([0], 4, 1, np.ones((1, 4)), SchedulerConfig(decay=0.5, quota=2, margin=2.0))
    sched.scores[0] = [1.0, 1.5, 5.0, 0.1]
    # expert 2 is 5x expert 0 (weakest resident); expert 3 is below everything
    assert [(p.slot, p.expert) for p in sched.propose({0: [0, 1]})] == [(0, 2)]
    assert sched.propose({0: [0, 1]}, busy={(0, 0)})[0].slot == 1
    sched.scores[0] = [1.0, 1.5, 1.9, 0.1]   # 1.9 < 2.0 x 1.0: hysteresis, no swap
    assert sched.propose({0: [0, 1]}) == []


def test_calibrated_prior_keeps_the_core_through_a_burst_and_yields_to_a_shift():
    """A core expert (3) that the calibration text rates highly survives a short burst of traffic on
    other experts that would evict it without the prior; a sustained shift still moves the set."""
    rng = np.random.default_rng(1)
    rate = np.full((1, N), 0.01)
    rate[0, [3, 7, 11, 12]] = 0.2  # the calibration's top-4, at about their share of real traffic
    kept = {}
    for weight in (0.0, 0.5):
        sched = ImportanceScheduler([0], N, K, np.ones((1, N)),
                                    SchedulerConfig(decay=0.9, interval=4, quota=2, prior_weight=weight))
        sched.set_prior(rate)
        resident = {0: [3, 7, 11, 12]}
        _run(sched, resident, _trace(rng, [7, 11, 12, 3], 100), 2)
        _run(sched, resident, _trace(rng, [0, 1, 2, 5], 12), 2)  # a burst: 12 tokens
        kept[weight] = set(resident[0]) & {3, 7, 11, 12}
        _run(sched, resident, _trace(rng, [0, 1, 2, 5], 400), 2)  # a new topic for good
        assert len(set(resident[0]) & {0, 1, 2, 5}) >= 2, (weight, resident)
    assert len(kept[0.5]) > len(kept[0.0])
    with pytest.raises(ValueError, match="shape"):
        ImportanceScheduler([0], N, K, np.ones((1, N))).set_prior(np.ones((2, N)))
    with pytest.raises(ValueError):
        SchedulerConfig(prior_weight=-1)


def _propose_layer_by_layer(sched: ImportanceScheduler, resident: dict[int, list[int]],
                            busy: set[tuple[int, int]]) -> list:
    """The scheduler's proposals as they were computed before they were vectorised: layer by layer,
    weakest free resident against strongest outsider, stable orders, stop at the first miss."""
    from swapmoe_gguf.residency.scheduler import Swap

    out, q = [], sched.config.quota
    for layer, slots in resident.items():
        s = sched.effective(layer)
        free = sorted((i for i in range(len(slots)) if (layer, i) not in busy), key=lambda i: s[slots[i]])
        cand = sorted((e for e in range(sched.n_expert) if e not in set(slots)), key=lambda e: -s[e])
        for slot, e in zip(free[:q], cand[:q]):
            old = slots[slot]
            if s[e] <= 0 or s[e] < sched.config.margin * s[old]:
                break
            out.append(Swap(layer, slot, e, old, float(s[e] / max(s[old], 1e-30))))
    return out


def test_proposals_equal_the_layer_by_layer_rule():
    """Random scores with ties (rounded) and zeros, busy slots, quotas 1-3: the vectorised proposals
    are exactly the layer-by-layer ones, in the same order."""
    rng = np.random.default_rng(1)
    n_swaps = 0
    for _ in range(300):
        n_layer, n_expert = int(rng.integers(1, 6)), int(rng.integers(4, 12))
        slots = int(rng.integers(1, n_expert))
        layers = sorted(rng.choice(20, n_layer, replace=False).tolist())
        sched = ImportanceScheduler(layers, n_expert, 2, rng.random((n_layer, n_expert)),
                                    SchedulerConfig(quota=int(rng.integers(1, 4))))
        sched.scores = np.round(rng.random((n_layer, n_expert)) * 3, 1) * (rng.random((n_layer, n_expert)) > 0.3)
        resident = {l: rng.choice(n_expert, slots, replace=False).tolist() for l in layers}
        busy = {(l, int(rng.integers(slots))) for l in layers if rng.random() < 0.3}
        want = _propose_layer_by_layer(sched, resident, busy)
        assert sched.propose(resident, busy) == want
        n_swaps += len(want)
    assert n_swaps > 100  # the comparison covered real proposals


def _observe_one_layer(sched: ImportanceScheduler, layer: int, x_norm: np.ndarray, selected: np.ndarray,
                       weights: np.ndarray) -> None:
    """Eq. 1 for one layer's tokens, as the scheduler added it before layers were grouped."""
    n_tok = selected.shape[0]
    gate = np.abs(weights) * x_norm[:, None]
    w = sched.config.decay ** np.arange(n_tok - 1, -1, -1, dtype=np.float64)
    contrib = np.zeros(sched.n_expert)
    np.add.at(contrib, selected.ravel(), (gate * w[:, None]).ravel())
    i = sched.index[layer]
    sched.scores[i] = sched.scores[i] * sched.config.decay ** n_tok + contrib * sched.norms[i]


def test_layers_observed_together_equal_one_by_one():
    """observe_layers (a step's or F steps' layers in one numpy pass) adds bitwise the same scores as
    Eq. 1 added layer by layer."""
    rng = np.random.default_rng(2)
    layers = [1, 3, 4, 7]
    norms = rng.random((4, N)).astype(np.float32)
    a = ImportanceScheduler(layers, N, K, norms)
    b = ImportanceScheduler(layers, N, K, norms)
    for n_tok in (1, 5, 8):
        x_norm = rng.random((4, n_tok)).astype(np.float32)
        sel = np.stack([np.stack([rng.choice(N, K, replace=False) for _ in range(n_tok)]) for _ in layers])
        w = rng.random((4, n_tok, K)).astype(np.float32)
        a.observe_layers(tuple(layers), x_norm, sel, w)
        for i, l in enumerate(layers):
            _observe_one_layer(b, l, x_norm[i], sel[i], w[i])
    assert np.array_equal(a.scores, b.scores) and a.scores.max() > 0


def test_calibration_windows_cover_the_text_or_spread_over_it():
    """Within the budget: the whole text in order (what calibration always did); over it: windows
    spread from the text's start to its end, about the budget in all (every domain of a mixed text)."""
    from swapmoe_gguf.residency.calibration import calibration_windows

    assert calibration_windows(1000, 256, 5000) == [(0, 256), (256, 512), (512, 768), (768, 1000)]
    spread = calibration_windows(8919, 256, 500)
    assert spread[0][0] == 0 and spread[-1][1] == 8919 and len(spread) == 4
    assert 400 <= sum(e - s for s, e in spread) <= 500
    assert all(e - s == spread[0][1] - spread[0][0] for s, e in spread)
    assert calibration_windows(8919, 256, 10) == [(0, 32)]  # at least a probe's length
