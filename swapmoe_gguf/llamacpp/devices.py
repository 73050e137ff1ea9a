"""ggml's devices as llama.cpp sees them: listing, memory, RPC servers (serve one, register remote ones).

Everything goes through the ggml registry of the `libggml.so.0` that `libllama` links against
(`ggml.shared_lib`), so a device registered here is the one llama.cpp offloads to. The RPC backend
is compiled into that library when llama-cpp-python was built with `-DGGML_RPC=ON`
(`libggml-rpc.so.0` next to it); its entry points are reached through the registry's
`ggml_backend_reg_get_proc_address`, as llama.cpp's own `--rpc` does (common/arg.cpp,
`add_rpc_devices`).

llama.cpp's RPC client aborts the process when a server cannot be reached or dies mid-request
(`GGML_ABORT`, ggml-rpc.cpp). So endpoints are checked with a plain TCP connect before they are
registered (a refused or unreachable server is one `DeviceError`), and once RPC devices are in use
an abort callback replaces ggml's backtrace with one line naming the servers, then ends the process
with `EXIT_DEVICE_LOST` (nothing in this process writes files in place: outputs are atomic).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from ..base.errors import SwapMoEError
from .ggml import ggml, shared_lib

log = logging.getLogger(__name__)

DEVICE_TYPES = ("CPU", "GPU", "IGPU", "ACCEL", "META")  # enum ggml_backend_dev_type, in order
EXIT_DEVICE_LOST = 3  # the process exit status after llama.cpp aborted on a lost RPC server
RPC_DEFAULT_PORT = 50052  # llama.cpp's rpc-server default


class DeviceError(SwapMoEError):
    pass


@dataclass(frozen=True)
class Device:
    """One ggml device: `free`/`total` as the device reports them (for an RPC device: the remote
    device's, over the wire; for a CPU device: the host's RAM)."""

    name: str         # "CPU", "RPC0", "CUDA0", ...
    description: str  # the CPU's model name, an RPC server's endpoint, a GPU's name
    type: str         # one of DEVICE_TYPES
    free: int
    total: int
    handle: int       # ggml_backend_dev_t

    @property
    def is_host(self) -> bool:
        return self.type == "CPU"


class _Backend:
    """The registry functions of libggml, bound once per process (`backend()`); dlsym on its handle
    also finds what it takes from libggml-base (device names and memory, the abort callback)."""

    def __init__(self) -> None:
        self.lib = lib = shared_lib(ggml().libdir, "libggml")
        p, sz, cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
        sig: dict[str, tuple[Any, list[Any]]] = {
            "ggml_backend_dev_count": (sz, []),
            "ggml_backend_dev_get": (p, [sz]),
            "ggml_backend_dev_by_name": (p, [cp]),
            "ggml_backend_dev_name": (cp, [p]),
            "ggml_backend_dev_description": (cp, [p]),
            "ggml_backend_dev_type": (ctypes.c_int, [p]),
            "ggml_backend_dev_memory": (None, [p, ctypes.POINTER(sz), ctypes.POINTER(sz)]),
            "ggml_backend_dev_buffer_type": (p, [p]),
            "ggml_backend_buft_get_device": (p, [p]),
            "ggml_backend_reg_by_name": (p, [cp]),
            "ggml_backend_reg_count": (sz, []),
            "ggml_backend_reg_get": (p, [sz]),
            "ggml_backend_reg_get_proc_address": (p, [p, cp]),
            "ggml_backend_register": (None, [p]),
            "ggml_backend_reg_dev_count": (sz, [p]),
            "ggml_backend_reg_dev_get": (p, [p, sz]),
            "ggml_set_abort_callback": (p, [p]),
        }
        for name, (res, args) in sig.items():
            f = getattr(lib, name)
            f.restype, f.argtypes = res, args
        self.registered: list[str] = []  # RPC endpoints registered in this process, in order
        self.lock = threading.Lock()
        self.abort_cb: Any = None  # the ctypes callback handed to ggml, kept alive

    def rpc_fn(self, name: str, proto: Any) -> Any:
        reg = self.lib.ggml_backend_reg_by_name(b"RPC")
        fn = self.lib.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None
        if not fn:
            raise DeviceError(rpc_missing_reason())
        return proto(fn)


@functools.lru_cache(maxsize=1)
def backend() -> _Backend:
    return _Backend()


def rpc_missing_reason() -> str | None:
    """Why this llama-cpp-python cannot use RPC, or None when it can."""
    libdir = ggml().libdir
    if not any((libdir / f"libggml-rpc{s}").exists() for s in (".so.0", ".so", ".dylib")):
        return (f"this llama-cpp-python has no RPC backend (no libggml-rpc in {libdir}); rebuild it with "
                "CMAKE_ARGS=\"-DGGML_RPC=ON\" pip install --no-cache-dir --force-reinstall llama-cpp-python "
                "(the repository's .ci/llama-build does this)")
    if not backend().lib.ggml_backend_reg_by_name(b"RPC"):
        return f"the ggml in {libdir} has libggml-rpc next to it but no RPC backend registered"
    return None


def _device(handle: int) -> Device:
    lib = backend().lib
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    lib.ggml_backend_dev_memory(handle, ctypes.byref(free), ctypes.byref(total))
    kind = lib.ggml_backend_dev_type(handle)
    return Device(name=(lib.ggml_backend_dev_name(handle) or b"").decode(),
                  description=(lib.ggml_backend_dev_description(handle) or b"").decode(),
                  type=DEVICE_TYPES[kind] if 0 <= kind < len(DEVICE_TYPES) else str(kind),
                  free=int(free.value), total=int(total.value), handle=int(handle))


def list_devices() -> list[Device]:
    """Every device in the registry llama.cpp uses, with its memory as it reports it now."""
    lib = backend().lib
    return [_device(lib.ggml_backend_dev_get(i)) for i in range(lib.ggml_backend_dev_count())]


def device_by_name(name: str) -> Device:
    h = backend().lib.ggml_backend_dev_by_name(name.encode())
    if not h:
        raise DeviceError(f"no ggml device named {name!r}; llama.cpp sees: "
                          f"{', '.join(d.name for d in list_devices()) or 'none'}")
    return _device(h)


def offload_devices() -> list[Device]:
    """The devices llama.cpp offloads layers to when a model names none: every non-CPU device."""
    return [d for d in list_devices() if d.type in ("GPU", "IGPU", "ACCEL", "META")
            or d.name.startswith("RPC")]


def buffer_type_device(buft: int) -> Device | None:
    """The device a buffer type allocates on (None: a host buffer type with no device)."""
    h = backend().lib.ggml_backend_buft_get_device(buft)
    return _device(h) if h else None


def buffer_types() -> dict[str, int]:
    """Name -> default buffer type of each device (what llama.cpp's `-ot PATTERN=NAME` accepts)."""
    lib = backend().lib
    out = {}
    for d in list_devices():
        buft = lib.ggml_backend_dev_buffer_type(d.handle)
        if buft:
            out[ggml().buft_name(buft)] = int(buft)
    return out


# RPC -------------------------------------------------------------------------------------------
def parse_endpoint(text: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as [ADDR]:PORT) -> (host, port); anything else is one DeviceError."""
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeviceError(f"RPC server {text!r}: expected HOST:PORT with a port in 1..65535, e.g. 127.0.0.1:50052")
    return host, int(port)


def parse_endpoints(text: str | Sequence[str]) -> list[str]:
    """--rpc's value: 'HOST:PORT[,HOST:PORT...]' (or a list of them), checked, duplicates refused."""
    items = [x.strip() for v in ([text] if isinstance(text, str) else text) for x in v.split(",") if x.strip()]
    if not items:
        raise DeviceError("--rpc: expected HOST:PORT[,HOST:PORT...], got nothing")
    seen: set[tuple[str, int]] = set()
    for it in items:
        key = parse_endpoint(it)
        if key in seen:
            raise DeviceError(f"--rpc: {it} is named twice")
        seen.add(key)
    return items


def check_reachable(endpoint: str, timeout: float = 5.0) -> None:
    """A TCP connect to the server (closed at once; the server drops such a client): llama.cpp's
    client would abort the process on a server it cannot reach, this says so in one line instead."""
    host, port = parse_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise DeviceError(f"RPC server {endpoint} is not reachable ({e.strerror or e}); start one there with "
                          f"`swapmoe rpc-server -H {host} -p {port}` (or llama.cpp's rpc-server)") from None


def add_rpc_servers(endpoints: str | Sequence[str]) -> list[Device]:
    """Register RPC servers with llama.cpp (its `--rpc`), each once per process; returns their
    devices in the order given. Later models offload to them like to any GPU (`n_gpu_layers`)."""
    eps = parse_endpoints(endpoints)
    reason = rpc_missing_reason()
    if reason:
        raise DeviceError(reason)
    b = backend()
    add = b.rpc_fn("ggml_backend_rpc_add_server", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p))
    out: list[Device] = []
    with b.lock:
        for ep in eps:
            check_reachable(ep)
            _install_abort_callback(b)
            reg = add(ep.encode())  # returns the same registry for an endpoint asked before
            if not reg:
                raise DeviceError(f"RPC server {ep}: connected, but it reports no devices")
            if ep not in b.registered:  # ggml_backend_register twice would list its devices twice
                b.lib.ggml_backend_register(reg)
                b.registered.append(ep)
                log.info("RPC server %s registered", ep)
            out += [_device(b.lib.ggml_backend_reg_dev_get(reg, i)) for i in range(b.lib.ggml_backend_reg_dev_count(reg))]
    return out


def rpc_endpoints() -> list[str]:
    """The RPC servers registered in this process."""
    return list(backend().registered)


def _install_abort_callback(b: _Backend) -> None:
    """Once: ggml's aborts (a lost RPC server among them) end the process with one line and
    EXIT_DEVICE_LOST instead of a backtrace and SIGABRT."""
    if b.abort_cb is not None:
        return
    proto = ctypes.CFUNCTYPE(None, ctypes.c_char_p)

    def on_abort(message: bytes | None) -> None:
        text = (message or b"").decode(errors="replace").strip()
        servers = ", ".join(b.registered) or "none"
        # the process is inside ggml_abort: this line replaces ggml's own stderr output
        os.write(2, (f"swapmoe: error: llama.cpp stopped ({text}); RPC servers in use: {servers}. "
                     "A server that went away ends the client: restart it, then the client\n").encode())
        os._exit(EXIT_DEVICE_LOST)

    b.abort_cb = proto(on_abort)
    b.lib.ggml_set_abort_callback(ctypes.cast(b.abort_cb, ctypes.c_void_p))


def serve_rpc(host: str = "127.0.0.1", port: int = RPC_DEFAULT_PORT, *, threads: int | None = None,
              cache_dir: str | None = None, devices: Sequence[str] | None = None) -> None:
    """Run an RPC server on this process's devices (blocks; llama.cpp's rpc-server): the first
    non-CPU devices, else the CPU, or the named `devices`. Its backends compute what clients send."""
    reason = rpc_missing_reason()
    if reason:
        raise DeviceError(reason)
    parse_endpoint(f"{host}:{port}")
    if devices:
        devs = [device_by_name(n) for n in devices]
    else:
        devs = [d for d in list_devices() if d.type not in ("CPU", "ACCEL") and not d.name.startswith("RPC")]
        devs = devs or [d for d in list_devices() if d.type == "CPU"]
    if not devs:
        raise DeviceError("no ggml device to serve")
    n = threads or max(1, (os.cpu_count() or 2) // 2)
    start = backend().rpc_fn("ggml_backend_rpc_start_server", ctypes.CFUNCTYPE(
        None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)))
    arr = (ctypes.c_void_p * len(devs))(*[d.handle for d in devs])
    log.info("RPC server on %s:%d: %s, %d threads", host, port, ", ".join(d.name for d in devs), n)
    # returns only when the server cannot start (e.g. the port is taken): it then printed why
    start(f"{host}:{port}".encode(), cache_dir.encode() if cache_dir else None, n, len(devs), arr)
    raise DeviceError(f"the RPC server on {host}:{port} stopped (port in use, or no permission to bind?)")


def llama_rpc_cache_dir() -> str:
    """llama.cpp's rpc-server `-c` folder: $LLAMA_CACHE/rpc, else the user cache's llama.cpp/rpc."""
    base = os.environ.get("LLAMA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "llama.cpp")
    path = os.path.join(base, "rpc")
    os.makedirs(path, exist_ok=True)
    return path


# placement flags (llama.cpp's -ot, --cpu-moe, --n-cpu-moe, --tensor-split) -------------------------
FFN_EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"  # common.h LLM_FFN_EXPS_REGEX


def tensor_overrides(override_tensor: Sequence[str] = (), *, cpu_moe: bool = False,
                     n_cpu_moe: int = 0) -> list[tuple[str, int]]:
    """(regex, buffer type) pairs in llama.cpp's order: `-ot PATTERN=BUFT[,...]` as given, then
    `--cpu-moe` (every layer's experts in host memory), then `--n-cpu-moe N` (the first N layers')."""
    if n_cpu_moe < 0:
        raise DeviceError(f"--n-cpu-moe: expected a layer count >= 0, got {n_cpu_moe}")
    bufts = buffer_types() if override_tensor or cpu_moe or n_cpu_moe else {}
    out: list[tuple[str, int]] = []
    for item in (x for v in override_tensor for x in v.split(",") if x.strip()):
        pattern, sep, name = item.strip().partition("=")
        if not sep or not pattern:
            raise DeviceError(f"-ot {item!r}: expected <tensor name regex>=<buffer type>, e.g. exps=CPU")
        if name not in bufts:
            raise DeviceError(f"-ot {item!r}: unknown buffer type {name!r}; available: {', '.join(bufts)}")
        out.append((pattern, bufts[name]))
    if cpu_moe:
        out.append((FFN_EXPS_REGEX, bufts["CPU"]))
    out += [(rf"blk\.{i}{FFN_EXPS_REGEX}", bufts["CPU"]) for i in range(n_cpu_moe)]
    return out


def parse_tensor_split(text: str | Sequence[float] | None) -> list[float] | None:
    """--tensor-split '3,1' (or '3/1', llama.cpp accepts both): each device's proportion of the layers."""
    if text is None or text == "":
        return None
    parts = [x for x in str(text).replace("/", ",").split(",")] if isinstance(text, str) else list(text)
    try:
        values = [float(x) for x in parts]
    except ValueError:
        raise DeviceError(f"--tensor-split {text!r}: expected proportions like 3,1") from None
    if any(v < 0 for v in values) or not any(v > 0 for v in values):
        raise DeviceError(f"--tensor-split {text!r}: proportions must be >= 0, at least one > 0")
    return values
