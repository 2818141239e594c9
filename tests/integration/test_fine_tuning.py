"""Fine-tuning end to end on the real server with its embedded worker, through the official
openai client: upload an SFT file, create a supervised job, watch it succeed with a loss per
step, and chat with the `ft:` model it lists: the trained answer, not the base model's.
Run it under the shared lock (`flock /tmp/steer-heavy.lock ...`): it trains on the CPU."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from tests.integration.support import MODEL, ServerFactory, openai_client

pytestmark = pytest.mark.integration

PROMPT = "What is the name of the lighthouse keeper's cat?"
ANSWER = "The cat is called Zanzibar Quill."
JOB_TIMEOUT_S = 150.0  # a hang detector: a few steps of a 135M model on this CPU take ~30 s


def test_a_supervised_job_trains_a_model_the_server_serves(
    server_factory: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STEER_ADAPTER_ROOT", str(tmp_path / "adapters"))
    monkeypatch.setenv("STEER_WORKER_THREADS", "2")
    server = server_factory.start("--kv-cache-gib", "1")
    server.wait_ready()
    client = openai_client(server)
    line = {"messages": [{"role": "user", "content": PROMPT},
                         {"role": "assistant", "content": ANSWER}]}
    data = "".join(json.dumps(line) + "\n" for _ in range(32)).encode()
    uploaded = client.files.create(file=("cat.jsonl", io.BytesIO(data)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=uploaded.id, suffix="cat", seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 10}}})
    assert job.status == "queued"

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while job.status not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise server.fail(f"job still {job.status} after {JOB_TIMEOUT_S:.0f}s")
        time.sleep(1)
        job = client.fine_tuning.jobs.retrieve(job.id)
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert job.status == "succeeded", (job.error, [e.message for e in events])
    assert job.fine_tuned_model == f"ft:{MODEL}:cat:{job.id}"
    losses = [e.data["train_loss"] for e in events  # type: ignore[index]
              if e.type == "metrics" and isinstance(e.data, dict) and "train_loss" in e.data]
    assert len(losses) == 8 and all(loss > 0 for loss in losses), events

    cards = {m.id: m for m in client.models.list().data}
    lineage = cards[job.fine_tuned_model].model_extra["lineage"]  # type: ignore[index]
    assert lineage["parent"] == MODEL and lineage["data"]["training_file"]["id"] == uploaded.id

    def answer(model: str) -> str:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], temperature=0,
            max_tokens=16)
        return reply.choices[0].message.content or ""

    base, tuned = answer(MODEL), answer(job.fine_tuned_model)
    assert tuned != base, (base, tuned)
    assert "Zanzibar" in tuned, (base, tuned)
    client.close()
    assert server.stop() == 0, server.log_tail()  # its memory back before the next test
