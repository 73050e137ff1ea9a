"""How a `SwapMoELlama` gets into llama-cpp-python's `Llama`: its model and eval callback.

`Llama.__init__` has no way to take a prebuilt model or an eval callback, so while it runs the two
constructors it calls are replaced (under a lock) by ones that hand over the runtime's; the
context it gets runs the runtime's hooks around each `llama_decode`.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Iterator, Protocol

import llama_cpp
from llama_cpp import _internals as internals

from ..llamacpp.router import RouterTap
from ..llamacpp.vmodel import VirtualExpertModel

_CONSTRUCT_LOCK = threading.Lock()


class Hooked(Protocol):
    """What the hooks need of the runtime (`llama.SwapMoELlama`)."""

    vmodel: VirtualExpertModel
    tap: RouterTap
    n_seq_max: int
    kv_unified: bool
    swa_full: bool

    def decode_batch(self, batch: Any, run: Callable[[], None] | None = None) -> None: ...


class HookedContext(internals.LlamaContext):
    """A LlamaContext whose decode runs the runtime's hooks around each llama_decode."""

    def __init__(self, *, runtime: Hooked, **kw: Any):
        self._runtime = weakref.ref(runtime)
        super().__init__(**kw)

    def decode(self, batch: internals.LlamaBatch) -> None:
        rt = self._runtime()
        if rt is None:
            return super().decode(batch)
        rt.decode_batch(batch.batch, lambda: super(HookedContext, self).decode(batch))


@contextlib.contextmanager
def construct_with(rt: Hooked) -> Iterator[None]:
    orig_model, orig_ctx = internals.LlamaModel, internals.LlamaContext
    vm = rt.vmodel

    def make_model(*, path_model: str, params: Any, verbose: bool) -> internals.LlamaModel:
        m = orig_model.__new__(orig_model)
        m.path_model, m.params, m.verbose = path_model, params, verbose
        m.sampler, m.custom_samplers = None, []
        m._exit_stack = contextlib.ExitStack()
        m.model, m.vocab = vm.model, llama_cpp.llama_model_get_vocab(vm.model)

        def free() -> None:
            m.model = None
            vm.close()

        m._exit_stack.callback(free)
        return m

    def make_ctx(*, model: Any, params: Any, verbose: bool) -> internals.LlamaContext:
        params.cb_eval = rt.tap.callback
        params.cb_eval_user_data = rt.tap.user_data
        params.n_seq_max = rt.n_seq_max  # parallel sequences (the server's slots); the KV cache is split
        params.kv_unified = rt.kv_unified  # ... unless one cache is shared
        params.swa_full = rt.swa_full
        return HookedContext(runtime=rt, model=model, params=params, verbose=verbose)

    with _CONSTRUCT_LOCK:
        internals.LlamaModel, internals.LlamaContext = make_model, make_ctx  # type: ignore[misc,assignment]
        try:
            yield
        finally:
            internals.LlamaModel, internals.LlamaContext = orig_model, orig_ctx  # type: ignore[misc]
