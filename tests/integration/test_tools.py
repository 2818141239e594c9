"""Tool calling on the real engine through the official `openai` client: forced calls
(`required`, a named function) constrained to the tools' schemas, `auto` through the packaged
ChatML/Hermes template and vLLM's `hermes` parser, streamed calls the SDK reassembles, tool
results in the history, steering over calls, and 400s for bad tool specs.

Assertions are about shapes and validity, never about which call a 135M model chooses.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)
from pydantic import BaseModel

from steer.engine.vllm_engine import STEER_TOOL_TEMPLATE
from tests.integration.support import CHAT, MODEL

pytestmark = pytest.mark.integration

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER: ChatCompletionToolParam = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": WEATHER_PARAMS, "strict": True}}
TIME: ChatCompletionToolParam = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string",
                                                             "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
PARAMS = {"get_weather": WEATHER_PARAMS, "get_time": TIME["function"]["parameters"]}
ASK: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the weather in Paris right now?"}]


def chat(oai: openai.OpenAI, **kwargs: Any) -> ChatCompletion:
    kwargs.setdefault("messages", ASK)
    kwargs.setdefault("max_tokens", 64)
    resp: ChatCompletion = oai.chat.completions.create(model=MODEL, tools=TOOLS, **kwargs)
    return resp


def function_calls(resp: ChatCompletion) -> list[ChatCompletionMessageFunctionToolCall]:
    calls = resp.choices[0].message.tool_calls or []
    assert all(isinstance(c, ChatCompletionMessageFunctionToolCall) for c in calls)
    return [c for c in calls if isinstance(c, ChatCompletionMessageFunctionToolCall)]


def assert_valid_calls(resp: ChatCompletion) -> list[tuple[str, dict[str, Any]]]:
    """Every call is OpenAI-shaped and its arguments validate against its tool's schema."""
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    message = choice.message
    assert message.content is None and message.tool_calls
    calls = []
    for call in function_calls(resp):
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, PARAMS[call.function.name])
        calls.append((call.function.name, arguments))
    assert len({c.id for c in message.tool_calls}) == len(message.tool_calls)
    return calls


def test_required_call_parses_and_validates(oai: openai.OpenAI) -> None:
    resp = chat(oai, tool_choice="required", parallel_tool_calls=False, temperature=0)
    assert len(assert_valid_calls(resp)) == 1


def test_required_parallel_calls_are_each_valid(oai: openai.OpenAI) -> None:
    resp = chat(oai, tool_choice="required", max_tokens=128, temperature=0)
    if resp.choices[0].finish_reason == "length":
        pytest.fail(f"the calls did not fit in 128 tokens: {resp.choices[0].message.content}")
    assert assert_valid_calls(resp)


def test_named_function(oai: openai.OpenAI) -> None:
    resp = chat(oai, tool_choice={"type": "function", "function": {"name": "get_time"}},
                temperature=0)
    ((name, _),) = assert_valid_calls(resp)
    assert name == "get_time"


class GetWeather(BaseModel):
    city: str
    unit: str


def test_sdk_parse_with_a_pydantic_tool(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.parse(
        model=MODEL, messages=ASK, max_tokens=64, temperature=0,
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice={"type": "function", "function": {"name": "GetWeather"}})
    (call,) = resp.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_streamed_call_reassembles(oai: openai.OpenAI) -> None:
    pieces = []
    with oai.chat.completions.stream(
        model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=64, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.delta":
                pieces.append(event.arguments_delta)
        final = stream.get_final_completion()
    assert len(pieces) > 1, "the arguments arrive in fragments, as they are generated"
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert call.function.arguments == "".join(pieces)
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)
    assert isinstance(call.function.parsed_arguments, dict)  # strict tools are parsed


def test_streamed_required_call_chunks(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "required",
            "max_tokens": 96, "temperature": 0, "stream": True}
    chunks = []
    with http.stream("POST", CHAT, json=body) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    pieces = [tc for d in deltas for tc in d["delta"].get("tool_calls", [])]
    first = pieces[0]
    assert first["index"] == 0 and first["type"] == "function" and first["id"].startswith("call_")
    assert first["function"]["name"] in PARAMS
    arguments = "".join(p["function"].get("arguments", "") for p in pieces if p["index"] == 0)
    jsonschema.validate(json.loads(arguments), PARAMS[first["function"]["name"]])
    assert deltas[-1]["finish_reason"] == "tool_calls"


def test_tool_result_in_the_history(oai: openai.OpenAI, tokenizer: Any) -> None:
    first = chat(oai, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                 temperature=0)
    (call,) = function_calls(first)
    history: list[ChatCompletionMessageParam] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees."},
    ]
    second = chat(oai, messages=history, max_tokens=40, temperature=0)
    message = second.choices[0].message
    assert message.content or message.tool_calls
    # The engine rendered the tools and both tool turns through the packaged template.
    # As the engine hands them to the template: arguments as an object, tools without the
    # `strict` flag (decoding enforces schemas; the model is not told).
    as_rendered = [dict(m, content=m.get("content") or "") for m in history]
    as_rendered[1]["tool_calls"] = [{"id": call.id, "type": "function", "function": {
        "name": call.function.name, "arguments": json.loads(call.function.arguments)}}]
    offered = [{"type": "function", "function": {k: v for k, v in t["function"].items()
                                                 if k != "strict"}} for t in TOOLS]
    rendered = tokenizer.apply_chat_template(
        as_rendered, tools=offered, chat_template=STEER_TOOL_TEMPLATE.read_text(),
        tokenize=False, add_generation_prompt=True)
    assert "<tool_response>\nSunny, 21 degrees.\n</tool_response>" in rendered
    assert second.usage is not None
    assert second.usage.prompt_tokens == len(tokenizer.encode(rendered,
                                                              add_special_tokens=False))


def test_auto_is_content_or_a_valid_call(oai: openai.OpenAI) -> None:
    resp = chat(oai, max_tokens=64, temperature=0)
    choice = resp.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in function_calls(resp):
            assert call.function.name in PARAMS and call.id.startswith("call_")
            assert isinstance(json.loads(call.function.arguments), dict)
    else:
        assert isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")


def test_none_is_plain_text(oai: openai.OpenAI) -> None:
    resp = chat(oai, tool_choice="none", max_tokens=16)
    assert resp.choices[0].message.tool_calls is None
    assert isinstance(resp.choices[0].message.content, str)


def test_self_consistency_votes_on_the_call(oai: openai.OpenAI) -> None:
    resp = chat(oai, tool_choice="required", parallel_tool_calls=False,
                extra_body={"steering": {"strategy": "self_consistency", "options": {"k": 4},
                                         "trace": True}})
    assert len(assert_valid_calls(resp)) == 1
    trace = (resp.model_extra or {})["steering_trace"]
    votes = trace["votes"]
    assert sum(votes.values()) == 4
    (name, arguments) = assert_valid_calls(resp)[0]
    winner = json.dumps({"arguments": arguments, "name": name}, sort_keys=True,
                        separators=(",", ":"), ensure_ascii=False)
    assert votes[winner] == max(votes.values())


def test_best_of_n_returns_a_valid_call(oai: openai.OpenAI) -> None:
    resp = chat(oai, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                extra_body={"steering": {"strategy": "best_of_n", "options": {"n": 3}}})
    ((name, _),) = assert_valid_calls(resp)
    assert name == "get_weather"


def error_of(http: httpx.Client, **fields: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": ASK, "max_tokens": 8, **fields}
    resp = http.post(CHAT, json=body)
    assert resp.status_code == 400, resp.text
    error: dict[str, Any] = resp.json()["error"]
    return error


def test_bad_tool_specs_are_400s_naming_the_field(http: httpx.Client) -> None:
    bad_name = {"type": "function", "function": {"name": "get weather"}}
    assert error_of(http, tools=[bad_name])["param"] == "tools.0.function.name"
    remote = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "https://example.com/x.json"}}}}}
    assert error_of(http, tools=[remote])["param"] == "tools.0.function.parameters"
    unknown = {"type": "function", "function": {"name": "nope"}}
    assert error_of(http, tools=TOOLS, tool_choice=unknown)["param"] == "tool_choice"
    stray = [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "?"}]
    assert error_of(http, tools=TOOLS, messages=stray)["param"] == "messages.1"
    assert error_of(http, functions=[{"name": "f"}])["param"] == "functions"
    steered = error_of(http, tools=TOOLS, tool_choice="required",
                       steering={"strategy": "tot"})
    assert steered["param"] == "tools" and "tot" in steered["message"]
