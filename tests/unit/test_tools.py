"""Tool calling without a model: checks, the forced call's schema, parsing, streaming."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from steer.critics.schemas import StepBudget, first_error
from steer.service.errors import APIError
from steer.service.protocol import ChatCompletionRequest, Delta
from steer.service.tools import (
    ToolPlan,
    ToolStream,
    parse,
    parse_forced,
    plan_tools,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}


def request(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def refused(param: str, **fields: Any) -> APIError:
    with pytest.raises(APIError) as info:
        plan_tools(request(**fields))
    assert info.value.status == 400
    assert info.value.param == param
    return info.value


def valid(schema: dict[str, Any], value: Any) -> bool:
    return first_error(schema, value, StepBudget(10_000)) is None


# -- checks -----------------------------------------------------------------------------------


def test_no_tools_no_plan() -> None:
    assert plan_tools(request()) is None
    assert plan_tools(request(tools=[WEATHER], tool_choice="none")) is None


def test_auto_is_the_default_with_tools() -> None:
    plan = plan_tools(request(tools=[WEATHER]))
    assert plan is not None and plan.mode == "auto" and not plan.constrained
    assert plan.parallel


def test_tool_choice_without_tools() -> None:
    refused("tool_choice", tool_choice="auto")


def test_named_choice_must_be_among_tools() -> None:
    err = refused("tool_choice", tools=[WEATHER],
                  tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "get_weather" in err.message


def test_duplicate_names() -> None:
    refused("tools.1.function.name", tools=[WEATHER, WEATHER])


@pytest.mark.parametrize("schema", [
    {"type": "string"},
    {"type": "object", "properties": {"x": {"$ref": "http://example.com/s.json"}}},
    {"type": "object", "properties": {"x": {"type": "string", "pattern": "(a"}}},
    {"type": "object", "properties": {"x": {"type": 5}}},
])
def test_unsafe_or_invalid_parameters(schema: dict[str, Any]) -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": schema}}
    refused("tools.1.function.parameters", tools=[WEATHER, bad])


def test_tool_names_follow_openai() -> None:
    for name in ("has space", "x" * 65, ""):
        with pytest.raises(ValueError):
            request(tools=[{"type": "function", "function": {"name": name}}])


def test_tool_message_must_answer_a_call() -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    assert plan_tools(request(messages=history, tools=[WEATHER])) is not None
    stray = [*history, {"role": "tool", "tool_call_id": "call_2", "content": "?"}]
    refused("messages.3", messages=stray, tools=[WEATHER])
    refused("messages.1.tool_call_id",
            messages=[{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])
    refused("messages.0.tool_calls", messages=[{"role": "user", "content": "x",
                                                "tool_calls": [call]}])


# -- the forced call's schema ----------------------------------------------------------------


def test_named_call_is_constrained_to_its_arguments() -> None:
    plan = plan_tools(request(tools=[WEATHER, TIME],
                              tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert plan is not None and plan.mode == "named" and plan.name == "get_time"
    assert plan.schema == TIME["function"]["parameters"]  # type: ignore[index]


def test_named_call_without_parameters_is_any_object() -> None:
    bare = {"type": "function", "function": {"name": "ping"}}
    plan = plan_tools(request(tools=[bare],
                              tool_choice={"type": "function", "function": {"name": "ping"}}))
    assert plan is not None and plan.schema is not None
    assert valid(plan.schema, {}) and not valid(plan.schema, [])


def test_required_one_of_the_tools() -> None:
    plan = plan_tools(request(tools=[WEATHER, TIME], tool_choice="required",
                              parallel_tool_calls=False))
    assert plan is not None and plan.schema is not None and not plan.parallel
    schema = plan.schema
    assert len(schema["oneOf"]) == 2
    assert valid(schema, {"name": "get_weather", "arguments": {"city": "Paris"}})
    assert valid(schema, {"name": "get_time", "arguments": {"zone": "UTC"}})
    assert not valid(schema, {"name": "get_time", "arguments": {"city": "Paris"}})
    assert not valid(schema, {"name": "other", "arguments": {}})
    assert not valid(schema, {"name": "get_weather", "arguments": {"city": "P"}, "x": 1})


def test_required_parallel_is_a_non_empty_array() -> None:
    plan = plan_tools(request(tools=[WEATHER], tool_choice="required"))
    assert plan is not None and plan.schema is not None and plan.parallel
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert valid(plan.schema, [call, call])
    assert not valid(plan.schema, [])
    assert not valid(plan.schema, call)


class Address(BaseModel):
    city: str


class Order(BaseModel):
    to: Address
    back: Address | None = None


def test_required_moves_each_tools_definitions_to_the_root() -> None:
    # pydantic (so LangChain, instructor) writes nested models as $defs + $ref.
    tools = [{"type": "function", "function": {"name": f"ship{i}",
                                               "parameters": Order.model_json_schema()}}
             for i in range(2)]
    plan = plan_tools(request(tools=tools, tool_choice="required", parallel_tool_calls=False))
    assert plan is not None and plan.schema is not None
    schema = plan.schema
    assert set(schema["$defs"]) == {"tool0", "tool0_Address", "tool1", "tool1_Address"}
    good = {"name": "ship1", "arguments": {"to": {"city": "Oslo"}}}
    assert valid(schema, good)
    assert not valid(schema, {"name": "ship1", "arguments": {"to": {"town": "Oslo"}}})


def test_required_refuses_references_by_id() -> None:
    by_anchor = {"type": "object", "$defs": {"a": {"$anchor": "here", "type": "string"}},
                 "properties": {"x": {"$ref": "#here"}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": by_anchor}}
    assert plan_tools(request(tools=[tool])) is not None  # fine for auto
    refused("tools.0.function.parameters", tools=[tool], tool_choice="required")


def test_required_schema_too_large_together() -> None:
    big = {"type": "object", "properties": {f"p{i}": {"type": "string",
                                                      "description": "d" * 300}
                                            for i in range(150)}}
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": big}}
             for i in range(2)]
    refused("tools", tools=tools, tool_choice="required")


# -- parsing ----------------------------------------------------------------------------------


def plan_for(choice: Any, parallel: bool | None = None) -> ToolPlan:
    plan = plan_tools(request(tools=[WEATHER, TIME], tool_choice=choice,
                              parallel_tool_calls=parallel))
    assert plan is not None
    return plan


NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_parse_named() -> None:
    parsed = parse_forced(plan_for(NAMED), ' {"city": "Paris"} ')
    assert parsed.content is None
    (call,) = parsed.calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert parsed.finish_reason("stop") == "tool_calls"
    assert parsed.finish_reason("length") == "length"


def test_parse_required() -> None:
    out = '[{"name": "get_time", "arguments": {"zone": "UTC"}}, ' \
          '{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    parsed = parse_forced(plan_for("required"), out)
    assert [c.function.name for c in parsed.calls] == ["get_time", "get_weather"]
    assert json.loads(parsed.calls[1].function.arguments) == {"city": "Oslo"}
    assert len({c.id for c in parsed.calls}) == 2
    single = parse_forced(plan_for("required", parallel=False),
                          '{"name": "get_time", "arguments": {"zone": "UTC"}}')
    assert [c.function.name for c in single.calls] == ["get_time"]


def test_parse_required_cut_short_stays_text() -> None:
    cut = '[{"name": "get_time", "argu'
    parsed = parse_forced(plan_for("required"), cut)
    assert parsed.content == cut and not parsed.calls
    assert parsed.finish_reason("length") == "length"


def test_auto_without_a_parser_is_refused() -> None:
    with pytest.raises(APIError) as info:
        parse(plan_for("auto"), "hello", None)
    assert info.value.param == "tool_choice"


# -- streaming --------------------------------------------------------------------------------


def reassemble(deltas: list[Delta]) -> dict[int, dict[str, str]]:
    """What the openai SDK's stream helper builds from tool-call deltas."""
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        for piece in d.tool_calls or ():
            call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            if piece.id:
                assert not call["id"], "the id comes once, on the first piece"
                call["id"] = piece.id
            if piece.function and piece.function.name:
                call["name"] += piece.function.name
            if piece.function and piece.function.arguments:
                call["arguments"] += piece.function.arguments
    return calls


def test_named_streams_argument_fragments() -> None:
    stream = ToolStream(plan_for(NAMED), None)
    deltas = [d for piece in (" ", '{"ci', 'ty": ', '"Paris"}') for d in stream.feed(0, piece)]
    first = deltas[0].model_dump()
    assert first["tool_calls"][0].keys() == {"index", "id", "type", "function"}
    assert first["tool_calls"][0]["function"]["name"] == "get_weather"
    assert "id" not in deltas[1].model_dump()["tool_calls"][0]
    rest, reason = stream.finish(0, "stop")
    assert reason == "tool_calls" and not rest
    calls = reassemble(deltas)
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}


def test_required_streams_whole_calls_at_the_end() -> None:
    stream = ToolStream(plan_for("required"), None)
    out = '[{"name": "get_time", "arguments": {"zone": "UTC"}}]'
    assert stream.feed(0, out[:10]) == [] and stream.feed(0, out[10:]) == []
    deltas, reason = stream.finish(0, "stop")
    assert reason == "tool_calls"
    calls = reassemble(deltas)
    assert calls[0]["name"] == "get_time" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"zone": "UTC"}


def test_required_cut_short_streams_text() -> None:
    stream = ToolStream(plan_for("required"), None)
    stream.feed(1, '[{"name"')
    deltas, reason = stream.finish(1, "length")
    assert reason == "length" and [d.content for d in deltas] == ['[{"name"']


# -- auto, through vLLM's hermes parser ----------------------------------------------------------


@pytest.fixture(scope="module")
def hermes() -> Any:
    from steer.service.tools import vllm_parsers

    # The hermes parser only needs a tokenizer to exist; it reads the text alone.
    return vllm_parsers("hermes", tokenizer=object())


def test_auto_parses_a_hermes_call(hermes: Any) -> None:
    plan = plan_for("auto")
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}' \
           '\n</tool_call>'
    parsed = parse(plan, text, hermes)
    assert parsed.content == "Let me look.\n"
    (call,) = parsed.calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    assert parse(plan, "Just text.", hermes).content == "Just text."


def test_auto_call_of_an_unknown_function_is_text(hermes: Any) -> None:
    text = '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>'
    parsed = parse(plan_for("auto"), text, hermes)
    assert parsed.content == text and not parsed.calls


def test_auto_streams_content_then_call(hermes: Any) -> None:
    stream = ToolStream(plan_for("auto"), hermes)
    text = 'Sure.<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    deltas = []
    for i in range(0, len(text), 7):
        deltas.extend(stream.feed(0, text[i:i + 7]))
    rest, reason = stream.finish(0, "stop")
    deltas.extend(rest)
    assert reason == "tool_calls"
    assert "".join(d.content or "" for d in deltas) == "Sure."
    calls = reassemble(deltas)
    assert calls[0]["name"] == "get_time" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"zone": "CET"}


def test_auto_streams_plain_text(hermes: Any) -> None:
    stream = ToolStream(plan_for("auto"), hermes)
    deltas = stream.feed(0, "Hello ") + stream.feed(0, "there")
    rest, reason = stream.finish(0, "stop")
    assert reason == "stop"
    assert "".join(d.content or "" for d in deltas + rest) == "Hello there"


# -- steering over calls (the scripted engine) -----------------------------------------------


def test_json_normal_form() -> None:
    from steer.critics.extract import json_value

    assert json_value('{"b": 1, "a": [1, 2]}') == json_value(' {"a":[1,2],\n"b":1}')
    assert json_value('{"a": 1}') != json_value('{"a": 2}')
    assert json_value('{"a": ') is None and json_value("[" * 100_000) is None


def no_adapters(name: str) -> Any:
    raise AssertionError(f"unexpected adapter {name}")


@pytest.mark.anyio
async def test_self_consistency_votes_on_the_normalised_call() -> None:
    from steer.engine import Message, SamplingParams
    from steer.search import Limits, Steerer, SteeringSpec, TemplateLibrary
    from tests.fakes import FakeEngine

    plan = plan_for("required", parallel=False)
    constraint = plan.constraint()
    engine = FakeEngine(max_model_len=4096)
    steerer = Steerer(engine, Limits(), TemplateLibrary(), no_adapters)
    paris = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    engine.enqueue(paris, '{"arguments":{"city":"Paris"},"name":"get_weather"}',
                   '{"name": "get_weather", "arguments": {"city": "Rome"}}')
    spec = steerer.plan(SteeringSpec(strategy="self_consistency", options={"k": 3}))
    result = await steerer.run(spec, (Message("user", "weather in Paris?"),),
                               SamplingParams(max_tokens=40, constraint=constraint), None, "r")
    votes = result.trace.to_dict()["votes"]
    assert votes == {'{"arguments":{"city":"Paris"},"name":"get_weather"}': 2,
                     '{"arguments":{"city":"Rome"},"name":"get_weather"}': 1}
    assert engine.history[0].params.constraint == constraint
    (call,) = parse_forced(plan, result.text).calls
    assert json.loads(call.function.arguments) == {"city": "Paris"}


# -- the HTTP edge (scripted engine, app in-process) -------------------------------------------

CHAT = "/v1/chat/completions"


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "weather?"}],
            "tools": [WEATHER, TIME], "max_tokens": 20, **fields}


def sse(resp: Any) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in resp.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.anyio
async def test_http_required_call(client: Any, fake_engine: Any) -> None:
    fake_engine.enqueue('{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    r = await client.post(CHAT, json=body(tool_choice="required", parallel_tool_calls=False))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None and message["role"] == "assistant"
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    schema = json.loads(fake_engine.history[0].params.constraint.json_schema)
    assert [o["properties"]["name"]["const"] for o in schema["oneOf"]] == ["get_weather",
                                                                             "get_time"]


@pytest.mark.anyio
async def test_http_plain_answers_keep_their_shape(client: Any, fake_engine: Any) -> None:
    fake_engine.enqueue("hello")
    r = await client.post(CHAT, json={"model": "fake-model", "max_tokens": 5,
                                      "messages": [{"role": "user", "content": "hi"}]})
    message = r.json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "hello", "refusal": None}
    assert fake_engine.history[0].params.constraint is None


@pytest.mark.anyio
async def test_http_named_call_streams(client: Any, fake_engine: Any) -> None:
    fake_engine.enqueue('{"city": "Oslo"}')
    r = await client.post(CHAT, json=body(stream=True, tool_choice={
        "type": "function", "function": {"name": "get_weather"}}))
    assert r.status_code == 200
    chunks = sse(r)
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [p for d in deltas for p in d["delta"].get("tool_calls", [])]
    assert pieces[0]["id"].startswith("call_") and pieces[0]["type"] == "function"
    assert pieces[0]["function"]["name"] == "get_weather"
    assert all(set(p) == {"index", "function"} for p in pieces[1:])
    arguments = "".join(p["function"].get("arguments", "") for p in pieces)
    assert json.loads(arguments) == {"city": "Oslo"}
    assert deltas[-1]["finish_reason"] == "tool_calls"
    assert all("content" not in d["delta"] for d in deltas[1:])


@pytest.mark.anyio
async def test_http_auto_needs_a_parser(client: Any) -> None:
    # The scripted engine has no tokenizer, so the server has no tool parser for `auto`.
    r = await client.post(CHAT, json=body())
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


@pytest.mark.anyio
async def test_http_bad_tool_history(client: Any) -> None:
    history = [{"role": "user", "content": "x"},
               {"role": "tool", "tool_call_id": "call_9", "content": "y"}]
    r = await client.post(CHAT, json=body(messages=history, tool_choice="none"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.1"


def test_auto_without_parallel_calls_keeps_the_first(hermes: Any) -> None:
    two = ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "A"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "get_time", "arguments": {"zone": "B"}}\n</tool_call>')
    assert len(parse(plan_for("auto"), two, hermes).calls) == 2
    (call,) = parse(plan_for("auto", parallel=False), two, hermes).calls
    assert json.loads(call.function.arguments) == {"zone": "A"}
    stream = ToolStream(plan_for("auto", parallel=False), hermes)
    deltas = [d for i in range(0, len(two), 5) for d in stream.feed(0, two[i:i + 5])]
    rest, _ = stream.finish(0, "stop")
    assert list(reassemble(deltas + rest)) == [0]


@pytest.mark.anyio
async def test_http_self_consistency_over_calls(client: Any, fake_engine: Any) -> None:
    oslo = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    fake_engine.enqueue(oslo, '{"arguments": {"city": "Oslo"}, "name": "get_weather"}',
                        '{"name": "get_time", "arguments": {"zone": "CET"}}')
    r = await client.post(CHAT, json=body(
        tool_choice="required", parallel_tool_calls=False,
        steering={"strategy": "self_consistency", "options": {"k": 3}, "trace": True}))
    assert r.status_code == 200, r.text
    data = r.json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert max(data["steering_trace"]["votes"].values()) == 2
    assert fake_engine.history[0].params.constraint is not None


@pytest.mark.anyio
async def test_http_steered_call_streams(client: Any, fake_engine: Any) -> None:
    fake_engine.enqueue('{"city": "Oslo"}', '{"city": "Rome"}')
    r = await client.post(CHAT, json=body(
        stream=True, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        steering={"strategy": "best_of_n", "options": {"n": 2}}))
    assert r.status_code == 200
    deltas = [c["choices"][0] for c in sse(r) if c["choices"]]
    calls = reassemble([Delta.model_validate(d["delta"]) for d in deltas])
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) in ({"city": "Oslo"}, {"city": "Rome"})
    assert deltas[-1]["finish_reason"] == "tool_calls"


@pytest.mark.anyio
@pytest.mark.parametrize(("steering", "choice", "param"), [
    ({"strategy": "tot"}, "required", "tools"),
    ({"strategy": "debate"}, "required", "tools"),
    ({"strategy": "best_of_n"}, "auto", "tool_choice"),
])
async def test_http_steering_that_cannot_steer_calls(client: Any, steering: dict[str, Any],
                                                     choice: str, param: str) -> None:
    r = await client.post(CHAT, json=body(tool_choice=choice, steering=steering))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and steering["strategy"] in error["message"]


class Geo(BaseModel):
    lat: float


class Place(BaseModel):
    geo: Geo


class Trip(BaseModel):
    to: Place


def test_required_keeps_references_between_definitions() -> None:
    # Two levels of nested models: a definition that refers to another definition.
    tool = {"type": "function", "function": {"name": "go",
                                             "parameters": Trip.model_json_schema()}}
    plan = plan_tools(request(tools=[tool], tool_choice="required", parallel_tool_calls=False))
    assert plan is not None and plan.schema is not None
    assert set(plan.schema["$defs"]) == {"tool0", "tool0_Place", "tool0_Geo"}
    assert valid(plan.schema, {"name": "go", "arguments": {"to": {"geo": {"lat": 1.5}}}})
    assert not valid(plan.schema, {"name": "go", "arguments": {"to": {"geo": {"lat": "x"}}}})


def test_tools_together_are_bounded_like_one_schema() -> None:
    # Each tool's parameters fit the schema cap; 16 of them don't, in any mode.
    big = {"type": "object", "properties": {f"p{i}": {"type": "string",
                                                      "description": "d" * 300}
                                            for i in range(100)}}
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": big}}
             for i in range(16)]
    refused("tools", tools=tools)


@pytest.mark.anyio
async def test_http_forced_call_the_backend_cannot_enforce_is_a_400_before_streaming(
    client: Any, fake_engine: Any
) -> None:
    from steer.engine import EngineRequestError

    async def refuse(constraint: Any) -> None:
        raise EngineRequestError("uniqueItems is not supported")

    fake_engine.check_constraint = refuse
    r = await client.post("/v1/chat/completions", json={
        "model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
        "tools": [WEATHER], "tool_choice": "required", "stream": True,
        "steering": {"strategy": "best_of_n", "options": {"n": 2}}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "tools"
    assert fake_engine.history == []
