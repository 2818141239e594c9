"""The attack set of bench_hostile.py: what a hostile client sends, built once.

Each `Attack` is one kind of request: its group (the kinds listed in issue 9), a name, the
outcomes that count as the server handling it well, and a body serialized once up front (so a
20 MB payload costs the benchmark 20 MB once, however often it is sent). The kinds that are
about the connection rather than the body (slow readers, disconnects, floods) are run by
bench_hostile itself; their bodies are built here too. Nothing here talks to a server.

Outcome labels: an HTTP status ("400"), or one of the labels below; in `expect`, "4xx" stands
for any 4xx status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from harness import MODEL

REDOS, REF, INTS, LISTS, BODIES = (
    "ReDoS patterns", "remote $ref", "huge integers", "huge lists", "huge bodies")
SLOW, FLOOD = "slow readers", "best-of-16 flood"
GROUPS = (REDOS, REF, INTS, LISTS, BODIES, SLOW, FLOOD)

TIMEOUT, CONN_ERROR, UPLOAD_CUT = "timeout", "conn error", "closed during upload"
CLIENT_CLOSED = "closed by client"
ADMITTED = "200 admitted"
STALL_CUT, STALL_OPEN, STALL_DONE = (
    "200, cut by server", "200, still open after stall", "200, finished after stall")

STALLED = "stalled stream (reads headers, then stops)"
DROPPED = "dropped before the response"
FLOODED = "best_of_n n 16 x 4096 tokens, streamed"

REFUSED = frozenset({"4xx"})
# A pattern a linear-time engine accepts may run (and score 0): 200 is fine as long as
# /health and the normal client don't notice.
RUNS_OR_REFUSED = frozenset({"200", "4xx"})

REDOS_PATTERN = "(.*a){20}x"  # exponential backtracking on text with many a's and no x
# Asks for JSON holding a long run of a's: the regex critic, the extractors and the JSON-schema
# critic (which only resolves `$ref`s and applies `pattern` when the candidate holds JSON)
# then see the input that makes backtracking explode.
A_PROMPT = ('Reply with only this JSON object and nothing else: {"a": "'
            + "a" * 48 + '"}')
HUGE = 10**9
HUGER = 10**18
MB = 2**20


@dataclass(frozen=True)
class Attack:
    group: str
    name: str
    path: str
    body: bytes
    expect: frozenset[str] = REFUSED
    chunked: bool = False  # sent without Content-Length, in 1 MB chunks


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def chat(content: str = "Say hi.", max_tokens: int = 16, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "user": "hostile", **extra}


def steered(strategy: str, options: dict[str, Any] | None = None,
            critic: dict[str, Any] | None = None, **steering: Any) -> bytes:
    spec: dict[str, Any] = {"strategy": strategy, "options": options or {}, **steering}
    if critic is not None:
        spec["critic"] = critic
    return dumps(chat(A_PROMPT, 48, steering=spec))


def schema_critic(schema: dict[str, Any]) -> bytes:
    return steered("best_of_n", {"n": 2}, {"name": "json_schema", "schema": schema})


def completion(prompt: str | list[str], max_tokens: int = 16, **extra: Any) -> bytes:
    return dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                  "user": "hostile", **extra})


def flood_body() -> bytes:
    """The amplified request: 16 samples of up to 4096 tokens each, streamed."""
    return dumps(chat("Write a very long story about a dragon.", 4096, stream=True,
                      steering={"strategy": "best_of_n", "options": {"n": 16}}))


def long_stream_body(top_logprobs: int = 0) -> bytes:
    """A plain stream that runs long (one dropped unread, or a slow reader's, which asks for
    20 alternatives per token: ~2 KB a chunk, so the stream soon outgrows the socket buffers
    and the server's sends block)."""
    extra = {"logprobs": True, "top_logprobs": top_logprobs} if top_logprobs else {}
    return dumps(chat("Count from 1 to 5000, one number per line.", 4096, stream=True,
                      temperature=0, **extra))


# The kinds bench_hostile runs itself: name -> (group, expected outcomes). A stalled reader's
# stream should be cut by the server's send timeout (or refused up front); a flood request
# should mostly get 429, though some may be admitted.
CONNECTION_KINDS: dict[str, tuple[str, frozenset[str]]] = {
    STALLED: (SLOW, frozenset({STALL_CUT, "429"})),
    DROPPED: (SLOW, frozenset({CLIENT_CLOSED})),
    FLOODED: (FLOOD, frozenset({"429", ADMITTED})),
}


def catalogue(listener_port: int) -> list[Attack]:
    """Every body-borne attack; `listener_port` is the benchmark's canary HTTP listener."""
    remote = f"http://127.0.0.1:{listener_port}"
    redos_schema = {"anyOf": [
        {"type": "string", "pattern": REDOS_PATTERN},
        {"type": "object", "additionalProperties": {"type": "string", "pattern": REDOS_PATTERN}},
    ]}
    words = "lorem ipsum dolor sit amet " * (2 * MB // 27 + 1)
    big = big_body(20 * MB)  # one copy, sent both ways
    return [
        Attack(REDOS, "regex critic `(.*a){20}x`", "/v1/chat/completions",
               steered("best_of_n", {"n": 2}, {"name": "regex", "pattern": REDOS_PATTERN}),
               RUNS_OR_REFUSED),
        Attack(REDOS, "regex critic, backreference (not linear-time)", "/v1/chat/completions",
               steered("best_of_n", {"n": 2}, {"name": "regex", "pattern": r"(a+)+\1x"})),
        Attack(REDOS, "self_consistency extract regex", "/v1/chat/completions",
               steered("self_consistency",
                       {"k": 2, "extract": "regex", "pattern": REDOS_PATTERN}),
               RUNS_OR_REFUSED),
        Attack(REDOS, "exact_answer critic, extract regex", "/v1/chat/completions",
               steered("best_of_n", {"n": 2}, {"name": "exact_answer", "reference": "1",
                                               "extract": "regex",
                                               "pattern": REDOS_PATTERN}),
               RUNS_OR_REFUSED),
        Attack(REDOS, "json_schema `pattern` keyword", "/v1/chat/completions",
               schema_critic(redos_schema), RUNS_OR_REFUSED),
        Attack(REF, "$ref http://127.0.0.1 (canary)", "/v1/chat/completions",
               schema_critic({"$ref": f"{remote}/schema.json"})),
        Attack(REF, "nested $ref http://127.0.0.1", "/v1/chat/completions",
               schema_critic({"type": "object",
                              "properties": {"a": {"$ref": f"{remote}/a.json"}}})),
        Attack(REF, "relative $ref under a remote $id", "/v1/chat/completions",
               schema_critic({"$id": f"{remote}/root.json", "$ref": "other.json"})),
        Attack(REF, "$ref file:///etc/passwd", "/v1/chat/completions",
               schema_critic({"$ref": "file:///etc/passwd"})),
        Attack(INTS, "n 10^9", "/v1/chat/completions", dumps(chat(n=HUGE))),
        Attack(INTS, "max_tokens 10^18", "/v1/chat/completions", dumps(chat(max_tokens=HUGER))),
        Attack(INTS, "max_tokens with 5,000 digits", "/v1/chat/completions",
               dumps(chat()).replace(b'"max_tokens":16', b'"max_tokens":' + b"9" * 5000)),
        Attack(INTS, "completions n 10^9", "/v1/completions", completion("Hi", n=HUGE)),
        Attack(INTS, "best_of_n n 10^9", "/v1/chat/completions",
               steered("best_of_n", {"n": HUGE})),
        Attack(INTS, "self_consistency k 10^9", "/v1/chat/completions",
               steered("self_consistency", {"k": HUGE})),
        Attack(INTS, "tot breadth, depth 10^9", "/v1/chat/completions",
               steered("tot", {"breadth": HUGE, "depth": HUGE})),
        Attack(INTS, "debate agents 10^9", "/v1/chat/completions",
               steered("debate", {"agents": HUGE})),
        Attack(INTS, "debate rounds 10^9", "/v1/chat/completions",
               steered("debate", {"rounds": HUGE})),
        Attack(INTS, "budget fields 10^18", "/v1/chat/completions",
               steered("best_of_n", {"n": 2}, budget={
                   "max_model_calls": HUGER, "max_total_tokens": HUGER, "timeout_s": 1e18})),
        Attack(LISTS, "completions, 100,000 prompts", "/v1/completions",
               completion([f"Say {i}." for i in range(100_000)], 32)),
        Attack(LISTS, "completions, 1,000 prompts x n 16 x 4096 tokens", "/v1/completions",
               completion([f"Tell a long story number {i}." for i in range(1000)], 4096,
                          n=16)),
        Attack(LISTS, "100,000 messages", "/v1/chat/completions",
               dumps(chat() | {"messages": [{"role": "user", "content": "hi"}] * 100_000})),
        Attack(LISTS, "100,000 content parts", "/v1/chat/completions",
               dumps(chat() | {"messages": [{"role": "user", "content": [
                   {"type": "text", "text": "hi"}] * 100_000}]})),
        Attack(LISTS, "one 200 KB message", "/v1/chat/completions",
               dumps(chat(words[:200_000]))),
        Attack(LISTS, "one 2 MB message", "/v1/chat/completions", dumps(chat(words[:2 * MB]))),
        Attack(LISTS, "stop: 100,000 strings", "/v1/chat/completions",
               dumps(chat(stop=[f"s{i}" for i in range(100_000)]))),
        Attack(LISTS, "debate, 100,000 agent personas", "/v1/chat/completions",
               steered("debate", {"agents": [{"persona": "p"}] * 100_000})),
        Attack(LISTS, "few_shot template, 100,000 examples", "/v1/chat/completions",
               steered("none", template={"name": "few_shot", "variables": {
                   "examples": [{"question": "q", "answer": "a"}] * 100_000}})),
        Attack(BODIES, "20 MB body (Content-Length)", "/v1/chat/completions",
               big, REFUSED | {UPLOAD_CUT}),
        Attack(BODIES, "20 MB body (chunked)", "/v1/chat/completions",
               big, REFUSED | {UPLOAD_CUT}, chunked=True),
        Attack(BODIES, "JSON nested 100,000 deep", "/v1/chat/completions",
               dumps(chat())[:-1] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ]


def big_body(size: int) -> bytes:
    head = dumps(chat(""))
    cut = head.index(b'"content":""') + len(b'"content":"')
    return head[:cut] + b"a" * (size - len(head)) + head[cut:]
