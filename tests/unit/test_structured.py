"""Structured outputs without a real engine: the wire forms -> `Constraint` (and the 400s
naming the field), the mapping onto vLLM's `StructuredOutputsParams`, and what strategies
do under a constraint (which calls are constrained, the implied schema gate, votes)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from vllm.sampling_params import StructuredOutputsParams

from steer.engine import Constraint, EngineRequestError, Message, SamplingParams
from steer.engine.vllm_engine import VllmEngine, VllmEngineConfig, _finish, _structured_outputs
from steer.search import (
    BudgetExhausted,
    Limits,
    Steerer,
    SteeringSpec,
    SteerResult,
    TemplateLibrary,
)
from steer.service.app import create_app
from steer.service.errors import APIError
from steer.service.protocol import ChatCompletionRequest, CompletionRequest
from steer.service.settings import Settings
from steer.service.structured import constraint_for_schema, param_of, requested
from tests.asgi import running
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "Give me a JSON object."}]
SCHEMA: dict[str, Any] = {"type": "object", "properties": {"n": {"type": "integer"}},
                          "required": ["n"], "additionalProperties": False}
JSON_SCHEMA_FORMAT = {"type": "json_schema",
                      "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **fields})


def refused(req: Any) -> APIError:
    with pytest.raises(APIError) as info:
        requested(req)
    assert info.value.status == 400
    return info.value


# -- the wire forms --------------------------------------------------------------------------


def test_each_wire_form_becomes_one_constraint_and_names_its_field() -> None:
    cases: list[tuple[dict[str, Any], Constraint, str]] = [
        ({"response_format": JSON_SCHEMA_FORMAT},
         Constraint(json_schema=json.dumps(SCHEMA, separators=(",", ":"))),
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_object"}}, Constraint(json_object=True),
         "response_format"),
        ({"structured_outputs": {"json": json.dumps(SCHEMA)}},
         Constraint(json_schema=json.dumps(SCHEMA, separators=(",", ":"))),
         "structured_outputs.json"),
        ({"structured_outputs": {"regex": "[0-9]{3}"}}, Constraint(regex="[0-9]{3}"),
         "structured_outputs.regex"),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, Constraint(choice=("yes", "no")),
         "structured_outputs.choice"),
        ({"structured_outputs": {"grammar": 'root ::= "a"'}},
         Constraint(grammar='root ::= "a"'), "structured_outputs.grammar"),
        ({"structured_outputs": {"json_object": True}}, Constraint(json_object=True),
         "structured_outputs.json_object"),
    ]
    for fields, constraint, param in cases:
        req = chat(**fields)
        asked = requested(req)
        assert asked is not None and asked.constraint == constraint, fields
        assert asked.param == param_of(req) == param
    assert requested(chat(response_format={"type": "text"})) is None
    assert requested(chat()) is None
    completion = CompletionRequest.model_validate(
        {"model": "m", "prompt": "x", "structured_outputs": {"choice": ["a"]}})
    assert requested(completion) == requested(chat(structured_outputs={"choice": ["a"]}))


def test_schema_key_order_is_kept_since_the_decoder_writes_properties_in_it() -> None:
    schema = {"type": "object", "properties": {"z": {"type": "string"}, "a": {"type": "integer"}}}
    constraint = constraint_for_schema(schema)
    assert constraint.json_schema is not None
    assert list(json.loads(constraint.json_schema)["properties"]) == ["z", "a"]


@pytest.mark.parametrize("schema, why", [
    ({"$ref": "https://example.com/schema.json"}, "never fetched"),
    ({"type": "object", "properties": {"a": {"$ref": "file:///etc/passwd"}}}, "never fetched"),
    ({"type": 12}, "invalid JSON schema"),
    ({"type": "string", "pattern": "(a"}, "pattern"),
    (json.loads('{"items": ' * 40 + "{}" + "}" * 40), "levels deep"),
    ({"enum": ["x" * 70_000]}, "bytes"),
])
def test_unsafe_or_invalid_schemas_are_400s_naming_the_schema(schema: Any, why: str) -> None:
    err = refused(chat(response_format={"type": "json_schema",
                                        "json_schema": {"name": "x", "schema": schema}}))
    assert err.param == "response_format.json_schema.schema" and why in err.message
    err = refused(chat(structured_outputs={"json": schema}))
    assert err.param == "structured_outputs.json"


def test_wire_refusals_name_the_field() -> None:
    assert refused(chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}})
                   ).param == "response_format.json_schema.schema"
    assert refused(chat(response_format={"type": "json_object"},
                        structured_outputs={"regex": "a"})).param == "structured_outputs"
    assert refused(chat(structured_outputs={"regex": "a", "choice": ["a"]})
                   ).param == "structured_outputs"
    assert refused(chat(structured_outputs={})).param == "structured_outputs"
    assert refused(chat(structured_outputs={"json_object": False})
                   ).param == "structured_outputs.json_object"
    assert refused(chat(structured_outputs={"json": "{not json"})
                   ).param == "structured_outputs.json"
    assert refused(chat(structured_outputs={"json": "[1]"})).param == "structured_outputs.json"
    assert refused(chat(structured_outputs={"grammar": "  "})
                   ).param == "structured_outputs.grammar"
    assert refused(chat(structured_outputs={"regex": "a" * 5000})
                   ).param == "structured_outputs.regex"


async def test_http_400s_name_the_field(client: httpx.AsyncClient) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"type": "xml"}, "response_format"),
        ({"type": "json_schema", "json_schema": {"name": "has space", "schema": SCHEMA}},
         "response_format.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "extra": 1}},
         "response_format.json_schema.extra"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "http://x/"}}},
         "response_format.json_schema.schema"),
        ({"type": "text", "json_schema": {}}, "response_format.json_schema"),
    ]
    for fmt, param in cases:
        r = await client.post(CHAT, json={"model": "fake-model", "messages": MSG,
                                          "response_format": fmt})
        assert r.status_code == 400, (fmt, r.text)
        assert r.json()["error"]["param"] == param, r.text
    r = await client.post(COMPLETIONS, json={"model": "fake-model", "prompt": "x",
                                             "structured_outputs": {"structural_tag": "x"}})
    assert (r.status_code, r.json()["error"]["param"]) == (
        400, "structured_outputs.structural_tag")


async def test_the_constraint_reaches_the_engine(client: httpx.AsyncClient,
                                                 fake_engine: FakeEngine) -> None:
    fake_engine.enqueue('{"n":1}', "yes")
    r = await client.post(CHAT, json={"model": "fake-model", "messages": MSG,
                                      "response_format": JSON_SCHEMA_FORMAT})
    assert r.status_code == 200, r.text
    r = await client.post(COMPLETIONS, json={"model": "fake-model", "prompt": "Is it?",
                                             "structured_outputs": {"choice": ["yes", "no"]}})
    assert r.status_code == 200, r.text
    first, second = fake_engine.history
    assert first.params.constraint == constraint_for_schema(SCHEMA)
    assert second.params.constraint == Constraint(choice=("yes", "no"))


# -- onto vLLM ------------------------------------------------------------------------------


def test_constraints_map_onto_vllms_structured_outputs() -> None:
    assert _structured_outputs(None) is None
    cases = [
        (Constraint(json_schema='{"type":"object"}'),
         StructuredOutputsParams(json='{"type":"object"}')),
        (Constraint(json_object=True), StructuredOutputsParams(json_object=True)),
        (Constraint(regex="a+"), StructuredOutputsParams(regex="a+")),
        (Constraint(choice=("a", "b")), StructuredOutputsParams(choice=["a", "b"])),
        (Constraint(grammar='root ::= "a"'), StructuredOutputsParams(grammar='root ::= "a"')),
    ]
    for ours, theirs in cases:
        assert _structured_outputs(ours) == theirs
    with pytest.raises(ValueError):
        _structured_outputs(Constraint())


def test_sampling_params_carry_the_constraint_and_logit_bias() -> None:
    engine = VllmEngine(VllmEngineConfig(model="m", served_model_name="m"))
    params = SamplingParams(constraint=Constraint(regex="[ab]"), logit_bias=((7, -100.0),))
    vllm_params = engine._vllm_params(params, 8, delta=False)
    assert vllm_params.structured_outputs == StructuredOutputsParams(regex="[ab]")
    assert vllm_params.logit_bias == {7: -100.0}
    plain = engine._vllm_params(SamplingParams(), 8, delta=False)
    assert plain.structured_outputs is None and plain.logit_bias is None


def test_a_request_vllm_failed_is_an_error_not_an_empty_answer() -> None:
    with pytest.raises(EngineRequestError) as info:
        _finish("error", SamplingParams(constraint=Constraint(regex="a")))
    assert info.value.param == "structured_outputs"
    with pytest.raises(EngineRequestError):
        _finish("error", SamplingParams())
    assert _finish("length", SamplingParams()) == "length"


# -- strategies under a constraint ------------------------------------------------------------

QUESTION = (Message("user", "Give me a JSON object."),)
CONSTRAINED = SamplingParams(max_tokens=50, constraint=constraint_for_schema(SCHEMA))


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


def no_adapters(name: str) -> Any:
    raise AssertionError(f"unexpected adapter {name}")


@pytest.fixture
def steerer(engine: FakeEngine) -> Steerer:
    return Steerer(engine, Limits(), TemplateLibrary(), no_adapters)


async def run(steerer: Steerer, params: SamplingParams = CONSTRAINED,
              **spec: Any) -> SteerResult:
    plan = steerer.plan(SteeringSpec(**spec))
    return await steerer.run(plan, QUESTION, params, None, "req-1")


def constraints(engine: FakeEngine) -> list[Constraint | None]:
    return [call.params.constraint for call in engine.history]


async def test_best_of_n_never_returns_a_candidate_that_fails_the_schema(
        engine: FakeEngine, steerer: Steerer) -> None:
    # The likeliest candidate was cut off mid-object; the schema gate keeps it from winning.
    engine.enqueue(('{"n": 1', -0.01), ('{"n": 2}', -1.0), ('{"n": "3"}', -0.05))
    result = await run(steerer, strategy="best_of_n", options={"n": 3})
    assert result.text == '{"n": 2}'
    assert constraints(engine) == [CONSTRAINED.constraint]
    first, second, third = result.trace.nodes
    assert list(first.scores) == ["json_schema+logprob", "json_schema", "logprob"]
    assert first.scores["json_schema+logprob"] == 0.0 and first.scores["logprob"] > 0.9
    assert second.scores["json_schema+logprob"] == second.scores["logprob"]
    assert third.scores["json_schema"] == 0.0 and "is not of type" in third.meta[
        "json_schema_detail"]
    assert first.meta["constrained"] is True


async def test_without_a_constraint_nothing_is_gated(engine: FakeEngine,
                                                     steerer: Steerer) -> None:
    engine.enqueue(("not json", -0.1), ('{"n": 2}', -1.0))
    result = await run(steerer, SamplingParams(max_tokens=50), strategy="best_of_n",
                       options={"n": 2})
    assert result.text == "not json"
    assert list(result.trace.nodes[0].scores) == ["logprob"]


async def test_self_consistency_votes_on_valid_json_values(engine: FakeEngine,
                                                           steerer: Steerer) -> None:
    # Two invalid answers agree, but get no vote; the valid ones count as one value however
    # they are written.
    engine.enqueue('{"n": "x"}', '{"n": "x"}', '{"n": 5}', '{ "n" : 5 }', '{"n": 6}')
    result = await run(steerer, strategy="self_consistency", options={"k": 5})
    assert json.loads(result.text) == {"n": 5}
    assert result.trace.info["votes"] == {'{"n":5}': 2, '{"n":6}': 1}
    assert [n.scores["json_schema"] for n in result.trace.nodes] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert constraints(engine) == [CONSTRAINED.constraint]


async def test_reflection_constrains_versions_not_feedback(engine: FakeEngine,
                                                           steerer: Steerer) -> None:
    engine.enqueue('{"n": "x"}', "It needs a number.", '{"n": 3}')
    result = await run(steerer, strategy="reflection",
                       options={"max_iters": 1, "feedback": "both"},
                       critic={"name": "exact_answer", "reference": 3})
    assert result.text == '{"n": 3}'
    assert constraints(engine) == [CONSTRAINED.constraint, None, CONSTRAINED.constraint]
    revise = engine.history[2].prompts[0]
    assert isinstance(revise, list) and "does not match the required JSON schema" in revise[
        -1].content


async def test_debate_constrains_every_answer_and_not_summaries(engine: FakeEngine,
                                                                 steerer: Steerer) -> None:
    engine.enqueue('{"n": 1}', '{"n": 2}', "summary one", "summary two",
                   '{"n": 2}', '{ "n": 2 }')
    result = await run(steerer, strategy="debate",
                       options={"agents": 2, "rounds": 2, "summarize": True})
    assert json.loads(result.text) == {"n": 2}
    assert constraints(engine) == [CONSTRAINED.constraint, None, None,
                                   CONSTRAINED.constraint]
    assert result.trace.info["consensus_round"] == 1


async def test_tot_thinks_in_free_text_and_answers_constrained(engine: FakeEngine,
                                                               steerer: Steerer) -> None:
    engine.respond = lambda prompt, params: (
        '{"n": 4}' if params.constraint else
        "sure" if "sure, likely or impossible" in str(prompt) else "Answer: 4")
    result = await run(steerer, strategy="tot",
                       options={"breadth": 1, "depth": 1, "n_evaluate": 1})
    assert result.text == '{"n": 4}'
    kinds = constraints(engine)
    assert kinds[-1] == CONSTRAINED.constraint and set(kinds[:-1]) == {None}
    final = engine.history[-1].prompts[0]
    assert not isinstance(final, str) and "Answer: 4" in final[-1].content


async def test_tot_keeps_a_call_for_the_constrained_answer(engine: FakeEngine,
                                                           steerer: Steerer) -> None:
    engine.respond = lambda prompt, params: (
        '{"n": 4}' if params.constraint else
        "sure" if "sure, likely or impossible" in str(prompt) else "a step")
    result = await run(steerer, strategy="tot",
                       options={"breadth": 1, "depth": 3, "n_evaluate": 1},
                       budget={"max_model_calls": 4})
    assert result.text == '{"n": 4}' and result.model_calls == 4
    assert constraints(engine)[-1] == CONSTRAINED.constraint


async def test_a_search_cut_short_never_falls_back_on_an_unconstrained_thought(
        engine: FakeEngine, steerer: Steerer) -> None:
    # The budget pays for the thought and its value, not for the constrained answer: the
    # thought (free text) is no answer to fall back on.
    engine.respond = lambda prompt, params: (
        '{"n": 4}' if params.constraint else
        "sure" if "sure, likely or impossible" in str(prompt) else "a step")
    with pytest.raises(BudgetExhausted, match="before any answer"):
        await run(steerer, SamplingParams(max_tokens=8, constraint=CONSTRAINED.constraint),
                  strategy="tot", options={"breadth": 1, "depth": 1, "n_evaluate": 1},
                  budget={"max_total_tokens": 72})
    assert constraints(engine) == [None, None]


class RefusingEngine(FakeEngine):
    """A backend that cannot enforce regexes (as vLLM's cannot enforce lookaround)."""

    async def check_constraint(self, constraint: Constraint) -> None:
        if constraint.regex is not None:
            raise EngineRequestError("look-around is not supported", "structured_outputs")


@pytest.mark.parametrize("path, extra", [
    (CHAT, {}), (CHAT, {"stream": True}),
    (CHAT, {"stream": True, "steering": {"strategy": "best_of_n", "options": {"n": 2}}}),
    (COMPLETIONS, {"prompt": "x"}),
])
async def test_what_the_backend_cannot_enforce_is_refused_before_any_call(
        settings: Settings, path: str, extra: dict[str, Any]) -> None:
    engine = RefusingEngine(max_model_len=4096)
    body = {"model": "fake-model", **({} if path == COMPLETIONS else {"messages": MSG}),
            "structured_outputs": {"regex": "(?=a)a"}, **extra}
    async with running(create_app(settings, engine)) as client:
        r = await client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("structured_outputs.regex",
                                               "unsupported_structured_output")
    assert "look-around" in error["message"] and not engine.history
