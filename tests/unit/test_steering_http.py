"""The `steering` contract over HTTP: usage.steering, steering_trace, streamed progress,
and the aliases other clients use (optillm, reasoning_effort)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "What is 6 * 7?"}]


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": MSG, **fields}


async def test_steered_response_carries_usage_and_trace(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue(("it is 42", -0.1), ("it is 41", -1.0))
    r = await client.post(CHAT, json=body(steering={
        "strategy": "best_of_n", "options": {"n": 2}, "trace": True}))
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["choices"][0]["message"]["content"] == "it is 42"
    assert data["usage"] == {
        "prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11,
        "completion_tokens_details": {  # the unchosen candidate's 3 tokens
            "reasoning_tokens": 3, "audio_tokens": 0, "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0},
        "steering": {"model_calls": 2, "candidates": 2, "pruned": 1, "budget_exhausted": False},
    }
    trace = data["steering_trace"]
    assert trace["strategy"] == "best_of_n"
    assert [n["text"] for n in trace["nodes"]] == ["it is 42", "it is 41"]
    assert [n["pruned"] for n in trace["nodes"]] == [False, True]
    assert trace["nodes"][0]["scores"]["logprob"] > trace["nodes"][1]["scores"]["logprob"]


async def test_plain_requests_have_no_steering_fields(client: httpx.AsyncClient) -> None:
    data = (await client.post(CHAT, json=body())).json()
    assert "steering" not in data["usage"] and "steering_trace" not in data


async def test_steered_stream(client: httpx.AsyncClient, fake_engine: FakeEngine) -> None:
    fake_engine.enqueue(("so 7", -0.1), ("7", -0.2), ("8", -0.3))
    r = await client.post(CHAT, json=body(
        stream=True, stream_options={"include_usage": True},
        steering={"strategy": "self_consistency", "options": {"k": 3}}))
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    progress = [c for c in chunks if "steering" in c and c["choices"][0]["delta"] == {}]
    assert progress and progress[0]["steering"]["votes"] == {"7": 2, "8": 1}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "so 7"
    assert chunks[-1]["usage"]["steering"]["model_calls"] == 3


@pytest.mark.parametrize(
    ("fields", "strategy"),
    [
        ({"model": "bon-fake-model"}, "best_of_n"),
        ({"optillm_approach": "self_consistency"}, "self_consistency"),
        ({"optillm_approach": "re2"}, "template"),
        ({"reasoning_effort": "medium"}, "best_of_n"),
    ],
)
async def test_aliases_select_strategies(
    client: httpx.AsyncClient, fields: dict[str, Any], strategy: str
) -> None:
    r = await client.post(CHAT, json={**body(), **fields})
    assert r.status_code == 200, r.text
    metrics = (await client.get("/metrics")).text
    assert f'steer_strategy_requests_total{{strategy="{strategy}"}} 1.0' in metrics


async def test_reasoning_effort_sets_the_budget(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    r = await client.post(CHAT, json=body(reasoning_effort="high"))
    assert r.json()["usage"]["steering"]["model_calls"] == 8  # best_of_n n=8
    r = await client.post(CHAT, json=body(reasoning_effort="low"))
    assert r.json()["usage"]["steering"]["model_calls"] == 1


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"optillm_approach": "mcts"}, "optillm_approach", "does not support"),
        ({"optillm_approach": "zzz"}, "optillm_approach", "supported: bon"),
        ({"model": "mcts-fake-model"}, "model", "does not support"),
        ({"optillm_approach": "bon", "steering": {"strategy": "best_of_n"}},
         "optillm_approach", "one way only"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort", None),
        ({"steering": {"strategy": "best_of_n"}, "n": 1000}, "n", "at most"),
        ({"steering": {"strategy": "tot"}, "logprobs": True}, "logprobs", "'tot' strategy"),
    ],
)
async def test_alias_errors(
    client: httpx.AsyncClient, fields: dict[str, Any], param: str, says: str | None
) -> None:
    r = await client.post(CHAT, json={**body(), **fields})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    if says:
        assert says in err["message"]


async def test_completions_validate_strategies(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={
        "model": "fake-model", "prompt": "x", "steering": {"strategy": "nope"}})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "steering.strategy"


async def test_budget_exhausted_before_any_answer_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post(CHAT, json=body(steering={
        "strategy": "none", "budget": {"max_total_tokens": 2}}))
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "budget_exhausted"


async def test_templates_are_listed(client: httpx.AsyncClient) -> None:
    data = (await client.get("/v1/steering/templates")).json()["data"]
    names = {t["name"] for t in data}
    assert {"chain_of_thought", "expert_persona", "re2", "answer_format", "few_shot"} <= names
    few_shot = next(t for t in data if t["name"] == "few_shot")
    assert few_shot["variables"] == [{"name": "examples", "required": True}]


async def test_strategy_metrics(client: httpx.AsyncClient, fake_engine: FakeEngine) -> None:
    await client.post(CHAT, json=body(steering={"strategy": "best_of_n", "options": {"n": 3}}))
    text = (await client.get("/metrics")).text
    assert 'steer_strategy_model_calls_total{strategy="best_of_n"} 3.0' in text
    assert 'steer_strategy_duration_seconds_count{strategy="best_of_n"} 1.0' in text


@pytest.mark.parametrize(
    ("steering", "param"),
    [
        ({"strategy": "debate", "options": {"agents": [{"persona": "You are calm."},
                                                       {"adapter": "no-such-lora"}]}},
         "steering.options.agents"),
        ({"strategy": "best_of_n", "options": {"n": 2},
          "critic": {"name": "llm_judge", "adapter": "no-such-lora"}},
         "steering.critic.adapter"),
        ({"strategy": "debate", "options": {"agents": 2, "aggregate": "judge"},
          "critic": {"name": "llm_judge", "adapter": "no-such-lora"}},
         "steering.critic.adapter"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_role_adapter_is_a_400_naming_the_field(
    client: httpx.AsyncClient, fake_engine: FakeEngine, steering: dict[str, Any], param: str,
    stream: bool,
) -> None:
    """The real path: create_app's AdapterRegistry resolves the name, and the refusal is the
    client's 400 (not the 404 an unknown `model` gets, not a 500), before any model call
    and, for a stream, before its headers."""
    r = await client.post(CHAT, json=body(steering=steering, stream=stream))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["param"]) == ("invalid_request_error", param)
    assert "unknown adapter 'no-such-lora'" in err["message"]
    assert fake_engine.history == []
