"""What flows in and out of the generation engine (engine.py): a request and its sampling
settings, the events a request produces (tokens, prompt progress, the final record), the job that
carries them between threads, and the engine's errors."""
from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed


class EngineError(Exception):
    """A request the engine refuses; `kind` is llama-server's error type."""

    def __init__(self, message: str, kind: str = "invalid_request_error", status: int = 400, **extra: Any):
        super().__init__(message)
        self.kind, self.status, self.extra = kind, status, extra


class QueueFull(EngineError):
    def __init__(self, waiting: int):
        super().__init__(f"server busy: {waiting} requests already wait for a slot", "unavailable_error", 503)


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = DEFAULT_SEED
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None
    n_probs: int = 0           # top alternatives per token (logprobs)
    min_keep: int = 0


@dataclass
class Request:
    prompt: list[int]
    n_predict: int = -1                 # -1: until end of generation or the slot's context
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    cache_prompt: bool = True
    id_slot: int = -1
    return_progress: bool = False       # Progress events while the prompt is read


@dataclass
class Token:
    id: int
    text: str                           # text released by this token (held back while it may start a stop word)
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token, logprob) of the n_probs most likely


@dataclass
class Progress:
    """How far the prompt is (llama-server's prompt_progress): tokens in total, from the cache, read."""
    total: int
    cache: int
    processed: int
    time_ms: float


@dataclass
class Done:
    text: str
    tokens: list[int]
    finish_reason: str                  # "stop" | "length"
    stop_type: str                      # "eos" | "word" | "limit"
    stopping_word: str
    n_prompt: int
    n_cached: int
    n_predicted: int
    truncated: bool
    slot: int
    timings: dict[str, float]


class Job:
    """One submitted request: its events arrive on a thread-safe queue."""

    def __init__(self, req: Request, notify: Callable[[], None] | None = None):
        self.req, self.q, self.cancelled = req, queue.SimpleQueue(), False
        self.notify = notify

    def put(self, ev: Any) -> None:
        self.q.put(ev)
        if self.notify:
            self.notify()

    def cancel(self) -> None:
        self.cancelled = True

    def events(self) -> Iterator[Any]:
        while True:
            ev = self.q.get()
            if isinstance(ev, BaseException):
                raise ev
            yield ev
            if isinstance(ev, Done):
                return
