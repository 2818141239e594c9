"""Structured outputs on the real engine through the official `openai` client: JSON mode,
json_schema (plain, `parse()` with a pydantic model, streamed, under strategies), vLLM's
`structured_outputs` (choice, regex), `logit_bias`, and the 400s for what cannot be enforced.

Assertions are about the contract (valid JSON, the schema holds, the field a refusal
names), never about what a 135M model chooses to say inside it.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from openai.types.shared_params import ResponseFormatJSONSchema
from pydantic import BaseModel, Field

from tests.integration.support import MODEL

pytestmark = pytest.mark.integration

ASK: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You reply with one JSON object and nothing else."},
    {"role": "user", "content": "Describe the city of Paris as JSON: its name, its "
                                "population in millions, and whether it is a capital."},
]


class City(BaseModel):
    name: Annotated[str, Field(max_length=24)]
    population_millions: int
    capital: bool


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24},
                   "population_millions": {"type": "integer"},
                   "capital": {"type": "boolean"}},
    "required": ["name", "population_millions", "capital"],
    "additionalProperties": False,
}
JSON_SCHEMA: ResponseFormatJSONSchema = {
    "type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}


def content(resp: Any) -> str:
    text = resp.choices[0].message.content
    assert isinstance(text, str)
    return text


def trace_of(resp: Any) -> dict[str, Any]:
    trace: dict[str, Any] = (resp.model_extra or {})["steering_trace"]
    return trace


def test_json_object_parses(oai: openai.OpenAI) -> None:
    # Any object may be long (its keys are the model's), so greedy and room to close it:
    # a sampled one ran past 96 tokens in CI once.
    resp = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=256,
                                       temperature=0.0,
                                       response_format={"type": "json_object"})
    assert resp.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(content(resp)), dict)


def test_json_schema_output_validates(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=96,
                                       response_format=JSON_SCHEMA)
    jsonschema.validate(json.loads(content(resp)), SCHEMA)


def test_parse_returns_the_pydantic_object(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.parse(model=MODEL, messages=ASK, max_tokens=96,
                                      response_format=City)
    parsed = resp.choices[0].message.parsed
    assert isinstance(parsed, City) and len(parsed.name) <= 24


def test_streamed_json_schema_answer_reassembles(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=96, stream=True,
                                         response_format=JSON_SCHEMA)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 1  # real tokens, not one blob
    jsonschema.validate(json.loads("".join(pieces)), SCHEMA)


def test_best_of_n_returns_a_valid_answer_scored_by_the_schema(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=96, response_format=JSON_SCHEMA,
        extra_body={"steering": {"strategy": "best_of_n", "options": {"n": 4}, "trace": True}})
    jsonschema.validate(json.loads(content(resp)), SCHEMA)
    nodes = trace_of(resp)["nodes"]
    assert len(nodes) == 4
    for node in nodes:
        assert list(node["scores"])[:1] == ["json_schema+logprob"]
        assert node["scores"]["json_schema"] in (0.0, 1.0) and node["meta"]["constrained"]
    chosen = next(n for n in nodes if n["chosen"])
    assert chosen["scores"]["json_schema"] == 1.0 and chosen["text"] == content(resp)


def test_self_consistency_votes_on_json_values(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=96, response_format=JSON_SCHEMA,
        extra_body={"steering": {"strategy": "self_consistency", "options": {"k": 3},
                                 "trace": True}})
    answer = json.loads(content(resp))
    jsonschema.validate(answer, SCHEMA)
    votes: dict[str, int] = trace_of(resp)["votes"]
    assert votes and sum(votes.values()) <= 3
    assert json.dumps(answer, sort_keys=True, separators=(",", ":")) in votes


def test_choice_and_regex(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model=MODEL, max_tokens=8,
        messages=[{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert content(resp) in ("yes", "no")
    done = oai.completions.create(model=MODEL, prompt="The year the war ended:", max_tokens=8,
                                  extra_body={"structured_outputs": {"regex": "[12][0-9]{3}"}})
    assert re.fullmatch("[12][0-9]{3}", done.choices[0].text)


def test_logit_bias_reaches_the_sampler(oai: openai.OpenAI, tokenizer: Any) -> None:
    forced = tokenizer.encode(" banana", add_special_tokens=False)[0]
    resp = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3,
                                       logit_bias={str(forced): 100})
    assert content(resp) == tokenizer.decode([forced] * 3)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$ref": "https://example.com/s.json"}}}},
     "response_format.json_schema.schema"),
    # Valid JSON Schema the structured-output backend cannot enforce.
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "items": {"type": "integer"},
                                "uniqueItems": True}}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"json": {"not": {"type": "string"}}}}, "structured_outputs.json"),
    ({"structured_outputs": {"regex": "(?=a)a"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs.grammar"),
])
@pytest.mark.parametrize("stream, steering", [(False, None), (True, None),
                                              (True, {"strategy": "best_of_n"})])
def test_what_cannot_be_enforced_is_a_400_naming_the_field(
        oai: openai.OpenAI, body: dict[str, Any], param: str, stream: bool,
        steering: dict[str, Any] | None) -> None:
    extra = {**body, **({"steering": steering} if steering else {})}
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, stream=stream,
                                    extra_body=extra)
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == param, error
