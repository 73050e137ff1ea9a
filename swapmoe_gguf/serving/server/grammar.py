"""Grammars from JSON schemas: structured output (`response_format`, `json_schema`, `grammar`,
llama-server's three ways) and forced tool calls, through llama-cpp-python's schema converter."""
from __future__ import annotations

import json
from typing import Any

from .core import APIError


def schema_grammar(schema: Any) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # noqa: BLE001 - the converter raises plain exceptions on bad schemas
        raise APIError(400, f"json_schema: {e}") from None


def structured(body: dict[str, Any]) -> str | None:
    """A grammar from `response_format`, `json_schema` or `grammar` (llama-server's three ways)."""
    rf = body.get("response_format")
    if isinstance(rf, dict):
        kind = rf.get("type")
        if kind == "json_object":
            return schema_grammar(rf.get("schema") or {"type": "object"})
        if kind == "json_schema":
            js = rf.get("json_schema") or {}
            return schema_grammar(js.get("schema", js) if isinstance(js, dict) else {})
        if kind not in (None, "text"):
            raise APIError(400, f"response_format type must be text, json_object or json_schema, got {kind!r}")
    if body.get("json_schema") is not None:
        return schema_grammar(body["json_schema"])
    return body.get("grammar") or None
