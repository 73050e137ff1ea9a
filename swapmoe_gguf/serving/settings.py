"""One settings model for the command line and the server: model/runtime, sampling and server options.

Flag names follow llama.cpp's `llama-cli` / `llama-server` where one exists (-m, -c, -t, -ngl, -b,
-n, -s, --temp, --top-p, --top-k, --min-p, --repeat-penalty); sampling defaults are
llama-server's (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, repeat penalty 1.0).
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..runtime import SwapMoELlama


SWITCH_EVERY = 3  # `eval`/`bench`: a mixed-domain stream's requests per topic before it switches

@dataclass
class ModelSettings:
    model: str | None = None            # None: the embedded default model
    memory_budget: str | None = None
    experts_per_layer: int | None = None
    policy: str | None = None
    max_dropped_mass: float | None = None  # swapmoe's quality floor: 1 none, 0 lossless (exact); None: the plan's
    plan: str | None = None
    ctx_size: int = 0                   # 0: the model's training context, at most DEFAULT_CTX
    threads: int = 0                    # 0: half the CPUs, as llama.cpp
    n_gpu_layers: int = 0
    batch_size: int = 512
    ubatch_size: int = 0                # 0: llama.cpp's default (512)
    seed: int = -1
    no_repack: bool = False             # llama.cpp's --no-repack: keep CPU weights in their file layout
    verbose: bool = False
    # devices (llama.cpp's names): RPC servers, layer split between devices, device budget, placement
    rpc: str | None = None              # --rpc HOST:PORT[,HOST:PORT...]
    tensor_split: str | None = None     # --tensor-split 3,1
    vram_budget: str | None = None      # --vram-budget SIZE|% (of the devices' total memory)
    cpu_moe: bool = False               # --cpu-moe: every layer's experts in host memory
    n_cpu_moe: int = 0                  # --n-cpu-moe N: the first N layers' experts in host memory
    override_tensor: tuple[str, ...] = ()  # -ot PATTERN=BUFT[,...] (repeatable)
    ram_tier: str | None = None         # --ram-tier SIZE|%|0: experts kept in host RAM below the slots; None: the plan's

    def device_kwargs(self) -> dict[str, Any]:
        """SwapMoELlama's placement arguments."""
        return dict(rpc_servers=self.rpc, tensor_split=self.tensor_split, vram_budget=self.vram_budget,
                    cpu_moe=self.cpu_moe, n_cpu_moe=self.n_cpu_moe, override_tensor=tuple(self.override_tensor))

    def load(self, n_seq_max: int = 1, kv_unified: bool = False, swa_full: bool = False) -> "SwapMoELlama":
        from ..converters.default_model import default_model
        from ..runtime import SwapMoELlama

        path = self.model or str(default_model())
        threads = self.threads or max(1, (os.cpu_count() or 2) // 2)
        n_ctx = self.ctx_size or default_ctx(path)
        return SwapMoELlama(path, memory_budget=self.memory_budget, experts_per_layer=self.experts_per_layer,
                            policy=self.policy, plan=self.plan, max_dropped_mass=self.max_dropped_mass,
                            scheduler="auto",
                            n_ctx=n_ctx, n_batch=self.batch_size, n_ubatch=self.ubatch_size or 512,
                            n_seq_max=n_seq_max, kv_unified=kv_unified, swa_full=swa_full,
                            n_threads=threads, n_threads_batch=threads, n_gpu_layers=self.n_gpu_layers,
                            seed=self.seed if self.seed >= 0 else 0xFFFFFFFF, repack=not self.no_repack,
                            verbose=self.verbose, ram_tier=self.ram_tier, **self.device_kwargs())


DEFAULT_CTX = 4096


def default_ctx(path: str) -> int:
    """The context when none is given: the model's training context (past it a model degrades, and
    llama.cpp warns), at most DEFAULT_CTX (a 128K-context model would otherwise spend its memory
    budget on the KV cache). An unreadable file: DEFAULT_CTX (the runtime then says what is wrong)."""
    from ..base.errors import SwapMoEError
    from ..fileformat.reader import read_gguf

    try:
        trained = read_gguf(path).params.n_ctx_train
    except (SwapMoEError, OSError):
        return DEFAULT_CTX
    return min(DEFAULT_CTX, trained) if trained and trained > 0 else DEFAULT_CTX


@dataclass
class SamplingSettings:
    temp: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    n_predict: int = -1                 # -1: until end of text or context
    ignore_eos: bool = False

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of llama-cpp-python's create_(chat_)completion."""
        return {"temperature": self.temp, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                "repeat_penalty": self.repeat_penalty, "max_tokens": None if self.n_predict < 0 else self.n_predict}


def ram_tier(text: str) -> str:
    """argparse type of --ram-tier: checked here, so that a bad value is one line before anything loads."""
    from ..residency.budget import BudgetError, parse_ram_tier

    try:
        parse_ram_tier(text)
    except BudgetError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--ram-tier ")) from None
    return text


def dropped_mass(text: str) -> float:
    """argparse type of --max-dropped-mass: a share in [0, 1]."""
    try:
        tau = float(text)
    except ValueError:
        tau = -1.0
    if not 0.0 <= tau <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text!r}")
    return tau



@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: tuple[str, ...] = ()
    alias: str | None = None
    parallel: int = 1                   # slots: sequences generated at once (-np, llama-server's meaning)
    max_queue: int = 64                 # requests that may wait for a slot; beyond: 503
    max_body_bytes: int = 8 << 20
    cors_origins: tuple[str, ...] = ()
    retry_after_s: int = 2
    metrics: bool = False               # /metrics (llama-server: --metrics)
    slots: bool = True                  # /slots (llama-server: --slots / --no-slots)
    jinja: bool = True                  # Jinja chat templates (--jinja / --no-jinja)
    chat_template: str | None = None    # a template name (chatml, llama3, ...) or Jinja text
    chat_template_file: str | None = None
    n_predict: int = -1                 # default when a request gives none (-1: no limit)
    ui: bool = True                     # the web page at "/" (server/webui.py; --no-ui: 404)
    verbose: bool = False               # responses carry llama-server's "__verbose" object
    tags: tuple[str, ...] = ()
    reasoning: str = "auto"             # on | off | auto: the templates' enable_thinking
    sleep_idle_seconds: float = -1      # free the model after this many idle seconds (-1: never)
    context_shift: bool = False         # --context-shift: a full slot drops older tokens and goes on
    slot_save_path: str | None = None   # /slots/{id}?action=save|restore writes and reads only here


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and memory")
    g.add_argument("-m", "--model", default=None,
                   help=".gguf: swap-ready, as downloaded, or the first shard of a split set "
                        "(default: the embedded default model)")
    g.add_argument("--memory-budget", default=None, help="whole-process memory budget: 4GiB, 4G, 3000MiB, 75%%")
    g.add_argument("--experts-per-layer", type=int, default=None, help="resident experts per layer S")
    g.add_argument("--policy", default=None, choices=("swapmoe", "static", "exact", "full"),
                   help="residency policy (default swapmoe, or the plan's)")
    g.add_argument("--max-dropped-mass", type=dropped_mass, default=None, metavar="TAU",
                   help="swapmoe's quality floor: where more than this share of the full model's expert weight "
                        "falls on non-resident experts, load them and route exactly (1: never, the default unless "
                        "a --plan picked one; 0: exact)")
    g.add_argument("--plan", default=None, help="plan JSON from `swapmoe plan`")
    g.add_argument("--ram-tier", type=ram_tier, default=None, metavar="SIZE|%|0",
                   help="keep experts not in slots in host RAM (part of --memory-budget), so that a swap reads RAM, "
                        "not disk: 2GiB, 25%% (of the model's experts) or 0 (default: the plan's, else host memory "
                        "a --vram-budget leaves over)")
    g.add_argument("-c", "--ctx-size", type=int, default=0,
                   help="context length (default 0: the model's training context, at most 4096)")
    g.add_argument("-t", "--threads", type=int, default=0, help="threads (default: half the CPUs)")
    g.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers offloaded to the GPU")
    g.add_argument("-b", "--batch-size", type=int, default=512, help="prompt batch size")
    g.add_argument("-ub", "--ubatch-size", type=int, default=0, help="physical batch size (default 512)")
    g.add_argument("-s", "--seed", type=int, default=-1, help="RNG seed (-1: random)")
    g.add_argument("-nr", "--no-repack", action="store_true",
                   help="no CPU weight repacking (Q4_0/Q4_K/IQ4_NL... stay in the file's layout)")
    add_device_args(p)


def add_device_args(p: argparse.ArgumentParser, placement: bool = True) -> None:
    """llama.cpp's device flags: --rpc, --tensor-split and (with `placement`) the device budget and
    where experts go (--vram-budget, --cpu-moe, --n-cpu-moe, -ot)."""
    g = p.add_argument_group("devices (llama.cpp flags)")
    g.add_argument("--rpc", default=None, metavar="HOST:PORT[,...]",
                   help="offload to these RPC servers (`swapmoe rpc-server` or llama.cpp's rpc-server) with -ngl; "
                        "RPC has no authentication: only on networks you trust")
    g.add_argument("-ts", "--tensor-split", default=None, metavar="N0,N1,...",
                   help="proportion of the offloaded layers on each device, e.g. 3,1 (default: by free memory)")
    if not placement:
        return
    g.add_argument("--vram-budget", default=None, metavar="SIZE|%",
                   help="device memory the model may use (weights, expert slots, KV cache, compute buffers): "
                        "4GiB, 3000MiB, or %% of the devices' total memory; S is lowered to fit")
    g.add_argument("-cmoe", "--cpu-moe", action="store_true", help="keep every layer's expert weights in host memory")
    g.add_argument("-ncmoe", "--n-cpu-moe", type=int, default=0, metavar="N",
                   help="keep the expert weights of the first N layers in host memory")
    g.add_argument("-ot", "--override-tensor", dest="override_tensor", action="append", default=[],
                   metavar="PATTERN=BUFT", help="put tensors matching the regex in this buffer type (e.g. exps=CPU)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (llama-server defaults)")
    d = SamplingSettings()
    g.add_argument("--temp", type=float, default=d.temp)
    g.add_argument("--top-p", type=float, default=d.top_p)
    g.add_argument("--top-k", type=int, default=d.top_k)
    g.add_argument("--min-p", type=float, default=d.min_p)
    g.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty)
    g.add_argument("-n", "--n-predict", type=int, default=d.n_predict, help="max tokens per answer (-1: no limit)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")


def _pick(cls: type, ns: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})


def model_settings(ns: argparse.Namespace) -> ModelSettings:
    s = _pick(ModelSettings, ns)
    s.override_tensor = tuple(s.override_tensor or ())
    s.verbose = bool(getattr(ns, "verbose", 0) and ns.verbose >= 1)  # -v: llama.cpp's own log lines too, through logging
    return s


def device_kwargs(ns: argparse.Namespace) -> dict[str, Any]:
    """SwapMoELlama's placement arguments (with n_gpu_layers) from a parser with `add_device_args`."""
    return {"n_gpu_layers": ns.n_gpu_layers, **model_settings(ns).device_kwargs()}


def sampling_settings(ns: argparse.Namespace) -> SamplingSettings:
    return _pick(SamplingSettings, ns)


# llama-server flags accepted for compatibility that change nothing here, and why
_NO_EFFECT = {
    "--cont-batching": "continuous batching is always on", "-cb": "continuous batching is always on",
    "--no-context-shift": "context shift is off unless --context-shift",
    "--no-warmup": "no warm-up run is made",
    "--backend-sampling": "sampling runs on the CPU here, with the same probabilities",
    "--backend_sampling": "sampling runs on the CPU here, with the same probabilities",
}


def add_server_args(p: argparse.ArgumentParser) -> None:
    """`swapmoe serve` takes llama-server's flag names (the ones that apply to one local model)."""
    g = p.add_argument_group("server (llama-server flags)")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    g.add_argument("--port", type=int, default=8080)
    g.add_argument("--api-key", action="append", default=None,
                   help="require this key as `Authorization: Bearer KEY` or `X-Api-Key` (repeatable, or "
                        "comma-separated); /health stays public")
    g.add_argument("-a", "--alias", default=None, help="model name reported by the API")
    g.add_argument("-np", "--parallel", type=int, default=1,
                   help="slots: sequences generated at once, batched together (default 1)")
    g.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 503")
    g.add_argument("--max-body", type=int, default=8 << 20, help="largest request body in bytes")
    g.add_argument("--cors", "--cors-origins", dest="cors", action="append", default=None, metavar="ORIGIN",
                   help="allow this CORS origin (repeatable, or comma-separated)")
    g.add_argument("--metrics", action="store_true", help="serve Prometheus metrics at /metrics")
    g.add_argument("--slots", dest="slots", action="store_true", default=True, help="serve /slots (default)")
    g.add_argument("--no-slots", dest="slots", action="store_false", help="answer /slots with 501")
    g.add_argument("--jinja", dest="jinja", action="store_true", default=True,
                   help="render chat templates with Jinja2 (default)")
    g.add_argument("--no-jinja", dest="jinja", action="store_false",
                   help="use llama.cpp's built-in template formatting")
    g.add_argument("--chat-template", default=None, help="a template name (chatml, llama3, ...) or Jinja text")
    g.add_argument("--chat-template-file", default=None, help="a Jinja chat template file")
    g.add_argument("--reasoning", choices=("on", "off", "auto"), default="auto",
                   help="thinking in chat templates that support it (off: enable_thinking = false)")
    g.add_argument("--reasoning-format", choices=("none",), default="none",
                   help="only none: thinking text stays in the answer's content (no reasoning_content split)")
    g.add_argument("--context-shift", action="store_true",
                   help="when a slot's context is full, drop the older half of its tokens and go on")
    g.add_argument("--sleep-idle-seconds", type=float, default=-1, metavar="N",
                   help="free the model after N idle seconds; the next request that needs it loads it again "
                        "(-1: never)")
    g.add_argument("--slot-save-path", default=None, metavar="DIR",
                   help="folder where /slots/{id}?action=save|restore keep slot KV caches (off by default)")
    g.add_argument("--ui", "--webui", dest="ui", action="store_true", default=True,
                   help="the web page at / (default): a chat and the Virtual Experts live")
    g.add_argument("--no-ui", "--no-webui", dest="ui", action="store_false", help="no web page at /")
    g.add_argument("--tags", default=None, help="comma-separated tags reported by /v1/models")
    g.add_argument("--verbose", dest="server_verbose", action="store_true",
                   help="responses carry llama-server's __verbose object (the prompt as formatted)")
    g.add_argument("--kv-unified", action="store_true",
                   help="one KV cache shared by all slots (each may use the whole context)")
    g.add_argument("--swa-full", action="store_true", help="full-size cache for sliding-window attention layers")
    g.add_argument("--cache-ram", type=int, default=None, metavar="MiB",
                   help="accepted, no effect: prompts are cached in each slot's KV cache only")
    for flag, why in _NO_EFFECT.items():
        g.add_argument(flag, action="append_const", const=flag, dest="no_effect", help=f"accepted: {why}")


def server_settings(ns: argparse.Namespace) -> ServerSettings:
    from ..base.errors import SwapMoEError

    import llama_cpp

    top = llama_cpp.llama_max_parallel_sequences()
    if not 0 < ns.port < 65536 or not 1 <= ns.parallel <= top or ns.max_queue < 0:
        raise SwapMoEError(f"serve: need --port in 1..65535, --parallel in 1..{top} and --max-queue >= 0, got "
                           f"{ns.port}, {ns.parallel} and {ns.max_queue}")
    if ns.slot_save_path and not os.path.isdir(ns.slot_save_path):
        raise SwapMoEError(f"serve: --slot-save-path {ns.slot_save_path} is not a folder")
    for flag in sorted(set(ns.no_effect or ())):
        logging.getLogger(__name__).info("%s: accepted, no effect (%s)", flag, _NO_EFFECT[flag])
    split = lambda vals: tuple(x.strip() for v in vals or () for x in v.split(",") if x.strip())  # noqa: E731
    return ServerSettings(host=ns.host, port=ns.port, api_key=split(ns.api_key), alias=ns.alias,
                          parallel=ns.parallel, max_queue=ns.max_queue, max_body_bytes=ns.max_body,
                          cors_origins=split(ns.cors), metrics=ns.metrics, slots=ns.slots, jinja=ns.jinja,
                          chat_template=ns.chat_template, chat_template_file=ns.chat_template_file,
                          n_predict=ns.n_predict, ui=ns.ui, verbose=ns.server_verbose,
                          tags=split([ns.tags] if ns.tags else None), reasoning=ns.reasoning,
                          slot_save_path=ns.slot_save_path, context_shift=ns.context_shift,
                          sleep_idle_seconds=ns.sleep_idle_seconds)
