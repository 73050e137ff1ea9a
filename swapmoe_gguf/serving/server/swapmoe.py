"""SwapMoE's own route: /swapmoe/budget changes the memory budget (and so S) while serving."""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from ...residency.budget import Budget, fmt
from .core import APIError, Core
from .http import parse_json


def router(core: Core) -> APIRouter:
    r = APIRouter()

    @r.post("/swapmoe/budget")
    async def set_budget(request: Request) -> dict[str, Any]:
        body = await parse_json(request)
        budget, slots = body.get("memory_budget"), body.get("experts_per_layer")
        if budget is None and slots is None:
            raise APIError(400, "give memory_budget and/or experts_per_layer", code="invalid_value")
        if slots is not None and (not isinstance(slots, int) or slots < 1):
            raise APIError(400, f"experts_per_layer must be a positive integer, got {slots!r}")
        if budget is not None and not isinstance(budget, str):
            raise APIError(400, f"memory_budget must be a string such as \"4GiB\" or \"75%\", got {budget!r}")
        llm = core.llm
        # only experts_per_layer given: the current budget still holds
        b = budget if budget is not None else (Budget(nbytes=llm.budget_bytes) if llm.budget_bytes else None)
        # between two engine steps, on the engine's thread: no sequence is mid-decode
        s = await asyncio.get_running_loop().run_in_executor(None, core.engine.call,
                                                             lambda: llm.set_budget(b, slots))
        t = llm.telemetry()
        return {"experts_per_layer": s, "n_expert": llm.vmodel.n_expert, "policy": llm.policy_name,
                "budget_bytes": t.budget_bytes, "budget": fmt(t.budget_bytes) if t.budget_bytes else None}

    return r
