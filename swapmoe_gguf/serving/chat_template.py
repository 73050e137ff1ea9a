"""Chat templates as llama-server applies them.

`--reasoning off` renders with `enable_thinking = false` (templates that support it close their
thinking block); `on`/`auto` with true, as llama-server. The template comes from `--chat-template-file`, else `--chat-template` (a built-in name such as
`chatml` or `llama3`, or template text), else the GGUF's `tokenizer.chat_template`, else chatml.
With `--jinja` (the default) it is rendered with Jinja2 in a sandbox (messages, tools,
add_generation_prompt, bos/eos tokens); with `--no-jinja`, by llama.cpp's own
`llama_chat_apply_template`, which recognises the common templates by name or by their text.
"""
from __future__ import annotations

import ctypes
import datetime
import json
from pathlib import Path
from typing import Any

import llama_cpp

from ..base.errors import SwapMoEError

CHATML = ("{%- for message in messages -%}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
          "'<|im_end|>\\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
          "{%- endif -%}")


class TemplateError(SwapMoEError, ValueError):
    """A chat template that does not parse or render (one line for the CLI; 400 for a request)."""


def _builtin_names() -> set[str]:
    n = llama_cpp.llama_chat_builtin_templates(None, 0)
    arr = (ctypes.c_char_p * n)()
    llama_cpp.llama_chat_builtin_templates(arr, n)
    return {a.decode() for a in arr}


def text_of(content: Any, sep: str = "\n") -> str:
    """A message's content as text: OpenAI's typed parts are joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") in ("text", "input_text", "output_text"):
                parts.append(str(p.get("text", "")))
            elif isinstance(p, str):
                parts.append(p)
            else:
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise TemplateError(f"content parts of type {kind!r} need a multimodal model; this one reads text")
        return sep.join(parts)
    raise TemplateError("message content must be a string or a list of content parts")


class ChatFormatter:
    def __init__(self, source: str, jinja: bool, bos: str = "", eos: str = "", thinking: bool = True,
                 add_bos: bool = False, add_eos: bool = False):
        self.source, self.jinja, self.bos, self.eos, self.thinking = source, jinja, bos, eos, thinking
        self.add_bos, self.add_eos = add_bos, add_eos  # the tokenizer adds them: the text must not
        self._tpl = None
        if jinja:
            from jinja2 import TemplateSyntaxError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda v, indent=None, **kw: json.dumps(v, indent=indent, ensure_ascii=False)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            try:
                self._tpl = env.from_string(source)
            except TemplateSyntaxError as e:
                raise TemplateError(f"the chat template does not parse: {e}") from None

    @property
    def native_tools(self) -> bool:
        """The template writes tool calls itself (it reads messages' `tool_calls`)."""
        return self.jinja and "tool_calls" in self.source

    @classmethod
    def for_model(cls, llm: Any, settings: Any = None) -> "ChatFormatter":
        """The formatter llama-server would use for this model and these settings (`--jinja`,
        `--chat-template(-file)`, `--reasoning`); no settings: the model's own template, Jinja."""
        settings = settings or _Defaults()
        src = None
        if settings.chat_template_file:
            try:
                src = Path(settings.chat_template_file).read_text()
            except OSError as e:
                raise TemplateError(f"cannot read the chat template file {settings.chat_template_file}: "
                                    f"{e.strerror}") from None
        src = src or settings.chat_template or llm.metadata.get("tokenizer.chat_template") or "chatml"
        jinja = settings.jinja
        if src in _builtin_names():
            if jinja and src == "chatml":
                src = CHATML
            elif jinja:  # a built-in name: llama.cpp's own formatting (it has no Jinja text for it)
                jinja = False
        elif not jinja and not _supported(src):
            raise TemplateError("this chat template is not one llama.cpp knows without --jinja; use --jinja")
        bos = llm.detokenize([llm.token_bos()]).decode("utf-8", "replace") if llm.token_bos() >= 0 else ""
        eos = llm.detokenize([llm.token_eos()]).decode("utf-8", "replace") if llm.token_eos() >= 0 else ""
        vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        return cls(src, jinja, bos, eos, thinking=getattr(settings, "reasoning", "auto") != "off",
                   add_bos=bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
                   add_eos=bool(llama_cpp.llama_vocab_get_add_eos(vocab)))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, **extra: Any) -> str:
        msgs = []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise TemplateError("every message needs a role")
            msgs.append({**m, "content": text_of(m.get("content"))})
        if self.jinja:
            from jinja2 import TemplateError as JinjaError

            now = datetime.datetime.now()
            # what llama.cpp's template context also provides (Llama 3.x reads date_string, FireFunction
            # datetime and functions)
            ctx = {"date_string": now.strftime("%d %b %Y"), "datetime": now.strftime("%b %d %Y %H:%M:%S GMT"),
                   "functions": json.dumps([t.get("function", t) for t in tools or []], indent=2),
                   "enable_thinking": self.thinking} | extra
            try:
                out = self._tpl.render(messages=msgs, add_generation_prompt=add_generation_prompt, tools=tools,
                                       bos_token=self.bos, eos_token=self.eos, **ctx)
            except JinjaError as e:
                raise TemplateError(f"the chat template failed: {e}") from None
            # as llama.cpp: tokenizing adds BOS/EOS where the vocabulary says so, so the text drops its own
            if self.add_bos and self.bos and out.startswith(self.bos):
                out = out[len(self.bos):]
            if self.add_eos and self.eos and out.endswith(self.eos):
                out = out[:-len(self.eos)]
            return out
        return _apply(self.source, msgs, add_generation_prompt)


class _Defaults:
    chat_template_file = chat_template = None
    jinja = True
    reasoning = "auto"


def _raise(msg: str) -> None:
    from jinja2 import TemplateError as JinjaError

    raise JinjaError(msg)


def _apply(tmpl: str, msgs: list[dict[str, Any]], add_ass: bool) -> str:
    keep = [(m["role"].encode(), m["content"].encode()) for m in msgs]
    arr = (llama_cpp.llama_chat_message * len(keep))(*[llama_cpp.llama_chat_message(r, c) for r, c in keep])
    size = 2 * sum(len(r) + len(c) for r, c in keep) + 4096
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(tmpl.encode(), arr, len(keep), add_ass, buf, size)
    if n < 0:
        raise TemplateError("llama.cpp does not support this chat template without --jinja")
    if n > size:
        buf = ctypes.create_string_buffer(n + 1)
        n = llama_cpp.llama_chat_apply_template(tmpl.encode(), arr, len(keep), add_ass, buf, n + 1)
    return buf.raw[:n].decode("utf-8", "replace")


def _supported(tmpl: str) -> bool:
    try:
        _apply(tmpl, [{"role": "user", "content": "x"}], True)
        return True
    except TemplateError:
        return False
