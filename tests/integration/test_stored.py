"""Stored completions on the real server, through the official `openai` client: a steered
best_of_n answer stored with metadata, then listed by metadata, retrieved, its messages
listed, its metadata updated, a dataset built from it, its trace served from the store, and
deleted.

One test on a server of its own, started inside the test so it inherits this test's private
store (STEER_DATABASE_URL); run it under the shared lock (see /work/notes/common.md).
"""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest

from tests.integration.support import MODEL, ServerFactory, openai_client, wait_until

pytestmark = pytest.mark.integration

BEST_OF_3 = {"strategy": "best_of_n", "options": {"n": 3, "temperature": 0.8},
             "critic": {"name": "exact_answer", "reference": 5}}


def test_a_stored_steered_completion_round_trip(server_factory: ServerFactory) -> None:
    server = server_factory.start("--kv-cache-gib", "1")
    server.wait_ready()
    run = uuid.uuid4().hex[:8]
    try:
        with openai_client(server) as oai, httpx.Client(base_url=server.url,
                                                        timeout=60) as http:
            answer = oai.chat.completions.create(
                model=MODEL, max_tokens=24, seed=1, store=True,
                messages=[{"role": "user", "content": "What is 2 + 3? Answer with a number."}],
                metadata={"suite": "stored", "run": run},
                extra_body={"steering": BEST_OF_3})
            text = answer.choices[0].message.content

            def listed() -> list[str]:
                return [c.id for c in oai.chat.completions.list(metadata={"run": run}).data]

            wait_until(lambda: listed() == [answer.id], 10, "the stored completion listed")
            assert oai.chat.completions.list(metadata={"run": "other"}).data == []

            got = oai.chat.completions.retrieve(answer.id)
            assert got.choices[0].message.content == text
            assert got.metadata == {"suite": "stored", "run": run}
            assert got.usage is not None and got.usage.total_tokens == (
                answer.usage.total_tokens if answer.usage else None)
            trace_id = (got.model_extra or {})["steering_trace_id"]

            trace = http.get(f"/v1/steering/traces/{trace_id}")
            assert trace.status_code == 200, trace.text
            nodes = trace.json()["nodes"]
            generated = [n for n in nodes if n["role"] == "generator"]
            assert len(generated) == 3
            assert [n["text"] for n in generated if n["chosen"]] == [text]
            assert all("exact_answer" in n["scores"] for n in generated)

            messages = oai.chat.completions.messages.list(answer.id)
            assert [(m.role, m.content) for m in messages.data] == [
                ("user", "What is 2 + 3? Answer with a number.")]

            updated = oai.chat.completions.update(answer.id, metadata={"run": run,
                                                                       "grade": "good"})
            assert updated.metadata == {"run": run, "grade": "good"}
            graded = oai.chat.completions.list(metadata={"run": run, "grade": "good"})
            assert [c.id for c in graded.data] == [answer.id]

            dataset = http.post("/v1/steering/datasets", json={
                "kind": "sft", "metadata": {"run": run}, "include_truncated": True})
            assert dataset.status_code == 200, dataset.text
            assert dataset.json()["lines"] == 1 and dataset.json()["completions"] == 1

            deleted = oai.chat.completions.delete(answer.id)
            assert (deleted.id, deleted.deleted) == (answer.id, True)
            with pytest.raises(openai.NotFoundError) as missing:
                oai.chat.completions.retrieve(answer.id)
            assert missing.value.body["param"] == "completion_id"  # type: ignore[index]
    finally:
        server.stop()
