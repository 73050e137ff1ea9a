"""`swapmoe serve`: the real server on a loopback port, driven by the official OpenAI client and raw HTTP."""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import openai
import pytest

from conftest import Serving, http

from conftest import run_cli




@pytest.fixture(scope="module")
def model(tiny_gguf) -> str:
    return tiny_gguf



@pytest.fixture(scope="module")
def server(model):
    # static residency: answers are a function of the request alone, so they can be compared
    s = Serving(model, "--memory-budget", "95%", "--experts-per-layer", "3", "--policy", "static", "-np", "4",
                "--max-queue", "4", "--metrics", "-a", "tiny", "-c", "1024")  # 256 tokens per slot
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed(model):
    s = Serving(model, "--api-key", "s3cret", "--experts-per-layer", "3", "--max-body", "4096", "--metrics")
    yield s
    s.stop()


def _ascii(text: str) -> str:
    return "".join(ch for ch in text if ord(ch) < 128)


def _client(s: Serving, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_client_chat_and_completions(server):
    c = _client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
                                  temperature=0)
    assert r.choices[0].message.role == "assistant" and r.model == "tiny"
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    parts = [ch.choices[0].delta.content or "" for ch in
             c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
                                       temperature=0, stream=True)]
    # greedy: stream == non-stream (random byte-level weights emit broken UTF-8, which llama-cpp-python's
    # streaming drops while the non-streamed text keeps a decoded form: compare the ASCII)
    assert _ascii("".join(parts)) == _ascii(r.choices[0].message.content)
    t = c.completions.create(model="tiny", prompt="the river", max_tokens=6, temperature=0)
    assert t.choices[0].finish_reason in ("length", "stop") and t.usage.total_tokens > 0
    st = "".join(ch.choices[0].text for ch in c.completions.create(model="tiny", prompt="the river", max_tokens=6,
                                                                   temperature=0, stream=True))
    assert _ascii(st) == _ascii(t.choices[0].text)
    # llama-server also serves the OpenAI chat and model paths without /v1 (an SDK given base_url
    # without it); its /completions without /v1 is the native completion, as here
    bare = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=60)
    assert [m.id for m in bare.models.list().data] == ["tiny"]
    r2 = bare.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
                                      temperature=0)
    assert r2.choices[0].message.content == r.choices[0].message.content
    native = http("POST", server.url + "/completions", json={"prompt": "the river", "n_predict": 6,
                                                              "temperature": 0}).json()
    assert native["content"] == t.choices[0].text and native["stop"] is True


@pytest.fixture(scope="module")
def roomy(model):
    """A context that holds the tool note (the tiny model's byte-level tokens make it ~1000 long)."""
    # static residency: the same request gives the same answer (swapmoe may change experts between them)
    s = Serving(model, "--experts-per-layer", "3", "--policy", "static", "-c", "4096", "-np", "2", "-a", "tiny")
    yield s
    s.stop()


def test_openai_client_structured_output_tools_logprobs(roomy):
    """The official openai client: a JSON-schema answer, a forced tool call sent back with its result,
    logprobs, n choices; a stream asking for n > 1 is refused."""
    c = _client(roomy)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "ok?"}], max_tokens=40,
                                  temperature=0, response_format={"type": "json_schema", "json_schema": {
                                      "name": "answer", "schema": schema}})
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)
    tools = [{"type": "function", "function": {"name": "weather", "description": "weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        "required": ["city"], "additionalProperties": False}}}]
    msgs = [{"role": "user", "content": "weather in Rome?"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, tools=tools, tool_choice="required", max_tokens=300,
                                  temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    msgs += [r.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    r2 = c.chat.completions.create(model="tiny", messages=msgs, tools=tools, max_tokens=8, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # without the prompt cache both choices are computed alike (a re-used cache evaluates the last prompt
    # token alone, whose float rounding may flip a near tie of this random model)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                  temperature=0, logprobs=True, top_logprobs=3, n=2, extra_body={"cache_prompt": False})
    assert len(r.choices) == 2 and r.choices[0].message.content == r.choices[1].message.content
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in lp)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in lp)  # greedy: the top token
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=2, stream=True)


def test_native_endpoints(server):
    u = server.url
    toks = http("POST", u + "/tokenize", json={"content": "the river"}).json()["tokens"]
    assert toks and all(isinstance(t, int) for t in toks)
    assert http("POST", u + "/detokenize", json={"tokens": toks}).json()["content"] == "the river"
    pieces = http("POST", u + "/tokenize", json={"content": "the river", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "the river"
    r = http("POST", u + "/completion", json={"prompt": "the river", "n_predict": 6, "temperature": 0}, timeout=60).json()
    assert r["stop"] is True and r["tokens_predicted"] == 6 and "predicted_per_second" in r["timings"]
    resp = http("POST", u + "/completion", json={"prompt": "the river", "n_predict": 6, "temperature": 0,
                                                  "stream": True}, timeout=60, stream=True)
    events = [json.loads(l[6:]) for l in (x.decode().strip() for x in resp) if l.startswith("data: ")]
    resp.close()
    assert events[-1]["stop"] is True and "timings" in events[-1]
    assert "".join(e["content"] for e in events) == r["content"]
    props = http("GET", u + "/props").json()
    assert props["swapmoe"]["experts_per_layer"] == 3 and props["default_generation_settings"]["params"]["repeat_penalty"] == 1.0
    m = http("GET", u + "/metrics").text
    for name in ("swapmoe_resident_bytes", "swapmoe_swaps_total", "swapmoe_bytes_read_total", "swapmoe_hit_rate",
                 "llamacpp:tokens_predicted_total"):
        assert f"\n{name} " in "\n" + m


@pytest.mark.parametrize("path,body,status,kind", [
    ("/v1/completions", b"{not json", 400, "invalid_request_error"),
    ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": "many"}).encode(), 400, "invalid_request_error"),
    ("/v1/completions", json.dumps({"prompt": "x", "temperature": "hot"}).encode(), 400, "invalid_request_error"),
    ("/v1/completions", json.dumps({"prompt": "the " * 600, "max_tokens": 4}).encode(), 400,
     "exceed_context_size_error"),
    ("/v1/chat/completions", json.dumps({"messages": []}).encode(), 400, "invalid_request_error"),
    ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), 400, "invalid_request_error"),
    ("/detokenize", json.dumps({"tokens": [10 ** 9]}).encode(), 400, "invalid_request_error"),
    ("/swapmoe/budget", json.dumps({"memory_budget": "lots"}).encode(), 400, "invalid_request_error"),
])
def test_bad_input_gets_llama_server_errors(server, path, body, status, kind):
    """llama-server's error object: {"error": {"code": HTTP status, "message", "type"}}."""
    r = http("POST", server.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"] and err["type"] == kind, err
    assert http("GET", server.url + "/health").status == 200  # still serving


def test_api_key_and_body_limit(keyed):
    u = keyed.url
    assert http("GET", u + "/health").status == 200  # open
    for path in ("/v1/models", "/metrics", "/props"):
        assert http("GET", u + path).status == 401
        assert http("GET", u + path, headers={"Authorization": "Bearer wrong"}).status == 401
    with pytest.raises(openai.AuthenticationError):
        _client(keyed, "wrong").models.list()
    assert _client(keyed, "s3cret").models.list().data
    r = http("POST", u + "/swapmoe/budget", json={"experts_per_layer": 4})
    assert r.status == 401
    ok = http("POST", u + "/swapmoe/budget", json={"experts_per_layer": 4}, headers={"Authorization": "Bearer s3cret"},
                    timeout=60)
    assert ok.status == 200 and ok.json()["experts_per_layer"] == 4
    big = http("POST", u + "/v1/completions", content=b"x" * 5000, headers={"Authorization": "Bearer s3cret"})
    assert big.status == 413 and big.json()["error"]["code"] == 413
    assert "access-control-allow-origin" not in http("OPTIONS", u + "/health").headers
    # as llama-server: /v1/health public, Anthropic's X-Api-Key header, CORS preflight without a key
    assert http("GET", u + "/v1/health").status == 200
    assert http("GET", u + "/models", headers={"X-Api-Key": "s3cret"}).status == 200
    assert http("GET", u + "/models", headers={"X-Api-Key": "wrong"}).status == 401
    assert http("OPTIONS", u + "/v1/chat/completions").status != 401


def test_budget_endpoint_changes_residency(server):
    r = http("POST", server.url + "/swapmoe/budget", json={"experts_per_layer": 2}, timeout=60)
    assert r.status == 200 and r.json()["experts_per_layer"] == 2
    assert http("GET", server.url + "/props").json()["swapmoe"]["experts_per_layer"] == 2
    c = _client(server)
    assert c.completions.create(model="tiny", prompt="the", max_tokens=4, temperature=0).choices[0].text is not None
    http("POST", server.url + "/swapmoe/budget", json={"experts_per_layer": 3}, timeout=60)


def test_client_disconnect_stops_generation(server):
    def metric(name: str) -> float:
        line = next(l for l in http("GET", server.url + "/metrics").text.splitlines() if l.startswith(name + " "))
        return float(line.split()[1])

    # the reference answer first: llama-cpp-python may run past max_tokens to finish a UTF-8 character
    ref = _client(server).completions.create(model="tiny", prompt="a", max_tokens=2, temperature=0)
    before = metric("swapmoe_client_disconnects_total")
    body = {"prompt": "the", "max_tokens": 400, "stream": True, "logit_bias": {"265": -100}}
    resp = http("POST", server.url + "/v1/completions", json=body, timeout=60, stream=True)
    for i, _ in enumerate(resp):
        if i > 6:
            break
    resp.close()  # hang up mid-stream
    resp.conn_ref.close()
    deadline = time.monotonic() + 20
    while metric("swapmoe_client_disconnects_total") <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric("swapmoe_client_disconnects_total") == before + 1
    predicted = metric("llamacpp:tokens_predicted_total")
    # the model is free again right away and the stopped stream did not run to 400 tokens
    r = _client(server).completions.create(model="tiny", prompt="a", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == ref.usage.completion_tokens and r.choices[0].text == ref.choices[0].text
    assert metric("llamacpp:tokens_predicted_total") - predicted == ref.usage.completion_tokens


def test_sixteen_concurrent_requests(server):
    prompts = [f"request number {i}" for i in range(16)]
    solo = {}
    c = _client(server)
    for p in prompts[:4]:
        solo[p] = c.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text

    def one(p: str) -> tuple[str, int, str]:
        stream = prompts.index(p) % 4 == 3  # some streamed: refused with a real 503 too
        r = http("POST", server.url + "/v1/completions", json={"prompt": p, "max_tokens": 6, "temperature": 0,
                                                                 "stream": stream}, timeout=120)
        if stream and r.status == 200:
            text = "".join(json.loads(l[6:])["choices"][0]["text"] for l in r.text.splitlines()
                           if l.startswith("data: {"))
            return p, 200, text
        return p, r.status, (r.json()["choices"][0]["text"] if r.status == 200 else r.headers.get("retry-after", ""))

    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        results = list(ex.map(one, prompts))
    assert len(results) == 16
    statuses = [s for _, s, _ in results]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 8  # 4 slots + 4 waiting at least
    for p, s, text in results:
        if s == 503:
            assert text  # Retry-After header
        elif p in solo:
            assert _ascii(text) == _ascii(solo[p])  # answers not mixed up between requests


def test_memory_stays_within_budget(server):
    m = {l.split()[0]: float(l.split()[1]) for l in http("GET", server.url + "/metrics").text.splitlines()
         if l and not l.startswith("#")}
    assert m["swapmoe_budget_bytes"] > 0
    assert m["swapmoe_peak_resident_bytes"] <= m["swapmoe_budget_bytes"]


def test_server_greedy_equals_chat_cli(server, model):
    r = _client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "tell me"}],
                                                max_tokens=10, temperature=0)
    cli = run_cli("chat", "-m", model, "--memory-budget", "95%", "--experts-per-layer", "3", "--policy", "static",
                  "-c", "512", "-t", "1",
                  "-p", "tell me",
                  "-n", "10", "--temp", "0")
    assert cli.returncode == 0, cli.stderr
    assert _ascii(cli.stdout) == _ascii(r.choices[0].message.content) + "\n"


def test_faults_while_serving(tiny_gguf, tmp_path):
    """Expert reads failing under a live server (file truncated), and a budget change during a
    generation: the server keeps answering, telemetry counts the failures, memory stays in budget."""
    import shutil
    import threading

    from swapmoe_gguf.fileformat.reader import read_gguf

    victim = tmp_path / "victim.gguf"
    shutil.copy(tiny_gguf, victim)
    s = Serving(str(victim), "--memory-budget", "95%", "--experts-per-layer", "3", "-np", "4", "--metrics")
    try:
        def metrics() -> dict[str, float]:
            return {l.split()[0]: float(l.split()[1]) for l in http("GET", s.url + "/metrics").text.splitlines()
                    if l and not l.startswith("#")}

        results: dict[str, int] = {}

        def long_stream() -> None:
            r = http("POST", s.url + "/v1/completions", json={"prompt": "the", "max_tokens": 200, "stream": True,
                                                               "logit_bias": {"265": -100}}, timeout=120)
            results["stream"] = r.status

        t = threading.Thread(target=long_stream)
        t.start()
        time.sleep(0.3)
        b = http("POST", s.url + "/swapmoe/budget", json={"experts_per_layer": 2}, timeout=120)  # between steps
        t.join()
        assert results["stream"] == 200 and b.status == 200 and b.json()["experts_per_layer"] == 2, b.text
        info = read_gguf(victim)
        os.truncate(victim, min(t.offset for t in info.layer_expert_tensors(1)))  # layers 1+ unreadable
        for i in range(12):
            r = http("POST", s.url + "/v1/completions", json={"prompt": f"line {i} of the play", "max_tokens": 16},
                     timeout=60)
            assert r.status == 200
        m = metrics()
        assert m["swapmoe_swap_failures_total"] > 0
        assert m["swapmoe_peak_resident_bytes"] <= m["swapmoe_budget_bytes"]
        assert http("GET", s.url + "/health").status == 200
    finally:
        s.stop()


def test_soak_short(tiny_gguf, tmp_path):
    """bench/soak.py in a short bounded mode: no request fails, memory stays within the budget."""
    from conftest import REPO

    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--model", tiny_gguf, "--seconds", "6",
                        "--clients", "6", "--experts-per-layer", "3", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-1000:]
    res = json.loads(out.read_text())
    assert res["failed"] == 0 and res["served"] > 10 and res["peak_rss_MiB"] <= res["budget_MiB"]


def test_sleep_frees_the_model_and_wakes_on_demand(model):
    """--sleep-idle-seconds: an idle server frees its model (RSS drops), answers /props and /metrics
    without loading it, and loads it again for the next generation, which answers as before."""
    s = Serving(model, "--experts-per-layer", "3", "--policy", "static", "--metrics", "--sleep-idle-seconds", "1")
    try:
        def metric(name: str) -> float:
            return next(float(l.split()[1]) for l in http("GET", s.url + "/metrics").text.splitlines()
                        if l.startswith(name + " "))

        ask = {"prompt": "the river", "n_predict": 6, "temperature": 0}
        first = http("POST", s.url + "/completion", json=ask).json()["content"]
        awake_rss = metric("swapmoe_resident_bytes")
        for _ in range(60):
            if http("GET", s.url + "/props").json()["is_sleeping"]:
                break
            time.sleep(0.1)
        assert http("GET", s.url + "/props").json()["is_sleeping"]
        assert metric("swapmoe_resident_bytes") < awake_rss - (2 << 20)  # the model's memory is given back
        assert metric("llamacpp:tokens_predicted_total") == 6 and http("GET", s.url + "/props").json()["is_sleeping"]
        again = http("POST", s.url + "/completion", json=ask).json()["content"]
        assert again == first and not http("GET", s.url + "/props").json()["is_sleeping"]
        assert metric("llamacpp:tokens_predicted_total") == 12
    finally:
        s.stop()


def test_vertex_ai_predict_route(model):
    """AIP_MODE=PREDICTION: Vertex AI's /predict runs each instance through the route its
    @requestFormat names (camelCase alias or path), as llama-server does."""
    s = Serving(model, "--experts-per-layer", "3", "--policy", "static", "-np", "2",
                env={"AIP_MODE": "PREDICTION", "AIP_HEALTH_ROUTE": "/vertex-health"})
    try:
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
        r = http("POST", s.url + "/predict", json={"instances": [
            {"@requestFormat": "chatCompletions", **chat, "stream": True},
            {"@requestFormat": "/completion", "prompt": "the river", "n_predict": 3},
            {"@requestFormat": "nowhere"}, "not an object"]})
        assert r.status == 200, r.text
        p = r.json()["predictions"]
        direct = http("POST", s.url + "/v1/chat/completions", json=chat).json()
        assert p[0]["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
        assert p[1]["tokens_predicted"] == 3
        assert "no handler registered" in p[2]["error"]["message"] and p[3]["error"]["code"] == 400
        assert http("POST", s.url + "/predict", json={"instances": 3}).status == 400
        assert http("GET", s.url + "/vertex-health").status == 200
    finally:
        s.stop()


def test_defaults_are_safe(model):
    """Loopback only unless told otherwise; no API route takes a file path from the client."""
    from swapmoe_gguf.commands.cli import build_parser
    from swapmoe_gguf.runtime import SwapMoELlama
    from swapmoe_gguf.serving.server import ServerSettings, create_app

    a = build_parser().parse_args(["serve"])
    assert a.host == "127.0.0.1" and a.api_key is None and a.parallel == 1 and not a.metrics
    assert ServerSettings().host == "127.0.0.1"
    llm = SwapMoELlama(model, experts_per_layer=3, n_ctx=256, verbose=False)
    try:
        app = create_app(llm)
        def walk(routes):  # type: ignore[no-untyped-def]
            for r in routes:  # FastAPI >= 0.16x keeps included routers as one entry each
                inner = getattr(r, "original_router", None)
                yield from walk(inner.routes) if inner is not None else [r]

        paths = sorted(r.path for r in walk(app.routes) if hasattr(r, "methods"))
        for p in ("/completion", "/v1/chat/completions", "/v1/messages", "/api/chat", "/swapmoe/budget", "/metrics"):
            assert p in paths
        # the one path parameter is a slot number; slot files live only in --slot-save-path
        assert [p for p in paths if "{" in p] == ["/slots/{id_slot}"]
        app.state.core.close()
    finally:
        llm.close()
