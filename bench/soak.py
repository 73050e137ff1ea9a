"""Soak: many concurrent clients against `swapmoe serve` on loopback, for a bounded time.

    python bench/soak.py [--model M.gguf] [--seconds 60] [--clients 12] [--memory-budget 95%]

Starts the server on a free 127.0.0.1 port, runs a mix of requests (chat, completion, streamed,
tokenize, metrics) from `--clients` threads until `--seconds` have passed, then stops everything.
Reports requests served, refused (503), failed (must be 0), p50/p99 latency and the server's peak
RSS against its budget (from /metrics).
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="swap-ready GGUF (default: the embedded default model)")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--memory-budget", default="95%")
    ap.add_argument("--experts-per-layer", default="5")
    ap.add_argument("--json", default=str(Path(__file__).parent / "out" / "soak.json"))
    a = ap.parse_args()
    if a.model is None:
        from swapmoe_gguf.converters.default_model import default_model

        a.model = str(default_model())
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    srv = subprocess.Popen([sys.executable, "-m", "swapmoe_gguf", "serve", "-m", a.model, "--port", str(port),
                            "--memory-budget", a.memory_budget, "--experts-per-layer", a.experts_per_layer,
                            "-np", "4", "--max-queue", "8", "--metrics", "-c", "1024"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        lat: list[float] = []
        counts = {"served": 0, "refused": 0, "failed": 0}
        lock = threading.Lock()
        stop_at = time.monotonic() + a.seconds

        def client(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < stop_at:
                kind = rng.choice(["chat", "completion", "stream", "tokenize", "native"])
                t0 = time.monotonic()
                if kind == "chat":
                    st, _ = _post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "Speak"}],
                                                                 "max_tokens": rng.randint(4, 48)})
                elif kind == "completion":
                    st, _ = _post(url + "/v1/completions", {"prompt": "ROMEO.\n", "max_tokens": rng.randint(4, 48)})
                elif kind == "stream":
                    st, _ = _post(url + "/v1/completions", {"prompt": "JULIET.\n", "max_tokens": 32, "stream": True})
                elif kind == "native":
                    st, _ = _post(url + "/completion", {"prompt": "KING.\n", "n_predict": 24})
                else:
                    st, _ = _post(url + "/tokenize", {"content": "To be, or not to be"})
                dt = time.monotonic() - t0
                with lock:
                    if st == 200:
                        counts["served"] += 1
                        lat.append(dt)
                    elif st == 503:
                        counts["refused"] += 1
                        time.sleep(0.2)
                    else:
                        counts["failed"] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = {l.split()[0]: float(l.split()[1]) for l in
                   urllib.request.urlopen(url + "/metrics").read().decode().splitlines() if l and l[0] != "#"}
    finally:
        srv.terminate()
        srv.wait(10)
    res = {**counts, "seconds": a.seconds, "clients": a.clients, "p50_s": round(float(np.percentile(lat, 50)), 3),
           "p99_s": round(float(np.percentile(lat, 99)), 3),
           "peak_rss_MiB": round(metrics["swapmoe_peak_resident_bytes"] / 2**20, 1),
           "budget_MiB": round(metrics["swapmoe_budget_bytes"] / 2**20, 1), "swaps": int(metrics["swapmoe_swaps_total"])}
    print(json.dumps(res))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=2))
    if counts["failed"] or res["peak_rss_MiB"] > res["budget_MiB"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
