"""The planner's choice of swapmoe's quality floor τ (`--max-dropped-mass`), from a target, measured.

How fast a floor runs depends on how often it acts (routing statistics of this model at this S) and
on what a synchronous expert read costs on this device; neither is known in advance, so both are
measured: the model runs a text with each τ of FLOOR_GRID, at the plan's S, and records its decode
speed and the full model's expert weight that still goes elsewhere after the floor (the quality
cost: the share of the full router's top-k mass routed to other experts; 0 is `exact`).

    speed:X    the best quality (smallest τ) whose decode speed is at least X times plain swapmoe's
    dropped:M  the fastest τ whose dropped share is at most M
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..base.errors import SwapMoEError
from .calib_cache import default_calibration_text

log = logging.getLogger(__name__)
FLOOR_GRID = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05)
PROMPT, DECODE = 32, 48  # tokens of the measured text: a prompt, then teacher-forced decoding


@dataclass(frozen=True)
class FloorPoint:
    tau: float
    decode_tok_s: float
    dropped: float      # mean share of the full model's top-k weight routed elsewhere, after the floor
    acted: float        # share of (micro-batch, layer) pairs where the floor loaded experts


def parse_target(text: str) -> tuple[str, float]:
    kind, _, val = text.partition(":")
    try:
        x = float(val)
    except ValueError:
        x = -1.0
    if kind not in ("speed", "dropped") or not 0.0 < x <= 1.0:
        raise SwapMoEError(f"--floor takes speed:X (X of plain swapmoe's decode speed, 0 < X <= 1) or dropped:M "
                           f"(largest mean dropped share, 0 < M <= 1); got {text!r}")
    return kind, x


def measure(model: str, slots: int, runtime: Callable[..., Any], *, threads: int, n_ctx: int = 512,
            text: str | None = None, grid: tuple[float, ...] = FLOOR_GRID) -> list[FloorPoint]:
    """Each τ of the grid on the same text (a fresh model each from `runtime`, `runtime.SwapMoELlama`,
    so no τ inherits another's experts)."""
    if text is None:
        text = default_calibration_text()
    points = []
    for tau in grid:
        llm = runtime(model, policy="swapmoe", experts_per_layer=slots, max_dropped_mass=tau, n_ctx=n_ctx,
                      n_threads=threads, n_threads_batch=threads, verbose=False)
        try:
            toks = llm.tokenize(text.encode())[: PROMPT + DECODE]
            if len(toks) < PROMPT + 8:
                raise SwapMoEError(f"floor tuning needs a text of at least {PROMPT + 8} tokens; got {len(toks)}")
            llm.eval(toks[:PROMPT])
            floor = getattr(llm.policy, "floor", None)
            d0 = (floor.dropped_sum, floor.dropped_n, floor.acted, floor.checked) if floor else None
            h0 = (llm.telemetry_.hit_mass, llm.telemetry_.hit_count)
            t0 = time.perf_counter()
            for tok in toks[PROMPT:]:
                llm.eval([tok])
            secs = time.perf_counter() - t0
            n = len(toks) - PROMPT
            if floor is not None:
                dn = floor.dropped_n - d0[1]
                dropped = (floor.dropped_sum - d0[0]) / dn if dn else 0.0
                checked = floor.checked - d0[3]
                acted = (floor.acted - d0[2]) / checked if checked else 0.0
            else:  # no floor: everything outside the residents is dropped
                llm.score_pending()
                t = llm.telemetry_
                hits = t.hit_count - h0[1]
                dropped = 1.0 - (t.hit_mass - h0[0]) / hits if hits else 0.0
                acted = 0.0
            points.append(FloorPoint(tau, n / secs, dropped, acted))
            log.info("floor %g: %.1f tok/s, dropped %.4f, acted on %.0f%%", tau, n / secs, dropped, 100 * acted)
        finally:
            llm.close()
    return points


def pick(points: list[FloorPoint], target: tuple[str, float]) -> tuple[FloorPoint, str]:
    """The chosen point and one line saying why."""
    kind, x = target
    base = next((p for p in points if p.tau >= 1.0), None)
    if base is None:
        raise SwapMoEError("floor tuning needs the τ = 1 point (plain swapmoe) to compare with")
    by_tau = sorted(points, key=lambda p: p.tau)            # best quality first
    if kind == "speed":
        ok = [p for p in by_tau if p.decode_tok_s >= x * base.decode_tok_s]
        chosen = ok[0] if ok else base
        why = (f"floor τ={chosen.tau:g}: the smallest measured τ decoding at >= {x:g}x plain swapmoe "
               f"({chosen.decode_tok_s:.1f} vs {base.decode_tok_s:.1f} tok/s); dropped share {chosen.dropped:.4f} "
               f"(plain: {base.dropped:.4f})")
    else:
        ok = [p for p in reversed(by_tau) if p.dropped <= x]
        chosen = ok[0] if ok else by_tau[0]
        why = (f"floor τ={chosen.tau:g}: the fastest measured τ whose dropped share is <= {x:g} "
               f"({chosen.dropped:.4f}; {chosen.decode_tok_s:.1f} tok/s, plain swapmoe {base.decode_tok_s:.1f})"
               if ok else f"no measured τ drops <= {x:g}; the smallest, {chosen.tau:g}, drops {chosen.dropped:.4f}")
    return chosen, why


def table(points: list[FloorPoint]) -> list[str]:
    return [f"τ={p.tau:<5g} {p.decode_tok_s:8.1f} tok/s  dropped {p.dropped:.4f}  acted on {p.acted:.0%}"
            for p in points]


def apply(plan: Any, chosen: FloorPoint, why: str, points: list[FloorPoint]) -> Any:
    """The plan with the chosen floor and the measured curve in its reasons."""
    from dataclasses import replace

    return replace(plan, max_dropped_mass=chosen.tau,
                   reasons=plan.reasons + [why] + [f"measured: {line}" for line in table(points)])
