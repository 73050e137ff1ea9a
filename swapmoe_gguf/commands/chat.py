"""`swapmoe chat`: interactive multi-turn chat, or one answer with -p / stdin, under a memory budget.

Commands: /exit, /reset, /stats, /budget 3GiB, /help. Ctrl-C stops the current answer (the
conversation goes on); Ctrl-D or /exit leaves. After each answer a status line (stderr): tokens/s,
resident memory against the budget, router hit rate, swaps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
from typing import Any, Iterator, TextIO

from ..base.errors import SwapMoEError
from ..residency.budget import fmt
from ..serving.generate import GenerationRecord, stream
from ..serving.settings import ModelSettings, SamplingSettings

RAW_DEFAULT_TOKENS = 256  # a continuation's length when -n is not given (raw text has no end-of-answer)
HELP = "commands: /exit  /reset  /stats  /budget <size, e.g. 3GiB or 60%>  /help   (Ctrl-C stops an answer)"


@contextlib.contextmanager
def _ctrl_c_as_flag(llm) -> Iterator[threading.Event]:  # type: ignore[no-untyped-def]
    """While an answer streams, Ctrl-C only sets a flag and asks the runtime to stop before its next
    decode step. A KeyboardInterrupt raised asynchronously can land inside one of llama-cpp-python's
    ctypes callbacks (its sampler), where ctypes prints and swallows it and the answer runs on.
    Off the main thread: signals stay as they are."""
    stop = threading.Event()

    def on_sigint(*_: object) -> None:
        stop.set()
        llm.request_stop()

    try:
        prev = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: signals stay as they are
        yield stop
        return
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, prev)
        llm.clear_stop()  # a Ctrl-C after the last step must not stop the next answer


def status_line(rec: GenerationRecord, llm) -> str:  # type: ignore[no-untyped-def]
    budget = f" / budget {fmt(rec.budget_bytes)}" if rec.budget_bytes else ""
    hit = f"{rec.hit_rate:.1%}" if rec.hit_rate is not None else "-"
    sched = llm.telemetry().sched_us_per_token
    return (f"[{rec.n_generated} tok, {rec.tok_s:.1f} tok/s | RSS {fmt(rec.rss_bytes)}{budget}, peak "
            f"{fmt(rec.peak_rss_bytes)} | {llm.vmodel.slots}/{llm.vmodel.n_expert} experts/layer, {llm.policy_name} | "
            f"hit {hit} | swaps {rec.swaps}" + (f" | scheduler {sched:.0f} us/tok" if sched is not None else "") + "]")


def stats_text(llm) -> str:  # type: ignore[no-untyped-def]
    t = llm.telemetry()
    lines = [f"policy {llm.policy_name}; {t.slots} of {llm.vmodel.n_expert} experts resident per layer",
             f"RSS {fmt(t.rss_bytes)} (peak {fmt(t.peak_rss_bytes)})" +
             (f" of budget {fmt(t.budget_bytes)}" if t.budget_bytes else "") + f"; planned {fmt(llm.memory.total())}",
             f"tokens {t.tokens}; hit rate " + (f"{t.hit_rate:.1%}" if t.hit_rate is not None else "-") +
             f"; swaps {t.swaps} (failed {t.swap_failures}); read {fmt(t.bytes_read)} in {t.read_seconds:.2f} s; "
             f"decode waited {t.io_blocked_seconds:.3f} s for I/O",
             "scheduler " + (f"{t.sched_us_per_token:.0f} us per decoded token (router inputs, scoring, swaps)"
                             if t.sched_us_per_token is not None else "-")]
    return "\n".join(lines)


class ChatSession:
    def __init__(self, llm, sampling: SamplingSettings, system: str | None, out: TextIO = sys.stdout,  # type: ignore[no-untyped-def]
                 err: TextIO = sys.stderr):
        self.llm, self.sampling, self.system, self.out, self.err = llm, sampling, system, out, err
        self.messages: list[dict[str, str]] = []
        self.formatter: Any = None  # the chat template, built on the first templated answer
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def answer(self, text: str, raw: bool = False, show_status: bool = True) -> str:
        """Stream one answer; Ctrl-C stops it and keeps what was said."""
        if not raw:
            self.messages.append({"role": "user", "content": text})
        if not raw and self.formatter is None:
            from ..serving.chat_template import ChatFormatter

            self.formatter = ChatFormatter.for_model(self.llm)
        gen = stream(self.llm, prompt=text, sampling=self.sampling) if raw else \
            stream(self.llm, messages=self.messages, sampling=self.sampling, formatter=self.formatter)
        parts: list[str] = []
        last: GenerationRecord | None = None
        with _ctrl_c_as_flag(self.llm) as stop:
            try:
                for rec in gen:
                    if rec.text:
                        parts.append(rec.text)
                        self.out.write(rec.text)
                        self.out.flush()
                    last = rec
                    if stop.is_set():
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                gen.close()
                self.err.write("\n[stopped]\n")
        self.out.write("\n")
        self.out.flush()
        reply = "".join(parts)
        if not raw:
            self.messages.append({"role": "assistant", "content": reply})
        if show_status and last is not None:
            self.err.write(status_line(last, self.llm) + "\n")
            self.err.flush()
        return reply

    def command(self, line: str) -> bool:
        """Handle a /command; False means leave."""
        cmd, _, arg = line.strip().partition(" ")
        if cmd in ("/exit", "/quit"):
            return False
        if cmd == "/reset":
            self.reset()
            self.llm.reset()
            self.err.write("[conversation reset]\n")
        elif cmd == "/stats":
            self.err.write(stats_text(self.llm) + "\n")
        elif cmd == "/budget":
            try:
                s = self.llm.set_budget(arg.strip())
                self.err.write(f"[budget {arg.strip()}: {s} of {self.llm.vmodel.n_expert} experts per layer, "
                               f"policy {self.llm.policy_name}]\n")
            except SwapMoEError as e:
                self.err.write(f"[budget unchanged: {e}]\n")
        else:
            self.err.write(HELP + "\n")
        self.err.flush()
        return True


def run_chat(settings: ModelSettings, sampling: SamplingSettings, *, prompt: str | None, system: str | None,
             raw: bool) -> int:
    interactive = prompt is None and sys.stdin.isatty()
    if prompt is None and not interactive:
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise SwapMoEError("no prompt: give -p TEXT, pipe text on stdin, or run in a terminal")
    llm = settings.load()
    try:
        quiet = raw  # --raw: the generated text only (no status line)
        if not raw and not llm.metadata.get("tokenizer.chat_template"):
            # llama-cpp-python would wrap the text in a guessed chat format the model never saw
            sys.stderr.write("[this model has no chat template: continuing your text instead (raw mode, "
                             f"{RAW_DEFAULT_TOKENS} tokens unless -n says otherwise)]\n")
            raw = True
            if sampling.n_predict < 0:
                sampling = dataclasses.replace(sampling, n_predict=RAW_DEFAULT_TOKENS)
        session = ChatSession(llm, sampling, system)
        if not interactive:
            session.answer(prompt or "", raw=raw, show_status=not quiet)
            return 0
        sys.stderr.write(f"swapmoe chat: {llm.vmodel.info.path.name}, {llm.vmodel.slots} of "
                         f"{llm.vmodel.n_expert} experts per layer ({llm.policy_name}). {HELP}\n")
        while True:
            try:
                line = input("> ")
            except EOFError:
                sys.stderr.write("\n")
                return 0
            except KeyboardInterrupt:
                sys.stderr.write("\n")
                continue
            if not line.strip():
                continue
            if line.startswith("/"):
                if not session.command(line):
                    return 0
                continue
            session.answer(line, raw=raw, show_status=not quiet)
    finally:
        llm.close()
