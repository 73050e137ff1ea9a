"""Ollama's REST API on `swapmoe serve`, driven by the official `ollama` client (and raw HTTP where the
client cannot say it), against a real server on a loopback port serving the stories MoE."""
from __future__ import annotations

import json

import ollama
import pytest

from conftest import Serving, http

GREEDY = {"temperature": 0, "num_predict": 12}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now",
    "parameters": {"type": "object", "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["unit"]}}}



@pytest.fixture(scope="module")
def server(stories_moe):
    s = Serving(str(stories_moe), "--experts-per-layer", "2", "-c", "4096", "-np", "2", "-a", "stories")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=60)


def test_list_show_ps_version(client, server):
    models = client.list().models
    assert [m.model for m in models] == ["stories:latest"]
    m = models[0]
    assert m.size > 0 and len(m.digest) == 64 and m.modified_at is not None
    assert m.details.format == "gguf" and m.details.family == "llama" and m.details.parameter_size.endswith("K")
    assert m.details.quantization_level
    info = client.show("stories:latest")
    assert info.details.family == "llama" and "completion" in info.capabilities and "tools" in info.capabilities
    assert info.modelinfo["general.architecture"] == "llama" and info.modelinfo["llama.expert_count"] == 4
    assert info.modelinfo["tokenizer.ggml.tokens"] == []  # big arrays are left out, as Ollama does
    assert "temperature" in info.parameters and info.modelfile.startswith("#") and info.template
    ps = client.ps().models
    assert ps[0].model == "stories:latest" and 0 < ps[0].size and ps[0].context_length == 2048
    assert http("GET", server.url + "/api/version").json()["version"]
    assert http("HEAD", server.url + "/api/tags").status == 200


def test_chat_non_streaming_and_streaming_agree(client):
    msgs = [{"role": "user", "content": "Once upon a time"}]
    r = client.chat(model="stories:latest", messages=msgs, options=GREEDY)
    assert r.done and r.message.role == "assistant" and r.message.content
    assert r.done_reason == "length" and r.eval_count == 12 and r.prompt_eval_count > 0
    assert r.total_duration > 0 and r.eval_duration > 0 and r.prompt_eval_duration > 0
    parts = list(client.chat(model="any-name-works", messages=msgs, options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].done_reason == "length"
    assert parts[0].model == "any-name-works" and parts[-1].eval_count == 12
    assert "".join(p.message.content or "" for p in parts) == r.message.content
    # a stop word ends the answer early and is not part of it
    word = r.message.content.strip().split()[1]
    s = client.chat(model="stories:latest", messages=msgs, options={**GREEDY, "stop": [word]})
    assert s.done_reason == "stop" and word not in s.message.content


def test_generate_streaming_raw_and_context(client):
    parts = list(client.generate(model="stories:latest", prompt="Once upon a time", options=GREEDY, stream=True))
    text = "".join(p.response for p in parts)
    last = parts[-1]
    assert last.done and last.done_reason == "length" and text and last.context
    whole = client.generate(model="stories:latest", prompt="Once upon a time", options=GREEDY)
    assert whole.response == text
    raw = client.generate(model="stories:latest", prompt="Once upon a time", raw=True, options=GREEDY)
    assert raw.response and raw.context is None
    more = client.generate(model="stories:latest", prompt="Then", context=whole.context, options=GREEDY)
    assert more.done and more.prompt_eval_count > len(whole.context)
    lp = client.generate(model="stories:latest", prompt="Once upon a time", logprobs=True, top_logprobs=2,
                         options={"temperature": 0, "num_predict": 3})
    assert lp.response == "".join(x.token for x in lp.logprobs) and len(lp.logprobs) == 3
    assert all(len(x.top_logprobs) == 2 and x.top_logprobs[0].token == x.token and x.logprob <= 0
               for x in lp.logprobs)  # greedy: the chosen token is the likeliest
    # an empty prompt only loads the model
    load = client.generate(model="stories:latest")
    assert load.done and load.done_reason == "load" and load.response == ""
    assert client.chat(model="stories:latest", messages=[]).done_reason == "load"


def test_format_json(client):
    r = client.chat(model="stories:latest", messages=[{"role": "user", "content": "A story as JSON"}],
                    format="json", options={"temperature": 0, "num_predict": 64})
    text = r.message.content
    if r.done_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut short: still the beginning of an object
        assert text.lstrip().startswith("{")
    schema = {"type": "object", "properties": {"mood": {"type": "string", "enum": ["happy", "sad"]}},
              "required": ["mood"]}
    g = client.generate(model="stories:latest", prompt="Lily was", format=schema,
                        options={"temperature": 0, "num_predict": 64})
    assert g.done_reason == "stop" and json.loads(g.response)["mood"] in ("happy", "sad")


def test_tool_call_end_to_end(client, server):
    msgs = [{"role": "user", "content": "What is the weather?"}]
    # Ollama has no tool_choice: the model picks a call or an answer, and either parses
    r = client.chat(model="stories:latest", messages=msgs, tools=[WEATHER],
                    options={"temperature": 0, "num_predict": 96})
    if r.message.tool_calls:
        call = r.message.tool_calls[0].function
        assert call.name == "get_weather" and call.arguments["unit"] in ("celsius", "fahrenheit")
    else:
        assert isinstance(r.message.content, str)
    # tool_choice (an extension) forces the call; arguments come as an object
    body = {"model": "stories", "messages": msgs, "tools": [WEATHER], "tool_choice": "required", "stream": False,
            "options": {"temperature": 0, "num_predict": 96}}
    out = http("POST", server.url + "/api/chat", json=body, timeout=60).json()
    call = out["message"]["tool_calls"][0]
    assert out["done_reason"] == "stop" and out["message"]["content"] == ""
    assert call["function"]["name"] == "get_weather"
    assert call["function"]["arguments"]["unit"] in ("celsius", "fahrenheit")
    # streamed: the call arrives whole in one line before the last
    lines = [json.loads(x) for x in http("POST", server.url + "/api/chat", json={**body, "stream": True},
                                           timeout=60).text.splitlines()]
    assert lines[-1]["done"] and not lines[-1]["message"]["content"]
    assert [c["function"] for c in lines[-2]["message"]["tool_calls"]] == [call["function"]]
    # the client sends the call and its result back: the conversation goes on
    history = msgs + [{"role": "assistant", "content": "", "tool_calls": [{"function": call["function"]}]},
                      {"role": "tool", "content": "sunny, 21 degrees", "tool_name": "get_weather"}]
    after = client.chat(model="stories:latest", messages=history, tools=[WEATHER], options=GREEDY)
    assert after.done


def test_errors_have_ollama_shape(client, server):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="stories:latest", messages=[{"role": "user", "content": "hi"}],
                    options={"temperature": "hot"})
    assert e.value.status_code == 400 and "temperature" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:  # before the first line: a status, even when streaming
        list(client.generate(model="stories:latest", prompt="x", suffix="y", stream=True))
    assert e.value.status_code == 400 and "insert" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="stories:latest", messages=[{"role": "user", "content": "hi"}], think=True)
    assert e.value.status_code == 400 and "thinking" in e.value.error
    for path, body, status in [("/api/chat", b"{not json", 400), ("/api/chat", b'{"messages": "hi"}', 400),
                               ("/api/generate", b'{"prompt": "x", "format": "xml"}', 400),
                               ("/api/generate", b'{"prompt": "x", "context": [1000000]}', 400),
                               ("/api/show", b"{}", 400), ("/api/embed", b'{"input": "x"}', 501)]:
        r = http("POST", server.url + path, content=body, headers={"content-type": "application/json"})
        assert r.status == status, (path, r.text)
        assert isinstance(r.json()["error"], str) and r.json()["error"]
    assert http("GET", server.url + "/health").status == 200
