"""`swapmoe serve`'s Anthropic Messages API (/v1/messages, /v1/messages/count_tokens), driven by the
official `anthropic` client and raw HTTP, on the 4-expert stories260K MoE. The expectations are
llama-server's (tools/server/tests/unit/test_compat_anthropic.py)."""
from __future__ import annotations

import json

import anthropic
import pytest

from conftest import Serving, http

GREEDY = {"temperature": 0}  # the client has no sampling arguments any more; llama-server reads them
WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                            "required": ["city"]}}





@pytest.fixture(scope="module")
def server(stories_moe):
    s = Serving(str(stories_moe), "--experts-per-layer", "2", "-a", "stories-moe", ctx=1024)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=60)


def test_messages(client):
    r = client.messages.create(model="any", max_tokens=12, extra_body=GREEDY,
                               messages=[{"role": "user", "content": "Once upon a time"}])
    assert r.type == "message" and r.role == "assistant" and r.model == "stories-moe"
    assert r.id.startswith("msg_")
    assert r.content and r.content[0].type == "text" and r.content[0].text
    assert r.stop_reason in ("end_turn", "max_tokens")
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 12
    assert isinstance(r.usage.cache_read_input_tokens, int)


def test_messages_raw_shape(server):
    body = {"model": "x", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Once"},
                                                      {"type": "text", "text": " upon"}]},
                         {"role": "assistant", "content": "a time"}, {"role": "user", "content": "there was"}]}
    r = http("POST", server.url + "/v1/messages", json=body, timeout=60)
    assert r.status == 200
    out = r.json()
    assert set(out) == {"id", "type", "role", "content", "model", "stop_reason", "stop_sequence", "usage"}
    assert "timings" not in out and out["stop_reason"] == "max_tokens" and out["stop_sequence"] is None
    assert set(out["usage"]) == {"cache_read_input_tokens", "input_tokens", "output_tokens"}
    assert out["usage"]["output_tokens"] == 4


def test_streaming(client, server):
    kw = dict(model="any", max_tokens=12, messages=[{"role": "user", "content": "Once upon a time"}])
    whole = client.messages.create(**kw, extra_body=GREEDY)
    with client.messages.stream(**kw, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    # the raw events, in llama-server's order
    resp = http("POST", server.url + "/v1/messages", json={**kw, **GREEDY, "stream": True}, timeout=60, stream=True)
    lines = [x.decode().rstrip("\n") for x in resp]
    resp.close()
    names = [l[7:] for l in lines if l.startswith("event: ")]
    events = [json.loads(l[6:]) for l in lines if l.startswith("data: ")]
    assert [e["type"] for e in events] == names
    assert names[0] == "message_start" and names[1] == "content_block_start"
    assert names[-4:] == ["content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    start = events[0]["message"]
    assert start["content"] == [] and start["usage"]["input_tokens"] > 0 and start["stop_reason"] is None
    assert events[1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert all(e["index"] == 0 and e["delta"]["type"] == "text_delta" for e in events[2:-3])
    assert events[-2]["delta"]["stop_reason"] in ("end_turn", "max_tokens") and events[-2]["usage"]["output_tokens"] > 0
    assert "timings" not in events[-1]


def test_system_prompt(client, server):
    msgs = [{"role": "user", "content": "Hello"}]
    plain = client.messages.count_tokens(model="any", messages=msgs).input_tokens
    assert plain > 0
    system = "You are a storyteller."
    n = client.messages.count_tokens(model="any", messages=msgs, system=system).input_tokens
    assert n > plain
    as_blocks = client.messages.count_tokens(model="any", messages=msgs,
                                             system=[{"type": "text", "text": system}]).input_tokens
    assert as_blocks == n
    r = client.messages.create(model="any", max_tokens=8, extra_body=GREEDY, system=system, messages=msgs)
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == n and r.content


def test_count_tokens_raw(server):
    r = http("POST", server.url + "/v1/messages/count_tokens",
             json={"model": "x", "messages": [{"role": "user", "content": "Hello world"}]})
    assert r.status == 200 and set(r.json()) == {"input_tokens"} and r.json()["input_tokens"] > 0


def test_tool_use_round_trip(client, server):
    ask = {"role": "user", "content": "What is the weather in Paris?"}
    r = client.messages.create(model="any", max_tokens=200, extra_body=GREEDY, tools=[WEATHER],
                               tool_choice={"type": "any"}, messages=[ask])
    assert r.stop_reason == "tool_use"
    calls = [b for b in r.content if b.type == "tool_use"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].id
    assert isinstance(calls[0].input, dict) and calls[0].input.get("city") in ("Paris", "Rome")
    # streamed: the same call as a tool_use block with input_json_delta
    with client.messages.stream(model="any", max_tokens=200, extra_body=GREEDY, tools=[WEATHER],
                                tool_choice={"type": "any"}, messages=[ask]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in final.content] == [("tool_use", "get_weather", calls[0].input)]
    # the result goes back; tool_choice none: a text reply
    history = [ask, {"role": "assistant", "content": [b.model_dump() for b in r.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id,
                                             "content": [{"type": "text", "text": "Sunny, 25 C"}]}]}]
    reply = client.messages.create(model="any", max_tokens=16, extra_body=GREEDY, tools=[WEATHER],
                                   tool_choice={"type": "none"}, messages=history)
    assert reply.stop_reason in ("end_turn", "max_tokens") and reply.content[0].type == "text"
    # without tools (llama-server's test_anthropic_tool_result): an is_error result and text are accepted too
    history[-1]["content"] = [{"type": "text", "text": "Here:"},
                              {"type": "tool_result", "tool_use_id": calls[0].id, "is_error": True,
                               "content": "City not found"}]
    assert client.messages.create(model="any", max_tokens=8, extra_body=GREEDY, messages=history).type == "message"


def test_structured_output(client):
    """Anthropic's structured outputs (output_config.format: a JSON schema) constrain the answer."""
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    r = client.messages.create(model="any", max_tokens=64, messages=[{"role": "user", "content": "Weather?"}],
                               extra_body={**GREEDY, "output_config": {"format": {"type": "json_schema",
                                                                                   "schema": schema}}})
    out = json.loads(r.content[0].text)
    assert out["city"] in ("Paris", "Rome") and isinstance(out["sunny"], bool)
    assert r.stop_reason == "end_turn"


def test_bad_requests(client, server):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="any", max_tokens=8, messages="hello")  # type: ignore[arg-type]
    assert e.value.status_code == 400
    r = http("POST", server.url + "/v1/messages", json={"model": "x", "max_tokens": 8})
    assert r.status == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "messages" in r.json()["error"]["message"]
    # llama-server is permissive: an empty conversation is answered, and max_tokens may be left out
    r = http("POST", server.url + "/v1/messages", json={"model": "x", "max_tokens": 4, "messages": []}, timeout=60)
    assert r.status == 200 and r.json()["type"] == "message"
    r = http("POST", server.url + "/v1/messages/count_tokens", json={"model": "x", "messages": []})
    assert r.status == 200
    # a text-only model refuses images with llama-server's status and message
    img = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    r = http("POST", server.url + "/v1/messages",
             json={"model": "x", "max_tokens": 4, "messages": [{"role": "user", "content": [img]}]})
    assert r.status == 500 and "image input is not supported" in r.json()["error"]["message"]
