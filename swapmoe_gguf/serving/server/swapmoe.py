"""SwapMoE's own routes: /swapmoe/budget changes the memory budget (and so S) or the quality floor τ
while serving; /swapmoe/state is the Virtual Experts as they are now (live.py), for the web page."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request

from ...residency.budget import Budget, fmt
from .core import APIError, Core
from .http import parse_json
from .live import LiveState, floor_of


def _check(body: dict[str, Any]) -> tuple[Any, Any, Any]:
    budget, slots, tau = body.get("memory_budget"), body.get("experts_per_layer"), body.get("max_dropped_mass")
    if budget is None and slots is None and tau is None:
        raise APIError(400, "give memory_budget, experts_per_layer and/or max_dropped_mass", code="invalid_value")
    if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
        raise APIError(400, f"experts_per_layer must be a positive integer, got {slots!r}")
    if budget is not None and not isinstance(budget, str):
        raise APIError(400, f"memory_budget must be a string such as \"4GiB\" or \"75%\", got {budget!r}")
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0):
        raise APIError(400, f"max_dropped_mass must be a number between 0 and 1, got {tau!r}")
    return budget, slots, tau


def router(core: Core) -> APIRouter:
    r = APIRouter()
    live = LiveState(core)

    @r.get("/swapmoe/state")
    async def state() -> dict[str, Any]:
        """Residency per layer, swaps, hit rate, memory against the budget, τ (does not wake)."""
        return live.read()

    @r.post("/swapmoe/budget")
    async def set_budget(request: Request) -> dict[str, Any]:
        body = await parse_json(request)
        budget, slots, tau = _check(body)
        if tau is not None and not live.tau_live:
            raise APIError(400, "the quality floor can change live only on a server started with one "
                                "(--max-dropped-mass below 1); this one runs without it (τ = 1)", code="invalid_value")
        llm = core.llm
        before, tau_before = llm.vmodel.slots, live.tau_now()
        t0 = time.perf_counter()
        if budget is not None or slots is not None:
            # only experts_per_layer given: the current budget still holds
            b = budget if budget is not None else (Budget(nbytes=llm.budget_bytes) if llm.budget_bytes else None)
            live.read()  # the state the page sees while the model is rebuilt
            live.changing = True
            try:
                # between two engine steps, on the engine's thread: no sequence is mid-decode
                await asyncio.get_running_loop().run_in_executor(None, core.engine.call, lambda: llm.set_budget(b, slots))
            finally:
                live.changing = False
        if tau is not None:
            live.tau = float(tau)
        if live.tau is not None:  # (a rebuilt policy starts from the start's τ)
            await asyncio.get_running_loop().run_in_executor(None, core.engine.call, live.apply_tau)
        seconds = time.perf_counter() - t0
        t, m = llm.telemetry(), llm.memory
        s = t.slots
        if s != before:
            cost = (f"S {before} -> {s}: model rebuilt in {seconds:.2f} s (non-expert weights and {s} experts per "
                    f"layer read again, {fmt(m.non_expert + s * m.per_slot)}); the KV cache was dropped, the next "
                    f"request reads its prompt again")
        else:
            cost = f"S stays {s}: nothing rebuilt ({seconds:.2f} s)"
        if tau is not None:
            cost += f"; τ {tau_before:g} -> {live.tau_now():g}, applied at the next step"
        return {"experts_per_layer": s, "previous_experts_per_layer": before, "n_expert": llm.vmodel.n_expert,
                "policy": llm.policy_name, "budget_bytes": t.budget_bytes,
                "budget": fmt(t.budget_bytes) if t.budget_bytes else None, "max_dropped_mass": live.tau_now(),
                "floor": floor_of(llm) is not None, "seconds": round(seconds, 3), "rebuilt": s != before,
                "planned_bytes": m.total(), "cost": cost}

    return r
