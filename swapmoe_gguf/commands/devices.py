"""`swapmoe rpc-server`, and the devices llama.cpp sees as `inspect` and `plan` print them."""
from __future__ import annotations

import sys
import threading
from typing import Any

from ..base.errors import SwapMoEError
from ..llamacpp import devices
from .inspect import fmt_bytes

AUTH_WARNING = ("RPC has no authentication: anyone who can reach this port can run computations and read or "
                "write this server's memory; bind 127.0.0.1 (the default) or a trusted network only")


def device_rows() -> list[dict[str, Any]]:
    """The devices in llama.cpp's registry, as JSON-able rows."""
    rows = [{"name": d.name, "description": d.description, "type": d.type, "free_bytes": d.free,
             "total_bytes": d.total} for d in devices.list_devices()]
    return rows


def render_devices(rows: list[dict[str, Any]]) -> str:
    lines = ["devices llama.cpp sees:"]
    lines += [f"  {r['name']}: {r['description']} ({r['type']}, {fmt_bytes(r['total_bytes'])}, "
              f"{fmt_bytes(r['free_bytes'])} free)" for r in rows]
    why = devices.rpc_missing_reason()
    lines.append("  RPC: " + ("available (--rpc HOST:PORT, swapmoe rpc-server)" if why is None else f"no: {why}"))
    return "\n".join(lines)


def register_rpc(rpc: str | None) -> None:
    if rpc:
        devices.add_rpc_servers(rpc)


def run_rpc_server(*, host: str, port: int, threads: int, cache: bool, devices_csv: str | None = None) -> int:
    """Serve until interrupted. The server runs in ggml's C loop on a daemon thread, so that Ctrl-C
    reaches Python (a ctypes call does not return to the interpreter until it ends)."""
    names = [x.strip() for x in (devices_csv or "").split(",") if x.strip()]
    if not 0 < port < 65536 or threads < 0:
        raise SwapMoEError(f"rpc-server: need --port in 1..65535 and --threads >= 0, got {port} and {threads}")
    why = devices.rpc_missing_reason()
    if why:
        raise SwapMoEError(f"rpc-server: {why}")
    cache_dir = devices.llama_rpc_cache_dir() if cache else None
    print(f"swapmoe rpc-server: {AUTH_WARNING}", file=sys.stderr, flush=True)
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            devices.serve_rpc(host, port, threads=threads or None, cache_dir=cache_dir, devices=names or None)
        except BaseException as e:  # reported by the main thread
            failed.append(e)

    t = threading.Thread(target=serve, name="rpc-server", daemon=True)
    t.start()
    try:
        while t.is_alive():
            t.join(0.5)
    except KeyboardInterrupt:
        print("swapmoe rpc-server: stopped", file=sys.stderr)
        return 0
    if failed:
        raise SwapMoEError(f"rpc-server: {failed[0]}")
    return 1
