"""Client data that must not hurt the server: JSON-schema references (never fetched), client
regular expressions (RE2, linear time), JSON schemas whose validation would explode, template
variables and python-critic kwargs (bounded), and our own extractors on adversarial output."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from steer.critics import CRITICS, Candidate, Question
from steer.critics.extract import answer_line, by_regex, choice, last_number
from steer.critics.rules import _json_in
from steer.engine import Message
from steer.search import Budget, Session, SteeringInvalid, TemplateLibrary
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "Say something."}]
Q = Question((Message("user", "Say something."),))
# `re` needs 1.2 s for this pattern on 24 "a"s and over 20 s on 28 (it backtracks through
# every way of splitting the run into 20 pieces); RE2 answers in linear time.
EVIL = r"(.*a){20}x"
EVIL_TEXT = "a" * 30_000  # one FakeEngine token
FAST = 2.0  # seconds; generous for RE2, hopeless for `re` on EVIL_TEXT
CAPPED = 10.0  # seconds, for capped work on a busy CI machine; uncapped takes minutes


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


def chat(steering: dict[str, Any]) -> dict[str, Any]:
    return {"model": "fake-model", "messages": MSG, "max_tokens": 8, "steering": steering}


def assert_400(r: httpx.Response, param: str) -> str:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    return str(error["message"])


def critic(name: str, **options: Any) -> Any:
    cls = CRITICS[name]
    return cls(cls.Options.model_validate(options))


async def scores(name: str, texts: list[str], **options: Any) -> list[tuple[float, str]]:
    session = Session(FakeEngine(max_model_len=4096), Budget(100, 100_000, 60), "r", None)
    out = await critic(name, **options).score(session, Q, [Candidate(t) for t in texts])
    return [(s.value, s.detail) for s in out]


# -- 1. JSON-schema references are never fetched ---------------------------------------------

class _Recorder(BaseHTTPRequestHandler):
    paths: ClassVar[list[str]]

    def do_GET(self) -> None:
        self.paths.append(self.path)
        body = json.dumps({"type": "string"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output clean


@pytest.fixture
def listener() -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on 127.0.0.1 that records every request it gets."""
    paths: list[str] = []
    handler = type("Recorder", (_Recorder,), {"paths": paths})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", paths
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def remote_schemas(base: str, file_uri: str) -> list[dict[str, Any]]:
    return [
        {"$ref": f"{base}/schema.json"},
        {"type": "object", "properties": {"a": {"$ref": f"{base}/a.json#/x"}}},
        {"$id": f"{base}/root.json", "$ref": "other.json"},  # relative to a remote base
        {"$defs": {"x": {"$dynamicRef": f"{base}/dyn.json#meta"}}, "$ref": "#/$defs/x"},
        {"allOf": [{"$ref": file_uri}]},
        {"$ref": "file:///etc/passwd"},
        {"$ref": "#/$defs/missing"},  # dangling: caught up front, not at scoring
    ]


# jsonschema's default registry warns only *after* it has fetched; let it, so a regression
# shows up as a recorded request rather than a warning turned error.
@pytest.mark.filterwarnings("ignore:Automatically retrieving remote:DeprecationWarning")
async def test_remote_and_file_refs_are_refused_and_never_fetched(
    client: httpx.AsyncClient, fake_engine: FakeEngine, listener: tuple[str, list[str]],
    tmp_path: Path,
) -> None:
    base, requests = listener
    local = tmp_path / "schema.json"
    local.write_text(json.dumps({"type": "string"}))
    responses = []
    for schema in remote_schemas(base, local.as_uri()):
        fake_engine.enqueue('"text"', '"text"')
        responses.append(await client.post(CHAT, json=chat({
            "strategy": "best_of_n", "options": {"n": 2},
            "critic": {"name": "json_schema", "schema": schema}})))
    assert requests == []
    for r in responses:
        message = assert_400(r, "steering.critic.schema")
        assert "$ref" in message or "$dynamicRef" in message
    assert fake_engine.history == []


async def test_local_refs_still_resolve() -> None:
    schema = {
        "$defs": {"n": {"type": "integer"},
                  "s": {"$id": "urn:steer:s", "type": "string", "$anchor": "str"}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/n"}, "b": {"$ref": "urn:steer:s"},
                       "c": {"$ref": "urn:steer:s#str"}},
    }
    got = await scores("json_schema", ['{"a": 1, "b": "x", "c": "y"}', '{"a": "1"}',
                                       '{"b": 2}'], schema=schema)
    assert [v for v, _ in got] == [1.0, 0.0, 0.0]


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("schema", [
    nested(40),
    {"enum": ["x" * 1000] * 100},  # ~100 KB as JSON
])
async def test_schema_size_and_depth_are_bounded(
    client: httpx.AsyncClient, schema: dict[str, Any]
) -> None:
    r = await client.post(CHAT, json=chat({
        "strategy": "best_of_n", "critic": {"name": "json_schema", "schema": schema}}))
    assert_400(r, "steering.critic.schema")


async def test_exponential_schema_is_cut_off() -> None:
    # Each level tries two branches that both fail at the bottom: 2**25 paths for one
    # string. The validation is capped, so the candidate just fails.
    defs = {f"l{i}": {"anyOf": [{"$ref": f"#/$defs/l{i + 1}"}, {"$ref": f"#/$defs/l{i + 1}"}]}
            for i in range(25)}
    defs["l25"] = {"type": "integer"}
    schema = {"$defs": defs, "$ref": "#/$defs/l0"}
    start = time.perf_counter()
    [(value, detail)] = await scores("json_schema", ['"not a number"'], schema=schema)
    assert time.perf_counter() - start < CAPPED
    assert value == 0.0 and "too costly" in detail


@pytest.mark.parametrize("schema", [{"$ref": "#"}, {"$defs": {"a": {"$ref": "#/$defs/a"}},
                                                      "$ref": "#/$defs/a"}])
async def test_reference_loops_fail_the_candidate(schema: dict[str, Any]) -> None:
    [(value, detail)] = await scores("json_schema", ["1"], schema=schema)
    assert value == 0.0 and detail


async def test_format_is_not_evaluated() -> None:
    # `format: regex` would compile the candidate's string with `re`; no format checker runs.
    not_a_regex = json.dumps(r"(a)\1(")
    assert await scores("json_schema", [not_a_regex], schema={"format": "regex"}) == [(1.0, "")]


async def test_deeply_nested_candidate_json_fails_cleanly() -> None:
    [(value, _)] = await scores("json_schema", ["[" * 100_000], schema={"type": "array"})
    assert value == 0.0


async def test_unique_items_is_linear() -> None:
    # jsonschema's own uniqueItems compares every pair of unsortable items: 51 s here
    items = json.dumps([{"k": i} for i in range(5_000)])
    start = time.perf_counter()
    assert await scores("json_schema", [items], schema={"uniqueItems": True}) == [(1.0, "")]
    assert time.perf_counter() - start < CAPPED
    [(value, _)] = await scores("json_schema", ['[{"a": 1}, [1], {"a": 1.0}]'],
                                schema={"uniqueItems": True})
    assert value == 0.0
    assert await scores("json_schema", ["[1, true, 0, false, [1], [true]]"],
                        schema={"uniqueItems": True}) == [(1.0, "")]


# -- 2. client regular expressions run on RE2 -------------------------------------------------

EVIL_STEERING = [
    pytest.param({"strategy": "best_of_n", "options": {"n": 2},
                  "critic": {"name": "regex", "pattern": EVIL}}, 2, id="regex-critic"),
    pytest.param({"strategy": "self_consistency",
                  "options": {"k": 2, "extract": "regex", "pattern": EVIL}}, 2,
                 id="self-consistency-extract"),
    pytest.param({"strategy": "debate", "options": {"agents": 2, "rounds": 1,
                                                   "extract": "regex", "pattern": EVIL}}, 2,
                 id="debate-extract"),
    pytest.param({"strategy": "best_of_n", "options": {"n": 2},
                  "critic": {"name": "exact_answer", "reference": "x", "extract": "regex",
                             "pattern": EVIL}}, 2, id="exact-answer-extract"),
]


@pytest.mark.parametrize(("steering", "calls"), EVIL_STEERING)
async def test_backtracking_patterns_run_in_linear_time(
    client: httpx.AsyncClient, fake_engine: FakeEngine, steering: dict[str, Any], calls: int
) -> None:
    fake_engine.enqueue(*[EVIL_TEXT] * calls)
    start = time.perf_counter()
    r = await client.post(CHAT, json=chat(steering))
    assert r.status_code == 200, r.text
    assert time.perf_counter() - start < FAST


@pytest.mark.parametrize(("schema", "score"), [
    ({"type": "object", "properties": {"s": {"type": "string", "pattern": EVIL}}}, 0.0),
    ({"type": "object", "patternProperties": {EVIL: {"type": "integer"}}}, 1.0),  # no key hits
    ({"type": "object", "patternProperties": {EVIL: {}}, "additionalProperties": False}, 0.0),
])
async def test_json_schema_patterns_run_in_linear_time(
    client: httpx.AsyncClient, fake_engine: FakeEngine, schema: dict[str, Any], score: float
) -> None:
    output = json.dumps({"s": EVIL_TEXT, EVIL_TEXT: "v"})
    fake_engine.enqueue(output, output)
    start = time.perf_counter()
    r = await client.post(CHAT, json=chat({
        "strategy": "best_of_n", "options": {"n": 2}, "trace": True,
        "critic": {"name": "json_schema", "schema": schema}}))
    assert r.status_code == 200, r.text
    assert time.perf_counter() - start < FAST
    node = r.json()["steering_trace"]["nodes"][0]
    assert node["scores"]["json_schema"] == score


UNCOMPILABLE = r"(a)\1"  # a backreference: RE2 has none

BAD_PATTERNS = [
    ({"strategy": "best_of_n", "critic": {"name": "regex", "pattern": UNCOMPILABLE}},
     "steering.critic.pattern"),
    ({"strategy": "best_of_n", "critic": {"name": "regex", "pattern": "(?=a)a"}},
     "steering.critic.pattern"),
    ({"strategy": "best_of_n", "critic": {"name": "exact_answer", "reference": "a",
                                           "extract": "regex", "pattern": UNCOMPILABLE}},
     "steering.critic.pattern"),
    ({"strategy": "self_consistency", "options": {"extract": "regex",
                                                  "pattern": UNCOMPILABLE}},
     "steering.options.pattern"),
    ({"strategy": "debate", "options": {"extract": "regex", "pattern": UNCOMPILABLE}},
     "steering.options.pattern"),
    ({"strategy": "best_of_n", "critic": {"name": "json_schema", "schema": {
        "properties": {"a": {"pattern": UNCOMPILABLE}}}}}, "steering.critic.schema"),
    ({"strategy": "best_of_n", "critic": {"name": "json_schema", "schema": {
        "patternProperties": {UNCOMPILABLE: {}}}}}, "steering.critic.schema"),
]


@pytest.mark.parametrize(("steering", "param"), BAD_PATTERNS)
async def test_patterns_re2_cannot_compile_are_400s(
    client: httpx.AsyncClient, fake_engine: FakeEngine, steering: dict[str, Any], param: str
) -> None:
    message = assert_400(await client.post(CHAT, json=chat(steering)), param)
    assert "RE2" in message
    assert fake_engine.history == []


async def test_regex_extractor_keeps_its_meaning() -> None:
    extract = by_regex(r"answer:\s*(\w+)")
    assert extract("answer: Foo then answer: BAR") == "bar"
    assert by_regex(r"\d+")("1 and 22") == "22"
    assert by_regex(r"(x)|(\d+)")("7") is None  # group 1 did not take part
    assert by_regex(r"\d+")("none") is None
    assert await scores("regex", ["abc123", "xyz"], pattern=r"\d+") == [(1.0, ""), (0.0, "")]


# -- 2b. our own extractors are linear on adversarial output ---------------------------------

ADVERSARIAL = [
    "\n" * 50_000,
    " \n" * 25_000 + "x",
    "*\n" * 25_000,
    "answer" + " " * 50_000,
    "answer: x" + " " * 50_000 + "y",
    "the" + "\n" * 50_000,
    "1," * 25_000,
    "```" + " " * 50_000,
    "[" * 50_000,
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_our_extractors_are_linear(text: str) -> None:
    start = time.perf_counter()
    for extract in (last_number, answer_line, choice):
        extract(text)
    with pytest.raises(ValueError):
        _json_in(text)
    assert time.perf_counter() - start < 0.5


def test_extractors_keep_their_meaning() -> None:
    assert answer_line("work\n**Answer:** 42.\n") == "42"
    assert answer_line("The final answer is: Paris  \nmore") == "paris"
    assert answer_line("Answer:\n\n 7") == "7"
    assert answer_line("answer:   ") is None
    assert answer_line("> - answer = 3,000") == "3000"
    assert choice("the answer is (c)") == "C"
    assert choice("Option: B.") == "B"
    assert choice("answer  d") == "D"
    assert _json_in('x ```json\n{"a": 2}\n``` y') == {"a": 2}
    assert _json_in('```\n[1]\n```') == [1]


# -- 3. template variables and python-critic kwargs are bounded ------------------------------

@pytest.mark.parametrize(("variables", "param"), [
    ({f"v{i}": "x" for i in range(33)}, "steering.template.variables"),
    ({"instruction": "x" * 9000}, "steering.template.variables.instruction"),
    ({"instruction": [{"a": ["deep"]}]}, "steering.template.variables.instruction"),
    ({"examples": 5, "instruction": "x"}, "steering.template.variables.examples"),
    ({"instruction": [[["deep"]]]}, "steering.template.variables.instruction"),
])
async def test_template_variables_are_bounded(
    client: httpx.AsyncClient, variables: dict[str, Any], param: str
) -> None:
    r = await client.post(CHAT, json=chat({
        "strategy": "none", "template": {"name": "answer_format", "variables": variables}}))
    assert_400(r, param)


async def test_few_shot_examples_still_accepted(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    examples = [{"question": f"{i}+1?", "answer": str(i + 1)} for i in range(8)]
    r = await client.post(CHAT, json=chat({
        "strategy": "template", "options": {"name": "few_shot",
                                            "variables": {"examples": examples}}}))
    assert r.status_code == 200, r.text
    prompt = fake_engine.history[0].prompts[0]
    assert "Question: 7+1?\nAnswer: 8" in prompt[-1].content  # type: ignore[union-attr]


def test_client_values_are_never_compiled_as_templates() -> None:
    template = TemplateLibrary().get("answer_format", "t")
    source = "{{ 7 * 6 }} {% for i in range(10**9) %}{% endfor %}"
    out = template.apply((Message("user", source),), {"instruction": source, "marker": "{{"},
                         "steering.template")
    assert out[-1].content.count(source) == 2
    assert "42" not in out[-1].content


def test_rendered_template_output_is_bounded(tmp_path: Path) -> None:
    (tmp_path / "loop.toml").write_text(
        'user = "{% for i in range(100000) %}{{ question }}{% endfor %}"\n')
    template = TemplateLibrary(tmp_path).get("loop", "t")
    with pytest.raises(SteeringInvalid, match="longer than"):
        template.apply((Message("user", "q" * 1000),), {}, "steering.template")


@pytest.mark.parametrize(("kwargs", "field"), [
    ({f"k{i}": 1 for i in range(33)}, "kwargs"),
    ({"word": "x" * 20_000}, "kwargs"),
    ({"question": "x"}, "kwargs"),
])
async def test_python_critic_kwargs_are_bounded(
    client: httpx.AsyncClient, kwargs: dict[str, Any], field: str
) -> None:
    r = await client.post(CHAT, json=chat({
        "strategy": "best_of_n",
        "critic": {"name": "python", "function": "f", "kwargs": kwargs}}))
    assert_400(r, f"steering.critic.{field}")
