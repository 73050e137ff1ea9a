"""Tool calls for any model: llama.cpp's "generic" format.

The template gets a system note describing the tools and the JSON answer format,
`{"tool_call": {"name": ..., "arguments": {...}}}` or `{"response": "..."}`; an answer in that format
is parsed back into OpenAI's `tool_calls`. With `tool_choice: "required"` (or a named function) a
grammar from the JSON schema forces a call. With "auto" the model is not constrained: it may answer
in plain text, as with llama-server's native tool formats, whose grammars only start on a trigger.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from .core import APIError
from .grammar import schema_grammar


class ToolCalling:
    def __init__(self, tools: list[dict[str, Any]], choice: Any, parallel: bool):
        self.tools, self.choice, self.parallel = tools, choice, parallel

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "ToolCalling":
        tools = body.get("tools") or []
        if not isinstance(tools, list):
            raise APIError(400, "\"tools\" must be an array")
        for t in tools:
            if not (isinstance(t, dict) and t.get("type", "function") == "function"
                    and isinstance(t.get("function"), dict) and t["function"].get("name")):
                raise APIError(400, "each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}")
        choice = body.get("tool_choice") or "auto"
        if isinstance(choice, dict):  # {"type": "function", "function": {"name": X}}: only that tool
            name = (choice.get("function") or {}).get("name")
            tools = [t for t in tools if t["function"]["name"] == name]
            if not tools:
                raise APIError(400, f"tool_choice names {name!r}, which is not among the tools")
            choice = "required"
        if choice not in ("auto", "none", "required"):
            raise APIError(400, f"tool_choice must be auto, none, required or a function, got {choice!r}")
        return cls(tools if choice != "none" else [], choice, bool(body.get("parallel_tool_calls", False)))

    @property
    def active(self) -> bool:
        return bool(self.tools)

    def for_template(self) -> list[dict[str, Any]] | None:
        return self.tools or None

    def _schema(self) -> dict[str, Any]:
        call = {"anyOf": [{"type": "object", "properties": {
            "name": {"const": t["function"]["name"]},
            "arguments": t["function"].get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"]} for t in self.tools]}
        calls = ({"type": "object", "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1}},
                  "required": ["tool_calls"]} if self.parallel else
                 {"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"]})
        if self.choice == "required":
            return calls
        return {"anyOf": [calls, {"type": "object", "properties": {"response": {"type": "string"}},
                                  "required": ["response"]}]}

    def messages(self, messages: list[dict[str, Any]], native: bool = False) -> list[dict[str, Any]]:
        """The conversation with the tool note in the system message. Earlier tool calls and results
        go to the template as they are when it has tool syntax of its own (`native`: it reads
        `tool_calls`, arguments as objects), else written as the generic format's JSON text. Other
        fields (reasoning_content, name, ...) are kept."""
        out = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise APIError(400, "each message must be an object with a string role")
            if m.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": _args(c["function"].get("arguments"))}
                         for c in m["tool_calls"]]
                if native:
                    m = {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": a["arguments"]}}
                                             for c, a in zip(m["tool_calls"], calls)]}
                else:
                    text = json.dumps({"tool_calls": calls} if len(calls) > 1 else {"tool_call": calls[0]})
                    m = {k: v for k, v in m.items() if k != "tool_calls"} | {"role": "assistant", "content": text}
            elif m.get("role") == "tool" and not native:
                m = {"role": "tool", "content": json.dumps({"tool_response": {
                    "tool": m.get("name", ""), "tool_call_id": m.get("tool_call_id", ""), "content": m.get("content")}})}
            out.append(m)
        if not self.tools:
            return out
        note = ("Respond in JSON format, either with `tool_call` (a request to call tools) or with `response` "
                "reply to the user's request, following this schema:\n```json\n"
                + json.dumps(self._schema(), indent=2) + "\n```")
        if out and out[0].get("role") == "system":
            return [{**out[0], "content": f"{out[0].get('content') or ''}\n\n{note}"}] + out[1:]
        return [{"role": "system", "content": note}] + out

    def grammar(self) -> str | None:
        if not self.tools or self.choice != "required":
            return None
        return schema_grammar(self._schema())

    def parse(self, text: str) -> tuple[str, list[dict[str, Any]]] | None:
        """(content, tool_calls) from a generic-format answer; None when tools were not offered."""
        if not self.tools:
            return None
        try:
            obj = json.loads(text)
        except ValueError:
            return text, []  # plain text (auto), or cut short: hand back the text as is
        if not isinstance(obj, dict):
            return text, []
        raw = obj.get("tool_calls") or ([obj["tool_call"]] if "tool_call" in obj else [])
        if raw:
            return "", [{"type": "function", "id": f"call_{uuid.uuid4().hex[:24]}",
                         "function": {"name": c.get("name", ""), "arguments": json.dumps(c.get("arguments", {}))}}
                        for c in raw if isinstance(c, dict)]
        return str(obj.get("response", text)), []


def _args(a: Any) -> Any:
    if isinstance(a, str):
        try:
            return json.loads(a)
        except ValueError:
            return a
    return a
