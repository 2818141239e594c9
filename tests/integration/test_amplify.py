"""The amplification loop on the real server at a tiny size, through the official `openai`
client: a steered answer stored with its trace, a graded training file uploaded, a
reinforcement job (search, grade, train, hot-load, evaluate) followed by its events, and its
adapter listed with lineage, served, and answering differently from the base.
"""

from __future__ import annotations

import io
import json
import random
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.support import MODEL, ServerFactory, openai_client

pytestmark = pytest.mark.integration

EXACT = {"type": "steer_critic", "pass_threshold": 1.0,
         "critic": {"name": "exact_answer", "reference": "{{item.reference}}",
                    "extract": "last_number"}}


def additions(n: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        lines.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"}],
                      "reference": str(a + b)})
    return lines


def jsonl(lines: list[dict[str, object]]) -> io.BytesIO:
    return io.BytesIO("".join(json.dumps(x) + "\n" for x in lines).encode())


def test_search_grade_train_hot_load(server_factory: ServerFactory, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEER_ADAPTER_ROOT", str(tmp_path / "adapters"))
    srv = server_factory.start("--kv-cache-gib", "1")
    srv.wait_ready()
    with openai_client(srv, timeout=120) as oai, httpx.Client(base_url=srv.url,
                                                              timeout=60) as http:
        # 1. a steered answer, stored with its metadata and its whole search trace
        answer = oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is 12 + 30?"}],
            max_tokens=24, store=True, metadata={"run": "amplify"},
            extra_body={"steering": {"strategy": "best_of_n", "options": {"n": 3},
                                     "critic": {"name": "exact_answer", "reference": "42"}}},
        )
        stored = _eventually(lambda: oai.chat.completions.list(metadata={"run": "amplify"}).data)
        assert [c.id for c in stored] == [answer.id]
        trace_id = (stored[0].model_extra or {})["steering_trace_id"]
        trace = http.get(f"/v1/steering/traces/{trace_id}").json()
        assert trace["strategy"] == "best_of_n"
        assert sum(n["role"] == "generator" for n in trace["nodes"]) == 3

        # 2. graded lines in, a reinforcement job out
        train = oai.files.create(file=("add.jsonl", jsonl(additions(12, 1))),
                                 purpose="fine-tune")
        val = oai.files.create(file=("val.jsonl", jsonl(additions(4, 2))), purpose="fine-tune")
        job = oai.fine_tuning.jobs.create(
            model=MODEL, training_file=train.id, validation_file=val.id, suffix="add", seed=3,
            method={"type": "reinforcement", "reinforcement": {"grader": EXACT,
                    "hyperparameters": {"rounds": 1, "samples": 4, "max_tokens": 24,
                                        "n_epochs": 1, "batch_size": 4}}},  # type: ignore[typeddict-item]
        )
        with pytest.raises(openai.APIStatusError) as in_use:
            oai.files.delete(train.id)
        assert in_use.value.status_code == 409

        deadline = time.monotonic() + 240
        while (job := oai.fine_tuning.jobs.retrieve(job.id)).status not in (
                "succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, srv.fail(f"job still {job.status}")
            time.sleep(2)
        events = list(oai.fine_tuning.jobs.list_events(job.id, limit=100))
        assert job.status == "succeeded", [e.message for e in events]
        assert job.fine_tuned_model == f"ft:{MODEL}:add:{job.id}"
        rounds = [e.data for e in events if e.type == "metrics" and isinstance(e.data, dict)
                  and e.data.get("round") == 1 and "kept_samples" in e.data]
        assert rounds and rounds[-1]["kept_samples"] > 0, [e.message for e in events]
        assert any(isinstance(e.data, dict) and "train_loss" in e.data for e in events)
        assert list(oai.fine_tuning.jobs.checkpoints.list(job.id))

        # 3. the adapter is listed with its lineage and served by name
        cards = {m.id: m for m in oai.models.list()}
        assert job.fine_tuned_model in cards
        lineage = (cards[job.fine_tuned_model].model_extra or {})["lineage"]
        assert train.id in json.dumps(lineage), lineage  # its priors: this file's prompts
        prompts = [line["messages"] for line in additions(12, 1)]
        base = [_greedy(oai, MODEL, m) for m in prompts]
        tuned = [_greedy(oai, job.fine_tuned_model, m) for m in prompts]
        assert base != tuned, "the trained adapter answers exactly like the base"
    assert srv.stop() == 0, srv.log_tail()


def _greedy(oai: openai.OpenAI, model: str, messages: object) -> str:
    r = oai.chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                    max_tokens=24, temperature=0, seed=1)
    return r.choices[0].message.content or ""


def _eventually(read: object, timeout: float = 10.0) -> list[openai.types.chat.ChatCompletion]:
    """Stored completions are written off the request path: poll until one shows up."""
    deadline = time.monotonic() + timeout
    while not (rows := read()):  # type: ignore[operator]
        assert time.monotonic() < deadline, "the stored completion never showed up"
        time.sleep(0.2)
    return rows  # type: ignore[no-any-return]
