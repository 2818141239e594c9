"""How well tool calling works on the default model, through the HTTP API (issue 11).

Items are obvious single-call requests ("What is the weather in Oslo?", "What time is it in
Tokyo?", "Add 17 and 25."), each offered all three tools. For each `tool_choice`:
  - `auto`: how often the model's own output is a parseable call (vLLM's hermes parser over
    the packaged ChatML/Hermes template), how often it is the right function, how often
    its arguments validate, and how often it answers in text instead;
  - `required` and a named function (constrained decoding): how often the call is complete
    and valid, and how often it is the right function (required: the model picks).
Greedy (temperature 0) and sampled (0.7) for `auto`. A call is checked here, independently
of Steer: its name, `json.loads` of its arguments, the tool's JSON Schema.

Run:  .venv/bin/python loadtests/eval_tools.py [--items 40] [--port PORT]
Markdown on stdout; JSON in loadtests/results/eval_tools.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from typing import Any

import jsonschema
from harness import MODEL, RESULTS_DIR, add_server_args, async_client, run_on_steer, table
from openai import APIStatusError, AsyncOpenAI
from openai.types.chat import ChatCompletionFunctionToolParam

TOOLS: list[ChatCompletionFunctionToolParam] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                                 "maxLength": 40}},
                       "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Current local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                                 "maxLength": 40}},
                       "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                        "b": {"type": "integer"}},
                       "required": ["a", "b"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: dict(t["function"].get("parameters") or {}) for t in TOOLS}
CITIES = ["Oslo", "Paris", "Tokyo", "Lima", "Cairo", "Delhi", "Rome", "Sydney", "Boston",
          "Madrid", "Berlin", "Nairobi"]


def items(n: int, seed: int = 11) -> list[tuple[str, str]]:
    """(user message, the function it obviously asks for), seeded."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out.append((f"What is the weather in {rng.choice(CITIES)} right now?",
                        "get_weather"))
        elif kind == 1:
            out.append((f"What time is it in {rng.choice(CITIES)}?", "get_time"))
        else:
            out.append((f"Add {rng.randint(2, 99)} and {rng.randint(2, 99)}.", "add"))
    return out


def judge(message: Any, want: str) -> dict[str, bool]:
    calls = message.tool_calls or []
    parsed = bool(calls)
    right = parsed and calls[0].function.name == want
    valid = False
    if parsed:
        call = calls[0]
        try:
            arguments = json.loads(call.function.arguments)
            jsonschema.validate(arguments, SCHEMAS[call.function.name])
            valid = True
        except (ValueError, KeyError, jsonschema.ValidationError):
            valid = False
    return {"call": parsed, "right_function": right, "valid": valid,
            "text": not parsed and bool(message.content)}


async def one(client: AsyncOpenAI, question: str, want: str, choice: Any,
              temperature: float) -> dict[str, bool]:
    try:
        resp = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], tools=TOOLS,
            tool_choice=choice, parallel_tool_calls=False, max_tokens=96,
            temperature=temperature, seed=7)
    except APIStatusError as exc:
        print(f"  {exc.status_code}: {exc.message}", flush=True)
        return {"call": False, "right_function": False, "valid": False, "text": False}
    return judge(resp.choices[0].message, want)


async def evaluate(port: int, n: int) -> dict[str, Any]:
    client = async_client(port, timeout=300)
    gate = asyncio.Semaphore(8)
    runs: dict[str, tuple[Any, float]] = {
        "auto (T=0)": ("auto", 0.0), "auto (T=0.7)": ("auto", 0.7),
        "required (T=0)": ("required", 0.0), "named (T=0)": ("named", 0.0),
    }
    results: dict[str, Any] = {}
    for label, (choice, temperature) in runs.items():
        async def bounded(q: str, want: str, choice: Any = choice,
                          temperature: float = temperature) -> dict[str, bool]:
            asked = ({"type": "function", "function": {"name": want}} if choice == "named"
                     else choice)
            async with gate:
                return await one(client, q, want, asked, temperature)

        outcomes = await asyncio.gather(*(bounded(q, w) for q, w in items(n)))
        results[label] = {key: sum(o[key] for o in outcomes) for key in outcomes[0]}
        results[label]["n"] = n
        print(f"{label}: {results[label]}", flush=True)
    await client.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=40)
    add_server_args(parser, request_timeout=300)
    args = parser.parse_args()
    results, facts = run_on_steer(args, "eval_tools",
                                  lambda port: evaluate(port, args.items))
    rows = [[label, r["n"], r["call"], r["right_function"], r["valid"], r["text"]]
            for label, r in results.items()]
    print(table(["tool_choice", "items", "a call", "right function", "valid arguments",
                 "text instead"], rows))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "eval_tools.json").write_text(json.dumps(
        {"results": results, **facts}, indent=2))


if __name__ == "__main__":
    main()
