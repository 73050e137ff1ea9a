"""The slot model on a real non-host device: ggml's RPC backend, servers on 127.0.0.1.

Each server is `swapmoe rpc-server` in a child process (killed by the fixture's finalizer); each
client is tests/rpc_client.py in a child process (ggml keeps RPC devices registered for the life of
a process, and llama.cpp's client aborts its process when a server dies). Without an RPC-enabled
llama-cpp-python these tests skip, naming .ci/llama-build; with CI set they fail instead.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import psutil
import pytest

from conftest import run_cli

CLIENT = Path(__file__).with_name("rpc_client.py")


def _need_rpc() -> None:
    from swapmoe_gguf.llamacpp.devices import rpc_missing_reason

    why = rpc_missing_reason()
    if why:
        msg = f"no RPC backend: {why}. Build it with .ci/llama-build (CMAKE_ARGS=-DGGML_RPC=ON)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, port: int):
        self.port, self.endpoint = port, f"127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "swapmoe_gguf", "rpc-server", "-p", str(port), "-t", "1"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(120):  # bounded: 30 s
            if self.proc.poll() is not None:
                raise RuntimeError(f"rpc-server exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.25)
        self.kill()
        raise RuntimeError(f"rpc-server on port {port} did not listen within 30 s")

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        if self.proc.returncode is None or not hasattr(self, "stderr"):
            self.stdout, self.stderr = self.proc.communicate(timeout=30)


@pytest.fixture
def servers() -> Iterator[Callable[[], Server]]:
    """Start rpc-servers on free loopback ports; every one is killed at the end of the test."""
    _need_rpc()
    started: list[Server] = []

    def start() -> Server:
        started.append(Server(_free_port()))
        return started[-1]

    try:
        yield start
    finally:
        for s in started:
            s.kill()


def client(tmp_path: Path, scenario: str, *args: str, timeout: float = 300) -> dict[str, np.ndarray]:
    out = tmp_path / f"{scenario}-{len(list(tmp_path.iterdir()))}.npz"
    r = subprocess.run([sys.executable, str(CLIENT), scenario, "--out", str(out), *args], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(out) as z:
        res = {k: z[k] for k in z.files}
    import swapmoe_gguf

    # the child imported the same tree as this session (two editable installs can shadow each other)
    assert str(res["package"]) == swapmoe_gguf.__file__, (str(res["package"]), swapmoe_gguf.__file__)
    return res


def test_full_on_rpc_equals_cpu_at_every_position(servers, tmp_path):
    srv = servers()
    cpu = client(tmp_path, "full")
    dev = client(tmp_path, "full", "--rpc", srv.endpoint, "--ngl", "99")
    assert cpu["logits"].shape == dev["logits"].shape and cpu["logits"].shape[0] > 10
    # bit for bit: the RPC server computes with the same ggml-cpu kernels, in the same graph order
    assert np.array_equal(cpu["logits"], dev["logits"])
    placed = json.loads(str(dev["device_bytes"]))
    assert list(placed) == [f"RPC0[{srv.endpoint}]"] and placed[f"RPC0[{srv.endpoint}]"] > 1 << 20
    # -ngl 3: the last 2 of 6 layers and the output on the device, the rest (and their slots) on the host
    part = client(tmp_path, "full", "--rpc", srv.endpoint, "--ngl", "3")
    assert np.array_equal(cpu["logits"], part["logits"])
    assert str(part["slot_buffer"]) == "CPU"  # the first expert tensor belongs to layer 0
    assert 0 < json.loads(str(part["device_bytes"]))[f"RPC0[{srv.endpoint}]"] < placed[f"RPC0[{srv.endpoint}]"] / 2


def test_cpu_moe_keeps_the_slots_on_the_host(servers, tmp_path):
    srv = servers()
    cpu = client(tmp_path, "full")
    dev = client(tmp_path, "full", "--rpc", srv.endpoint, "--ngl", "99")
    moe = client(tmp_path, "full", "--rpc", srv.endpoint, "--ngl", "99", "--cpu-moe")
    assert str(dev["slot_buffer"]).startswith("RPC0[") and str(moe["slot_buffer"]) == "CPU"
    on_dev = lambda r: sum(json.loads(str(r["device_bytes"])).values())  # noqa: E731
    assert 0 < on_dev(moe) < on_dev(dev) / 2  # the experts are most of this model
    assert np.array_equal(cpu["logits"], moe["logits"])


def test_swaps_through_rpc_equal_a_fresh_build(servers, tmp_path):
    srv = servers()
    r = client(tmp_path, "swap", "--rpc", srv.endpoint, "--ngl", "99")
    assert str(r["slot_buffer"]).startswith("RPC0[")  # the slots live on the device, swaps write there
    assert np.array_equal(r["swapped"], r["fresh"])


def test_policies_on_rpc(servers, tmp_path):
    srv = servers()
    r = client(tmp_path, "policies", "--rpc", srv.endpoint, "--ngl", "99")
    # exact at S=4 < n: the suite's criterion (greedy tokens equal full's) and logits within 4e-3
    # (experts missing from the slots are summed in another order than the full graph's)
    assert r["exact_tokens"].tolist() == r["full_tokens"].tolist()
    assert np.abs(r["exact_logits"] - r["full_logits"]).max() < 4e-3
    assert int(r["exact_swaps"]) > 0
    assert len(r["swapmoe_tokens"]) == 16 and len(r["static_tokens"]) == 16 and int(r["static_swaps"]) == 0


def test_router_tap_on_rpc_reads_the_device_once_per_flush(servers, tmp_path):
    """On the device the graph writes each layer's router input into a capture area in the device's
    memory (read once per flush, no per-layer synchronisation): swapmoe makes the CPU's swaps and
    gives its logits bit for bit, and scores agree to float rounding."""
    srv = servers()
    dev = client(tmp_path, "tap", "--rpc", srv.endpoint, "--ngl", "99")
    cpu = client(tmp_path, "tap")
    assert int(dev["device_areas"]) == 1 and int(cpu["device_areas"]) == 0
    assert int(dev["redirected"]) > 0 and int(dev["kernel_flushes"]) > 0
    assert len(cpu["swaps"]) > 0 and np.array_equal(dev["swaps"], cpu["swaps"])
    assert np.array_equal(dev["logits"], cpu["logits"])
    np.testing.assert_allclose(dev["scores"], cpu["scores"], rtol=1e-6)


def test_rpc_server_memory_stays_within_vram_budget(servers, tmp_path):
    srv = servers()
    before = srv.rss()
    budget = 48 << 20
    p = subprocess.Popen([sys.executable, str(CLIENT), "full", "--out", str(tmp_path / "v.npz"), "--rpc", srv.endpoint,
                          "--ngl", "99", "--vram-budget", "48MiB", "--hold", "--policy", "exact"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == "READY", p.stderr.read()  # type: ignore[union-attr]
        used = srv.rss() - before
        p.stdin.write("\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
        assert p.wait(timeout=120) == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)
    with np.load(tmp_path / "v.npz") as z:
        assert int(z["vram_budget_bytes"]) == budget
        weights = sum(json.loads(str(z["device_bytes"])).values())
        slots = int(z["slots"])
    assert 4 <= slots < 32  # the budget lowered S (all 32 experts need more than 48 MiB here)
    assert 0 < weights <= used <= budget, (weights, used, budget)


def test_exact_misses_computed_on_the_cpu_instead_of_uploaded(servers, tmp_path):
    """Slots on a device and the profile saying the CPU is faster for one token: `exact`'s decode
    steps compute missing experts on the CPU (from RAM) and upload nothing, with the full model's
    greedy tokens either way."""
    srv = servers()
    r = client(tmp_path, "cpu_misses", "--rpc", srv.endpoint, "--ngl", "99")
    assert r["tokens_0"].tolist() == r["full_tokens"].tolist() == r["tokens_1"].tolist()
    assert int(r["swaps_0"]) > 0 and int(r["streamed_0"]) == 0
    assert int(r["swaps_1"]) == 0 and int(r["streamed_1"]) > 0


def test_a_live_budget_change_stays_within_vram_budget(servers, tmp_path):
    """set_budget (the server's live knob) lowers S to what --vram-budget admits, and refuses an
    explicit S above it in one line, keeping the old one."""
    srv = servers()
    r = client(tmp_path, "rebudget", "--rpc", srv.endpoint, "--ngl", "99", "--vram-budget", "48MiB")
    cap = int(r["cap"])
    assert 4 <= cap < 32
    assert int(r["after_host_100"]) == cap  # the host budget alone would admit all 32
    assert f"admits at most {cap} on the device" in str(r["refused"])
    assert int(r["after_refusal"]) == cap


def test_vram_budget_too_small_says_which_part_and_by_how_much(servers):
    srv = servers()
    r = run_cli("chat", "--rpc", srv.endpoint, "-ngl", "99", "--vram-budget", "1MiB", "-p", "hi", timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--vram-budget 1.0 MiB is" in r.stderr and "short" in r.stderr and "KV cache" in r.stderr


def test_two_servers_with_a_tensor_split_give_the_same_logits(servers, tmp_path):
    a, b = servers(), servers()
    cpu = client(tmp_path, "full")
    both = f"{a.endpoint},{b.endpoint}"
    for split in ("1,1", "3,1"):
        dev = client(tmp_path, "full", "--rpc", both, "--ngl", "99", "--tensor-split", split)
        assert np.array_equal(cpu["logits"], dev["logits"]), split
        placed = json.loads(str(dev["device_bytes"]))
        # buffer types are named by the server's device and endpoint: both servers hold layers
        assert set(placed) == {f"RPC0[{a.endpoint}]", f"RPC0[{b.endpoint}]"}, placed
    assert placed[f"RPC0[{a.endpoint}]"] > 2 * placed[f"RPC0[{b.endpoint}]"]  # 3,1: most layers on the first


def test_server_killed_mid_request_gives_one_clear_error(servers, tmp_path):
    srv = servers()
    p = subprocess.Popen([sys.executable, str(CLIENT), "generate", "--out", str(tmp_path / "g.npz"), "--rpc",
                          srv.endpoint, "--ngl", "99", "--ctx", "4096"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "STARTED"  # type: ignore[union-attr]
        srv.kill()
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=30)
    from swapmoe_gguf.llamacpp.devices import EXIT_DEVICE_LOST

    assert p.returncode == EXIT_DEVICE_LOST, (p.returncode, err[-2000:])
    assert "FINISHED" not in out and not (tmp_path / "g.npz").exists()  # nothing written half-done
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("swapmoe: error: llama.cpp stopped") and srv.endpoint in lines[-1]
    assert not any("Traceback" in ln or "backtrace" in ln.lower() for ln in lines)
    # a new server on the same port serves a new client correctly
    again = Server(srv.port)
    try:
        dev = client(tmp_path, "full", "--rpc", again.endpoint, "--ngl", "99")
    finally:
        again.kill()
    assert np.array_equal(client(tmp_path, "full")["logits"], dev["logits"])


@pytest.mark.parametrize("args,expect", [
    (["--rpc", "127.0.0.1:1", "-ngl", "99"], "is not reachable"),
    (["--rpc", "localhost", "-ngl", "99"], "expected HOST:PORT"),
    (["--rpc", "127.0.0.1:5,127.0.0.1:5", "-ngl", "99"], "named twice"),
    (["-ot", "exps=NOPE"], "unknown buffer type 'NOPE'"),
    (["-ot", "exps"], "expected <tensor name regex>=<buffer type>"),
    (["--n-cpu-moe", "-1"], "--n-cpu-moe"),
    (["--tensor-split", "a,b"], "--tensor-split"),
    (["--vram-budget", "1GiB"], "nothing is offloaded"),
])
def test_bad_device_flags_are_one_line(args, expect):
    _need_rpc()
    r = run_cli("chat", *args, "-p", "hi", timeout=120)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_rpc_server_flags_and_warning(servers):
    r = run_cli("rpc-server", "-p", "0", timeout=60)
    assert r.returncode == 2 and "--port in 1..65535" in r.stderr
    srv = servers()
    srv.kill()
    assert "RPC has no authentication" in srv.stderr and "Starting RPC server" in srv.stdout


def test_inspect_lists_the_devices(tiny_gguf):
    r = run_cli("inspect", tiny_gguf, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "devices llama.cpp sees:" in r.stdout and "CPU:" in r.stdout


def test_one_ggml_is_loaded():
    """ggml.py opens the sonames libllama links against: one copy of each ggml library is mapped
    (a second libggml would have its own device registry, invisible to llama.cpp)."""
    from swapmoe_gguf.llamacpp.devices import list_devices
    from swapmoe_gguf.llamacpp.expert_compute import ExpertFFN  # noqa: F401  (opens libggml-cpu)
    from swapmoe_gguf.llamacpp.repack import repack_buft

    repack_buft()
    assert any(d.type == "CPU" for d in list_devices())
    maps = [ln.split()[-1] for ln in Path("/proc/self/maps").read_text().splitlines() if "libggml" in ln]
    names = {Path(m).name.split(".so")[0] for m in maps}
    for name in names:
        assert len({m for m in maps if Path(m).name.split(".so")[0] == name}) == 1, sorted(set(maps))


def test_missing_rpc_skips_naming_the_build_and_fails_under_ci(monkeypatch):
    import swapmoe_gguf.llamacpp.devices as devices

    monkeypatch.setattr(devices, "rpc_missing_reason", lambda: "no libggml-rpc here")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"\.ci/llama-build"):
        _need_rpc()
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="no libggml-rpc here"):
        _need_rpc()


def test_device_budget_names_the_part_over_and_by_how_much():
    from swapmoe_gguf.residency.budget import Budget, BudgetError
    from swapmoe_gguf.residency.device_budget import DevicePlan, fit_device, offloaded_layers

    assert list(offloaded_layers(4, 99)) == [0, 1, 2, 3] and list(offloaded_layers(4, 2)) == [3]  # output counts
    assert list(offloaded_layers(4, -1)) == [0, 1, 2, 3] and list(offloaded_layers(4, 0)) == []
    mib = 1 << 20
    plan = DevicePlan(weights=10 * mib, kv_cache=2 * mib, compute=4 * mib, per_slot=1 * mib, slots=8)
    fitted = fit_device(plan, Budget(nbytes=21 * mib), total_device=100 * mib, top_k=2, n_expert=8,
                        experts_per_layer=None)
    assert fitted.slots == 5 and fitted.limit == 21 * mib
    assert fit_device(plan, Budget(percent=50), total_device=100 * mib, top_k=2, n_expert=8,
                      experts_per_layer=None).slots == 8
    with pytest.raises(BudgetError, match=r"--vram-budget 15.0 MiB is 3.0 MiB short \(weights, KV cache and compute"):
        fit_device(plan, Budget(nbytes=15 * mib), total_device=100 * mib, top_k=2, n_expert=8, experts_per_layer=None)
    with pytest.raises(BudgetError, match=r"1.0 MiB short \(the 2 experts per layer top-k needs"):
        fit_device(plan, Budget(nbytes=17 * mib), total_device=100 * mib, top_k=2, n_expert=8, experts_per_layer=None)
    with pytest.raises(BudgetError, match=r"--experts-per-layer 7 needs 23.0 MiB on the device, 2.0 MiB over"):
        fit_device(plan, Budget(nbytes=21 * mib), total_device=100 * mib, top_k=2, n_expert=8, experts_per_layer=7)
