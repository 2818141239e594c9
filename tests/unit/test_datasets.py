"""Datasets from stored completions: SFT lines and preference pairs built from real traces
(best_of_n run on the FakeEngine through the app), filters, dedupe, the seeded validation
split, the route that stores them as Files, and `steer data export`."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from steer.service.app import create_app
from steer.service.cli import main
from steer.service.settings import Settings
from steer.store.completions import (
    NewCompletion,
    Selection,
    StoredCompletion,
    insert_completions,
    list_completions,
    select_completions,
)
from steer.store.files import file_content, list_files
from steer.training import datasets
from steer.training.datasets import DatasetSpec, build, split
from steer.training.formats import validate_jsonl
from tests.asgi import running
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"
DATASETS = "/v1/steering/datasets"


def best_of(n: int, reference: int = 42) -> dict[str, Any]:
    return {"strategy": "best_of_n", "options": {"n": n},
            "critic": {"name": "exact_answer", "reference": reference}}


@pytest.fixture
async def app_client(fake_engine: FakeEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with running(create_app(Settings(max_tokens_cap=32), fake_engine)) as client:
        yield client


async def ask(client: httpx.AsyncClient, question: str, answers: list[str],
              steering: dict[str, Any] | None = None, **fields: Any) -> str:
    engine: FakeEngine = client.app.state.engine_state.engine  # type: ignore[attr-defined]
    engine.enqueue(*answers)
    body = {"model": "fake-model", "messages": [{"role": "system", "content": "be brief"},
                                                {"role": "user", "content": question}],
            "store": True, **fields}
    if steering is not None:
        body["steering"] = steering
    r = await client.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    await client.app.state.recorder.queue.join()  # type: ignore[attr-defined]
    cid: str = r.json()["id"]
    return cid


async def stored(client: httpx.AsyncClient) -> list[StoredCompletion]:
    db = client.app.state.db  # type: ignore[attr-defined]
    return [r async for r in select_completions(db, Selection())]


async def test_sft_and_preference_lines_from_a_best_of_n_trace(
    app_client: httpx.AsyncClient,
) -> None:
    await ask(app_client, "6 times 7?", ["forty", "42", "41", "42"], best_of(4),
              metadata={"run": "a"})
    records = await stored(app_client)
    assert records[0].score == 1.0 and records[0].strategy == "best_of_n"

    sft = build(records, DatasetSpec(kind="sft"))
    assert sft.training == [{"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "6 times 7?"},
        {"role": "assistant", "content": "42"}]}]

    pref = build(records, DatasetSpec(kind="preference"))
    # The chosen "42" against each lower-scored candidate; the other "42" is a tie: skipped.
    assert [(p["preferred_output"][0]["content"], p["non_preferred_output"][0]["content"])
            for p in pref.training] == [("42", "forty"), ("42", "41")]
    assert pref.training[0]["input"]["messages"][-1] == {"role": "user",
                                                         "content": "6 times 7?"}
    for kind, data in (("sft", sft), ("preference", pref)):  # what an upload would accept
        content = "".join(json.dumps(line) + "\n" for line in data.training).encode()
        assert validate_jsonl(content, "fine-tune") == (kind, len(data.training))


async def test_skips_say_why_and_duplicates_are_dropped(app_client: httpx.AsyncClient) -> None:
    await ask(app_client, "hello", ["hi there"])  # plain: no trace
    await ask(app_client, "hello", ["hi there"])  # the same prompt and answer again
    await ask(app_client, "6 times 7?", ["42", "42"], best_of(2))  # only ties
    records = await stored(app_client)
    sft = build(records, DatasetSpec(kind="sft"))
    assert len(sft.training) == 2 and sft.skipped == {"duplicate": 1}
    assert len(build(records, DatasetSpec(kind="sft", dedupe=False)).training) == 3
    pref = build(records, DatasetSpec(kind="preference"))
    assert pref.training == [] and pref.skipped == {"no_trace": 2,
                                                    "no_lower_scored_candidate": 1}


def test_the_validation_split_is_seeded_and_by_prompt() -> None:
    lines = [{"messages": [{"role": "user", "content": f"q{i // 2}"},
                           {"role": "assistant", "content": f"a{i}"}]} for i in range(20)]
    train, val = split(lines, 0.3, seed=7)
    assert (train, val) == split(lines, 0.3, seed=7)
    assert len(val) == 6 and len(train) == 14  # 3 of the 10 prompts, both lines of each
    held = {line["messages"][0]["content"] for line in val}
    assert not held & {line["messages"][0]["content"] for line in train}
    assert split(lines, 0.3, seed=8) != (train, val)
    assert split(lines[:2], 0.5, seed=0) == (lines[:2], [])  # one prompt: nothing to hold out


async def test_route_filters_and_stores_files(app_client: httpx.AsyncClient) -> None:
    for i in range(4):
        await ask(app_client, f"q{i} 6 times 7?", ["41", "42"], best_of(2),
                  metadata={"run": "r", "i": str(i)})
    await ask(app_client, "all wrong", ["40", "41"], best_of(2), metadata={"run": "r"})
    await ask(app_client, "other run", ["hey"], metadata={"run": "s"})

    r = await app_client.post(DATASETS, json={"kind": "sft", "metadata": {"run": "r"},
                                              "min_score": 1, "validation_fraction": 0.25,
                                              "seed": 1, "filename": "verified"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["lines"], body["validation_lines"], body["completions"]) == (3, 1, 4)
    assert body["training_file"]["object"] == "file"
    assert body["training_file"]["filename"] == "verified.jsonl"
    assert body["training_file"]["purpose"] == "fine-tune"
    db = app_client.app.state.db  # type: ignore[attr-defined]
    content = await file_content(db, body["training_file"]["id"])
    assert validate_jsonl(content, "fine-tune") == ("sft", 3)
    assert all(json.loads(x)["messages"][-1]["content"] == "42" for x in content.splitlines())
    assert body["validation_file"]["filename"] == "verified-validation.jsonl"

    pref = (await app_client.post(DATASETS, json={"kind": "preference",
                                                  "strategy": "best_of_n"})).json()
    assert (pref["lines"], pref["completions"], pref["validation_file"]) == (4, 5, None)
    assert pref["skipped"] == {"no_lower_scored_candidate": 1}  # "all wrong": 0 vs 0


async def test_nothing_to_build_is_a_400_saying_so(app_client: httpx.AsyncClient) -> None:
    r = await app_client.post(DATASETS, json={"kind": "sft", "metadata": {"run": "none"}})
    assert r.status_code == 400 and "no stored completions match" in r.json()["error"][
        "message"]
    await ask(app_client, "hello", ["hi"])
    r = await app_client.post(DATASETS, json={"kind": "preference"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "kind"
    assert "no_trace" in r.json()["error"]["message"]
    r = await app_client.post(DATASETS, json={"kind": "dpo"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "kind"
    r = await app_client.post(DATASETS, json={"validation_fraction": 1.0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "validation_fraction"


async def test_cli_exports_to_local_files(app_client: httpx.AsyncClient, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(3):
        await ask(app_client, f"q{i}", ["41", "42"], best_of(2), metadata={"run": "cli"})
    assert len((await list_completions(
        app_client.app.state.db)).rows) == 3  # type: ignore[attr-defined]
    out = tmp_path / "train.jsonl"
    # The app's store is the env's STEER_DATABASE_URL: the CLI reads the same one.
    code = await asyncio.to_thread(main, [
        "data", "export", "--kind", "preference", "--metadata", "run=cli", "--min-score", "1",
        "--validation-fraction", "0.34", "--output", str(out)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["lines"], summary["validation_lines"]) == (2, 1)
    assert validate_jsonl(out.read_bytes(), "fine-tune") == ("preference", 2)
    validation = Path(summary["validation_file"]).read_bytes()  # noqa: ASYNC240
    assert validate_jsonl(validation, "fine-tune") == ("preference", 1)
    assert await asyncio.to_thread(
        main, ["data", "export", "--metadata", "run=nothing", "--output", str(out)]) == 1
    assert "no stored completions match" in capsys.readouterr().err


async def test_a_date_beyond_64_bits_is_a_400_not_a_500(app_client: httpx.AsyncClient) -> None:
    """Found by the schema fuzzer in CI: SQLite can't bind an integer past 64 bits."""
    r = await app_client.post(DATASETS, json={"created_after": 2**64})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "created_after"


async def insert_answers(db: Any, count: int, answer: str) -> None:
    await insert_completions(db, [NewCompletion(
        id=f"chatcmpl-big{i}", created=1000 + i, model="fake-model",
        request={"messages": [{"role": "user", "content": f"question {i}"}]},
        response={"id": f"chatcmpl-big{i}", "choices": [
            {"index": 0, "finish_reason": "stop",
             "message": {"role": "assistant", "content": answer}}]},
        metadata={"run": "big"}) for i in range(count)])


async def test_building_runs_off_the_event_loop(app_client: httpx.AsyncClient,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Turning records into lines is CPU work: on the loop, a large export would stall every
    request the server is answering."""
    await insert_answers(app_client.app.state.db, 5, "42")  # type: ignore[attr-defined]
    threads: list[int] = []
    real = datasets.sft_lines

    def watched(*args: Any, **kw: Any) -> Any:
        threads.append(threading.get_ident())
        return real(*args, **kw)

    monkeypatch.setattr(datasets, "sft_lines", watched)
    r = await app_client.post(DATASETS, json={"kind": "sft", "metadata": {"run": "big"}})
    assert r.status_code == 200, r.text
    assert len(threads) == 5 and threading.get_ident() not in threads


async def test_a_dataset_over_the_file_cap_is_refused_before_it_is_stored(
        fake_engine: FakeEngine) -> None:
    settings = Settings(max_file_bytes=1024)
    async with running(create_app(settings, fake_engine)) as client:
        db = client.app.state.db  # type: ignore[attr-defined]
        await insert_answers(db, 8, "x" * 200)  # ~8 x 260 bytes of lines: over 1 KiB
        r = await client.post(DATASETS, json={"kind": "sft", "metadata": {"run": "big"}})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "dataset_too_large"
        assert "1024" in error["message"] and "STEER_MAX_FILE_BYTES" in error["message"]
        assert '"run": "big"' in error["message"]  # the filters to narrow
        assert (await list_files(db)).data == []  # nothing half-written
        r = await client.post(DATASETS, json={  # narrowed, it fits
            "kind": "sft", "metadata": {"run": "big"}, "created_before": 1003})
        assert r.status_code == 200 and r.json()["lines"] == 3, r.text
