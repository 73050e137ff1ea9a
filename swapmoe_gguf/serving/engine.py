"""Parallel generation on one model: llama-server's slots and continuous batching, in Python.

`Engine(llm, n_slots)` owns the llama.cpp context (created with `n_seq_max = n_slots`): one thread
runs every step. A step gathers the next token of each generating slot and chunks of waiting prompts
into ONE batch (one sequence id per slot) and decodes it; the Virtual Experts are shared, so the router
tap and the scheduler see the union of all sequences' tokens. Sampling is llama.cpp's own sampler
chain in llama-server's order (logit bias, penalties, top-k, typical, top-p, min-p, temperature,
dist), with a grammar first when one is given.

    job = engine.submit(Request(prompt=tokens, n_predict=32))   # from any thread
    for ev in job.events():  # Token ..., then Done (or an EngineError raised)

Requests beyond the free slots wait in order; beyond `max_queue` waiting, `submit` raises QueueFull.
A slot keeps its tokens after a request (prompt cache): the next prompt sharing a prefix reuses it.
"""
from __future__ import annotations

import codecs
import ctypes
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import llama_cpp
import numpy as np

from ..base.errors import ContextFull
from .engine_records import (DEFAULT_SEED, Done, EngineError, Job, Progress, QueueFull, Request,  # noqa: F401
                             SamplingParams, Token)
from .sampling import held_back, sampler_chain, top_logprobs

log = logging.getLogger(__name__)
__all__ = ["DEFAULT_SEED", "Done", "Engine", "EngineError", "Job", "Progress", "QueueFull", "Request",
           "SamplingParams", "Token"]
@dataclass
class _Slot:
    id: int
    cache: list[int] = field(default_factory=list)   # tokens in this sequence's KV cache
    job: Job | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to decode
    chain: Any = None
    out_tokens: list[int] = field(default_factory=list)
    text: str = ""                                    # the answer so far, decoded as it arrives
    decoder: Any = None                               # UTF-8, holding a character split across tokens
    sent: int = 0                                     # characters released
    n_cached: int = 0
    t_start: float = 0.0
    t_prompt: float = 0.0                             # time to first token (prompt done)
    t_last_use: float = 0.0
    truncated: bool = False                           # the context was shifted (older tokens dropped)

    @property
    def busy(self) -> bool:
        return self.job is not None


class Engine:
    def __init__(self, llm: Any, n_slots: int = 1, max_queue: int = 64, n_batch: int | None = None,
                 context_shift: bool = False):
        self.llm = llm
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        n_seq = llama_cpp.llama_n_seq_max(self.ctx)
        if n_slots > n_seq:
            raise EngineError(f"{n_slots} slots need a context made for {n_slots} sequences; it has {n_seq}")
        self.n_ctx_slot = llm.n_ctx_seq()  # llama.cpp splits the cache between sequences unless unified
        self.n_batch = n_batch or llm.n_batch
        self.slots = [_Slot(i) for i in range(n_slots)]
        self.waiting: list[Job] = []
        self.max_queue = max_queue
        self.context_shift = context_shift  # a full slot drops half its older tokens instead of stopping
        self.n_keep_bos = int(bool(llama_cpp.llama_vocab_get_add_bos(self.vocab)))
        self._calls: list[tuple[Callable[[], Any], "queue.SimpleQueue[Any]"]] = []
        self._cv = threading.Condition()
        self._closed = False
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self.eog = [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)]
        self.stats = {"prompt_tokens": 0, "prompt_seconds": 0.0, "predicted_tokens": 0, "predicted_seconds": 0.0,
                      "decode_calls": 0, "busy_slots_sum": 0, "requests": 0, "n_past_max": 0}
        self.batch = llama_cpp.llama_batch_init(max(self.n_batch, n_slots), 0, 1)
        self.thread = threading.Thread(target=self._run, name="swapmoe-engine", daemon=True)
        self.thread.start()

    @property
    def ctx(self) -> Any:
        """The runtime's current context (a budget change builds a new one)."""
        return self.llm._ctx.ctx

    @property
    def vocab(self) -> Any:
        return llama_cpp.llama_model_get_vocab(self.llm._model.model)

    # API (any thread) ---------------------------------------------------------------------------
    def piece(self, tok: int, special: bool = False) -> bytes:
        """The bytes of one token as llama-server streams them (a leading space kept); cached: the
        vocabulary is the file's, whatever the model is rebuilt with."""
        key = (tok, special)
        b = self._pieces.get(key)
        if b is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, special)
            b = self._pieces[key] = buf.raw[:n]
        return b

    def submit(self, req: Request, notify: Callable[[], None] | None = None) -> Job:
        if len(req.prompt) == 0:
            raise EngineError("the prompt is empty")
        if len(req.prompt) >= self.n_ctx_slot:
            raise EngineError(
                f"the request exceeds the available context size ({len(req.prompt)} prompt tokens, "
                f"{self.n_ctx_slot} per slot)", "exceed_context_size_error",
                n_prompt_tokens=len(req.prompt), n_ctx=self.n_ctx_slot)
        if not -1 <= req.id_slot < len(self.slots):
            raise EngineError(f"id_slot must be -1 or below {len(self.slots)}, got {req.id_slot}")
        job = Job(req, notify)
        with self._cv:
            free = sum(not s.busy for s in self.slots)  # requests not yet admitted to a free slot
            if len(self.waiting) >= self.max_queue + free:
                raise QueueFull(len(self.waiting) - free)
            self.waiting.append(job)
            self._cv.notify()
        return job

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread between two steps (model changes, budget changes)."""
        box: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        with self._cv:
            if self._closed:
                raise EngineError("the engine is shut down", "unavailable_error", 503)
            self._calls.append((fn, box))
            self._cv.notify()
        ok, val = box.get()
        if not ok:
            raise val
        return val

    # slot actions (llama-server's /slots/{id}?action=...): run between steps, on an idle slot
    def save_slot(self, slot: int, path: str) -> tuple[int, int]:
        """The slot's KV cache and tokens to a file: (tokens, bytes written)."""
        def run() -> tuple[int, int]:
            from pathlib import Path

            from ..base.atomic import atomic_output

            s = self._idle(slot)
            toks = (llama_cpp.llama_token * max(len(s.cache), 1))(*s.cache)
            with atomic_output(Path(path), force=True) as tmp:  # a failed save leaves the old file
                n = llama_cpp.llama_state_seq_save_file(self.ctx, str(tmp).encode(), s.id, toks, len(s.cache))
                if n == 0:
                    raise EngineError(f"could not save slot {slot}", "server_error", 500)
            return len(s.cache), int(n)
        return self.call(run)

    def restore_slot(self, slot: int, path: str) -> tuple[int, int]:
        """A saved KV cache and its tokens into a slot: (tokens, bytes read)."""
        def run() -> tuple[int, int]:
            s = self._idle(slot)
            cap = self.n_ctx_slot
            toks = (llama_cpp.llama_token * cap)()
            n_out = ctypes.c_size_t(0)
            n = llama_cpp.llama_state_seq_load_file(self.ctx, path.encode(), s.id, toks, cap, ctypes.byref(n_out))
            if n == 0:
                llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), s.id, -1, -1)
                s.cache = []
                raise EngineError(f"could not restore slot {slot} from this file (not a saved slot of this "
                                  f"model, or larger than the slot's {cap} tokens)")
            s.cache = list(toks[: n_out.value])
            return n_out.value, int(n)
        return self.call(run)

    def erase_slot(self, slot: int) -> int:
        def run() -> int:
            s = self._idle(slot)
            n = len(s.cache)
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), s.id, -1, -1)
            s.cache = []
            return n
        return self.call(run)

    def _idle(self, slot: int) -> _Slot:
        if not 0 <= slot < len(self.slots):
            raise EngineError(f"no slot {slot}: slots are 0..{len(self.slots) - 1}")
        if self.slots[slot].busy:
            raise EngineError(f"slot {slot} is generating; try again when it is idle", "unavailable_error", 503)
        return self.slots[slot]

    @property
    def n_busy(self) -> int:
        return sum(s.busy for s in self.slots)

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self.thread.join(timeout=30)
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None

    # engine thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._closed or self._calls or self.waiting or any(s.busy for s in self.slots)):
                    self._cv.wait()
                if self._closed:
                    down = EngineError("server shutting down", "unavailable_error", 503)
                    for job in [s.job for s in self.slots if s.job] + self.waiting:
                        job.put(down)
                    for _, box in self._calls:
                        box.put((False, down))
                    return
                calls, self._calls = self._calls, []
            for fn, box in calls:
                ctx = self.ctx
                try:
                    box.put((True, fn()))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    box.put((False, e))
                if self.ctx is not ctx and self.ctx != ctx:  # a new context: the slots' caches are gone
                    for s in self.slots:
                        s.cache = []
            try:
                self._admit()
                self._step()
            except BaseException as e:  # noqa: BLE001 - every request in flight learns of it
                log.exception("generation step failed")
                for s in self.slots:
                    if s.job:
                        s.job.put(EngineError(f"generation failed: {e}", "server_error", 500))
                        self._release(s, keep_cache=False)

    def _admit(self) -> None:
        with self._cv:
            while self.waiting:
                job = self.waiting[0]
                slot = self._pick_slot(job.req)
                if slot is None:
                    return
                self.waiting.pop(0)
                if job.cancelled:
                    continue
                try:
                    self._start(slot, job)
                except EngineError as e:
                    job.put(e)
                    self._release(slot, keep_cache=False)

    def _pick_slot(self, req: Request) -> _Slot | None:
        if req.id_slot >= 0:
            s = self.slots[req.id_slot]
            return None if s.busy else s
        free = [s for s in self.slots if not s.busy]
        if not free:
            return None
        # llama-server: the free slot whose cache shares the longest prefix, else the least recently used
        best = max(free, key=lambda s: (_common(s.cache, req.prompt), -s.t_last_use))
        return best if _common(best.cache, req.prompt) else min(free, key=lambda s: s.t_last_use)

    def _start(self, slot: _Slot, job: Job) -> None:
        req = job.req
        n_keep = _common(slot.cache, req.prompt) if req.cache_prompt else 0
        n_keep = min(n_keep, len(req.prompt) - 1)  # the last prompt token is decoded again for its logits
        mem = llama_cpp.llama_get_memory(self.ctx)
        if not llama_cpp.llama_memory_seq_rm(mem, slot.id, n_keep, -1):
            llama_cpp.llama_memory_seq_rm(mem, slot.id, -1, -1)
            n_keep = 0
        slot.cache = list(req.prompt[:n_keep])
        slot.pending = list(req.prompt[n_keep:])
        slot.n_cached = n_keep
        slot.job = job
        slot.chain = sampler_chain(req, self.vocab, self.n_vocab, self.eog)
        slot.out_tokens, slot.text, slot.sent = [], "", 0
        slot.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        slot.t_start, slot.t_prompt, slot.truncated = time.perf_counter(), 0.0, False
        self.stats["requests"] += 1
        if req.return_progress:
            job.put(Progress(len(req.prompt), n_keep, n_keep, 0.0))

    def _step(self) -> None:
        b = self.batch
        b.n_tokens = 0
        rows: list[tuple[_Slot, int]] = []   # slots that sample from this step, and their logits row

        def add(tok: int, pos: int, seq: int, logits: bool) -> None:
            i = b.n_tokens
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
            b.n_tokens = i + 1

        for s in self.slots:  # cancelled requests free their slot first
            if s.job and s.job.cancelled:
                self._release(s)
        gen = [s for s in self.slots if s.busy and not s.pending]
        for s in gen:
            add(s.out_tokens[-1], len(s.cache), s.id, True)
            rows.append((s, b.n_tokens - 1))
        room = self.n_batch - b.n_tokens
        prompting = []
        for s in self.slots:
            if s.busy and s.pending and room > 0:
                take = s.pending[:room]
                for j, tok in enumerate(take):
                    last = j == len(take) - 1 and len(take) == len(s.pending)
                    add(tok, len(s.cache) + j, s.id, last)
                    if last:
                        rows.append((s, b.n_tokens - 1))
                room -= len(take)
                prompting.append((s, len(take)))
        if b.n_tokens == 0:
            return
        t0 = time.perf_counter()
        try:
            self.llm.decode_batch(b)  # the runtime's hooks: router tap, scheduler, swaps
        except ContextFull:
            # no room left in the KV cache (slots sharing a unified cache): every sequence in flight
            # is dropped, as llama-server does, and says why
            for s in self.slots:
                if s.job:
                    s.job.put(EngineError("Context size has been exceeded.", "server_error", 500))
                    self._release(s, keep_cache=False)
            return
        dt = time.perf_counter() - t0
        self.stats["decode_calls"] += 1
        self.stats["busy_slots_sum"] += len(gen) + len(prompting)
        for s in gen:
            s.cache.append(s.out_tokens[-1])
        for s, n in prompting:
            s.cache.extend(s.pending[:n])
            del s.pending[:n]
            if s.job.req.return_progress:
                s.job.put(Progress(len(s.job.req.prompt), s.n_cached, len(s.cache),
                                   1e3 * (time.perf_counter() - s.t_start)))
            self.stats["prompt_tokens"] += n
            self.stats["prompt_seconds"] += dt * n / b.n_tokens
        if gen:
            self.stats["predicted_seconds"] += dt * len(gen) / b.n_tokens
        now = time.perf_counter()
        for s, row in rows:
            if s.job is None:
                continue
            if not s.t_prompt:
                s.t_prompt = now
            self._sample(s, row)
        for s in self.slots:
            self.stats["n_past_max"] = max(self.stats["n_past_max"], len(s.cache))

    def _sample(self, s: _Slot, row: int) -> None:
        req = s.job.req
        if req.n_predict == 0:  # the prompt only (it is cached for the next request)
            return self._finish(s, "length", "limit", "")
        tok = llama_cpp.llama_sampler_sample(s.chain, self.ctx, row)
        lp = top = None
        if req.sampling.n_probs > 0:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
            lp, top = top_logprobs(logits, tok, req.sampling.n_probs)
        self.stats["predicted_tokens"] += 1
        if llama_cpp.llama_vocab_is_eog(self.vocab, tok) and not req.ignore_eos:
            return self._finish(s, "stop", "eos", "")
        s.out_tokens.append(tok)
        s.text += s.decoder.decode(self.piece(tok))
        text = s.text
        for w in req.stop:
            at = text.find(w, max(0, s.sent - len(w)))
            if w and at >= 0:
                self._emit(s, tok, text[:at], lp, top)
                return self._finish(s, "stop", "word", w, text[:at])
        hold = held_back(text, req.stop)
        self._emit(s, tok, text[:len(text) - hold], lp, top)
        n_pred = req.n_predict
        if n_pred >= 0 and len(s.out_tokens) >= n_pred:
            return self._finish(s, "length", "limit", "")
        if len(s.cache) + 1 >= self.n_ctx_slot:
            if not self.context_shift:
                return self._finish(s, "length", "limit", "", truncated=True)
            self._shift(s)

    def _shift(self, s: _Slot) -> None:
        """llama-server's context shift: keep the first n_keep tokens (BOS), drop half of the rest,
        and move the later half's positions down so the sequence continues."""
        n_keep = self.n_keep_bos
        n_past = len(s.cache)
        n_discard = (n_past - n_keep) // 2
        mem = llama_cpp.llama_get_memory(self.ctx)
        llama_cpp.llama_memory_seq_rm(mem, s.id, n_keep, n_keep + n_discard)
        llama_cpp.llama_memory_seq_add(mem, s.id, n_keep + n_discard, n_past, -n_discard)
        del s.cache[n_keep:n_keep + n_discard]
        s.truncated = True

    def _emit(self, s: _Slot, tok: int, upto: str, lp: float | None, top: Any) -> None:
        new = upto[s.sent:] if len(upto) > s.sent else ""
        s.sent = max(s.sent, len(upto))
        s.job.put(Token(tok, new, lp, top))

    def _finish(self, s: _Slot, reason: str, stop_type: str, word: str, text: str | None = None,
                truncated: bool = False) -> None:
        job = s.job
        if text is None:
            text = s.text + s.decoder.decode(b"", final=True)
            if len(text) > s.sent:  # release what was held back for a stop word that never came
                job.put(Token(-1, text[s.sent:]))
        now = time.perf_counter()
        n_prompt = len(job.req.prompt)
        t_prompt = (s.t_prompt or now) - s.t_start
        n_eval, n_pred = n_prompt - s.n_cached, len(s.out_tokens) + (stop_type == "eos")
        t_pred = now - (s.t_prompt or now)
        # as llama-server: the first token comes with the prompt's logits, so the generation rate is
        # over the n - 1 decode steps after it
        steps = max(n_pred - 1, 0)
        timings = {"cache_n": s.n_cached, "prompt_n": n_eval, "prompt_ms": 1e3 * t_prompt,
                   "prompt_per_token_ms": 1e3 * t_prompt / max(n_eval, 1),
                   "prompt_per_second": n_eval / t_prompt if t_prompt > 0 else 0.0,
                   "predicted_n": n_pred, "predicted_ms": 1e3 * t_pred,
                   "predicted_per_token_ms": 1e3 * t_pred / steps if steps and t_pred > 0 else 0.0,
                   "predicted_per_second": steps / t_pred if steps and t_pred > 0 else 0.0}
        job.put(Done(text, list(s.out_tokens), reason, stop_type, word, n_prompt, s.n_cached, n_pred,
                     truncated or s.truncated, s.id, timings))
        self._release(s)

    def _release(self, s: _Slot, keep_cache: bool = True) -> None:
        if s.chain is not None:
            llama_cpp.llama_sampler_free(s.chain)
            s.chain = None
        if not keep_cache:
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), s.id, -1, -1)
            s.cache = []
        s.job, s.pending = None, []
        s.t_last_use = time.perf_counter()


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
